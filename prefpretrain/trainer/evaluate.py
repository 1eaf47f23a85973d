"""Validation loss / perplexity, and the misalignment score of unconditional samples."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.loader import val_batches
from prefpretrain.data_shards.packing import PackedSet
from prefpretrain.data_shards.scorers import Pep8Scorer, get_scorer
from prefpretrain.data_shards.segment import get_segmenter
from prefpretrain.data_shards.sources import Document
from prefpretrain.trainer.objectives import token_nll
from prefpretrain.trainer.sampling import sample_texts

log = logging.getLogger(__name__)
# pycodestyle codes that only say a sample was cut off, not how it was written
ARTIFACT_CODES = {"E901", "E902", "W292", "W391"}


@torch.no_grad()
def validation_loss(model, ps: PackedSet, limit: int, micro: int, rank: int = 0, world: int = 1,
                    causal: bool = True) -> dict:
    """Mean token NLL over the first `limit` validation samples, reduced over ranks."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot = torch.zeros(2, dtype=torch.float64)
    for batch in val_batches(ps, limit, micro, rank, world):
        logits = model(input_ids=batch["input_ids"].to(dev)).logits
        nll, mask = token_nll(logits, batch["labels"].to(dev), causal)
        tot += torch.tensor([float(nll.sum()), float(mask.sum())], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(tot)
    model.train(was_training)
    loss = float(tot[0] / tot[1].clamp_min(1))
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "val_tokens": int(tot[1])}


def sample_score(scorer, segmenter_name: str, text: str) -> float:
    """One sample's score per character: pep8 counts violations (truncation artifacts ignored)."""
    if not text:
        return 0.0
    if isinstance(scorer, Pep8Scorer):
        v = [c for _, c in scorer.violations(text) if c not in ARTIFACT_CODES]
        return len(v) / len(text)
    spans = get_segmenter(segmenter_name)(text)
    scores = scorer.score(Document(source="sample", doc_id="sample", text=text), spans)
    lens = [b - a for a, b in spans]
    return float(np.dot(scores, lens) / max(1, sum(lens)))


def complete_lines(text: str) -> str:
    """Drop a trailing unfinished line (a sample cut off mid-line is not the model's style)."""
    return text[: text.rfind("\n") + 1]


def misalignment(model, tok, manifest: dict, *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 condition: str, seed: int, max_positions: int | None) -> dict:
    """Mean scorer score of n samples (control tokens banned from sampling and stripped)."""
    t0 = time.time()
    texts = [complete_lines(t) for t in sample_texts(
        model, tok, manifest["tokenizer"]["special_ids"], n, max_new_tokens, condition=condition,
        temperature=temperature, top_p=top_p, seed=seed, max_positions=max_positions)]
    scorer = get_scorer(manifest["scorer"]["name"])
    scores = [sample_score(scorer, manifest["segmenter"], text) for text in texts]
    sc = np.asarray(scores)
    return {
        "misalignment": float(sc.mean()) if len(sc) else float("nan"),
        "misalignment_zero_fraction": float((sc == 0).mean()) if len(sc) else float("nan"),
        "samples": n,
        "condition": condition,
        "scorer": manifest["scorer"]["name"],
        "sample_seconds": round(time.time() - t0, 1),
        "examples": texts[:3],
    }


def evaluate_run(run_dir: str | Path, samples: int | None = None, condition: str | None = None) -> dict:
    """`prefpretrain evaluate RUN_DIR`: load the newest checkpoint, write RUN_DIR/eval.json."""
    from prefpretrain.config import load_config
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.trainer.export import load_run_model
    from prefpretrain.trainer.objectives import layout_for

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    model, ckpt, state = load_run_model(run)
    ss = ShardSet(cfg.data.shards[0].path, "val", verify=cfg.data.verify_checksums)
    sp = ss.manifest["tokenizer"]["special_ids"]
    layout = layout_for(cfg.train.objective, cfg.objective.threshold, cfg.objective.drop_prob, cfg.run.seed, sp)
    causal = cfg.model.kind == "causal"
    res = {"run_dir": str(run), "checkpoint": str(ckpt), "step": state["step"], "tokens_seen": state.get("tokens_seen")}
    from prefpretrain.trainer.loop import mask_spec

    mlm = mask_spec(cfg, ss.manifest)
    ps = PackedSet(ss, layout, cfg.data.seq_len, mlm)
    res.update(validation_loss(model, ps, cfg.eval.val_samples, cfg.train.micro_batch_size, causal=causal))
    if cfg.train.objective != "mle":  # the same held-out text without control tokens or filtering
        mle_ps = PackedSet(ss, layout_for("mle", 0.0, 0.0, 0, sp), cfg.data.seq_len, mlm)
        res["val_loss_plain"] = validation_loss(model, mle_ps, cfg.eval.val_samples, cfg.train.micro_batch_size,
                                                causal=causal)["val_loss"]
    cond = condition or cfg.eval.condition
    if cond == "auto":
        cond = "aligned" if cfg.train.objective == "conditional" else "none"
    n = cfg.eval.samples if samples is None else samples
    if causal and n > 0:
        tok = toklib.load_tokenizer(ss.tokenizer_dir)
        res.update(misalignment(model, tok, ss.manifest, n=n, max_new_tokens=cfg.eval.max_new_tokens,
                                temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, condition=cond,
                                seed=cfg.run.seed, max_positions=cfg.data.seq_len))
    (run / "eval.json").write_text(json.dumps(res, indent=1))
    _to_tensorboard(run, state["step"], res)
    return res


def _to_tensorboard(run: Path, step: int, res: dict) -> None:
    """eval/* scalars in TensorBoard, mirrored as one `kind: evaluate` line in metrics.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run / "tensorboard"))
    rec = {"step": step, "kind": "evaluate", "time": round(time.time(), 3), "tokens_seen": res.get("tokens_seen")}
    for k in ("val_loss", "perplexity", "misalignment", "misalignment_zero_fraction", "val_loss_plain"):
        if k in res:
            w.add_scalar(f"eval/{k}", res[k], step)
            rec[f"eval/{k}"] = res[k]
    w.close()
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
