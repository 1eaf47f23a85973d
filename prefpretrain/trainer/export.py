"""A run's newest checkpoint -> a HF `save_pretrained` directory (safetensors + tokenizer); `with_heads` also writes
the training heads (label, value) to heads.safetensors, described by prefpretrain.json's `heads` entry."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prefpretrain.errors import InputError
from prefpretrain.trainer.finished import FinishedRun

HEADS_FILE = "heads.safetensors"
POOLING = "mean of the last hidden state over a segment's tokens"
log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out_dir: str | Path, with_heads: bool = False) -> Path:
    from prefpretrain.data_shards.columns import scorer_of
    from prefpretrain.data_shards.tokenizer import hf_tokenizer
    from prefpretrain.objectives import eval_condition
    from prefpretrain.trainer.data import run_attributes

    fr, out = FinishedRun.open(run_dir), Path(out_dir)
    model, ckpt, state, cfg = fr.load_model(heads=with_heads), fr.ckpt, fr.state, fr.cfg
    heads = _take_heads(model, ckpt) if with_heads else {}
    ss = fr.shards("train")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    attributes = run_attributes(cfg, ss.manifest)
    _tokenizer_with_controls(hf_tokenizer(ss.tokenizer_dir), attributes, model).save_pretrained(str(tmp))
    first = attributes[0]
    info = {
        "exported_from": str(ckpt), "step": state["step"], "tokens_seen": state.get("tokens_seen"),
        "objective": cfg.train.objective, "tokenizer_hash": ss.tokenizer_hash,
        "control_tokens": {"aligned": first.aligned, "misaligned": first.misaligned},
        "attributes": [a.to_json() for a in attributes],
        "scorer": scorer_of(ss.manifest, ss.score_column), "score_column": ss.score_column,
        "threshold": cfg.objective.threshold, "segmenter": ss.manifest["segmenter"], "precision": cfg.train.precision,
        "conditioning": (f"prefix {' '.join(a.aligned for a in attributes)} and place them by the "
                         f"{cfg.eval.control_protocol!r} protocol (docs/objectives.md)"
                         if eval_condition(cfg.train.objective) == "aligned" else "none"),
        "control_protocol": cfg.eval.control_protocol,
    }
    if heads:
        from safetensors.torch import save_file

        save_file(heads, str(tmp / HEADS_FILE))
        info["heads"] = heads_entry(heads, model, cfg, info, ss.manifest)
    (tmp / "prefpretrain.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported step %d to %s", state["step"], out)
    return out


def _take_heads(model, ckpt: Path) -> dict:
    """The heads' weights (keys as in the checkpoint: `label_head.weight`...), detached from `model` so that its
    own safetensors hold the language model only."""
    from prefpretrain.trainer.model import HEADS

    out = {}
    for name in HEADS:
        head = getattr(model, name, None)
        if head is not None:
            out.update({f"{name}.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
            delattr(model, name)
    if not out:
        raise InputError(f"export --with-heads: {ckpt} has no head (train with objective.label_head_weight > 0, "
                         f"or train.objective awr for a value head)")
    return out


def heads_entry(heads: dict, model, cfg, info: dict, manifest: dict) -> dict:
    """prefpretrain.json's `heads`: what the heads are and how a segment is fed to the label head."""
    from prefpretrain.data_shards.columns import stored_column

    names = sorted({k.split(".")[0] for k in heads})
    entry = {"file": HEADS_FILE, "names": names, "hidden_size": model.config.hidden_size,
             "model_kind": cfg.model.kind, "window": cfg.data.seq_len, "document_mask": cfg.data.document_mask}
    if "label_head" in names:
        entry["label_head"] = {
            "output": "logit of P(preferred)", "pooling": POOLING, "control_tokens": "not pooled",
            "preferred": "score <= threshold", "threshold": info["threshold"],
            "score_column": info["score_column"] or stored_column(manifest), "scorer": info["scorer"],
            "segmenter": manifest["segmenter"]}
    if "value_head" in names:
        entry["value_head"] = {"output": "a value per position from the last hidden state (awr)"}
    return entry


def export_matches(out_dir: str | Path, ckpt: Path) -> bool:
    """Whether `out_dir` holds a complete export of checkpoint `ckpt`."""
    out = Path(out_dir)
    try:
        info = json.loads((out / "prefpretrain.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(info, dict) and Path(str(info.get("exported_from"))).resolve() == Path(ckpt).resolve()
            and any((out / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")))


def _tokenizer_with_controls(tok, attributes: tuple, model):
    """The HF tokenizer with the control tokens of attributes past the first added, at the ids the model was
    trained with (the tokenizer's vocabulary, then two per attribute in order)."""
    from prefpretrain.conditioning import added_tokens

    extra = added_tokens(attributes)
    if extra:
        tok.add_tokens(extra, special_tokens=True)
        got = [tok.convert_tokens_to_ids(t) for t in extra]
        want = [i for a in attributes[1:] for i in (a.aligned_id, a.misaligned_id)]
        rows = model.get_input_embeddings().num_embeddings
        if got != want or max(want) >= rows:
            raise RuntimeError(f"export: control tokens {extra} got ids {got}, the model was trained with {want} "
                               f"({rows} embedding rows)")
    return tok
