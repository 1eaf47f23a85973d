"""Validation loss / perplexity, and the misalignment score of unconditional samples."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from prefpretrain import auxiliary, conditioning, distributed
from prefpretrain.conditioning import Attribute
from prefpretrain.data_shards import columns, linetypes
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.loader import val_batches
from prefpretrain.data_shards.packing import PackedSet
from prefpretrain.data_shards.scorers import Pep8Scorer, get_scorer
from prefpretrain.data_shards.segment import get_segmenter
from prefpretrain.data_shards.sources import Document
from prefpretrain.errors import InputError, describe
from prefpretrain.losses import token_nll
from prefpretrain.rundir import EVAL, METRICS
from prefpretrain.trainer.loggers import check_loggers, open_loggers
from prefpretrain.trainer.model import lm_inputs
from prefpretrain.trainer.sampling import SAMPLE_BATCH, my_batches, sample_texts

log = logging.getLogger(__name__)
# pycodestyle codes that only say a sample was cut off, not how it was written
ARTIFACT_CODES = {"E901", "E902", "W292", "W391"}


@torch.no_grad()
def validation_loss(model, ps: PackedSet, limit: int, micro: int, rank: int = 0, world: int = 1,
                    causal: bool = True, threshold: float | None = None, label_threshold: float | None = None) -> dict:
    """Mean token NLL over the first `limit` validation samples, reduced over ranks; with a threshold
    also over the aligned tokens alone (score <= threshold). Every rank runs as many forwards as the others
    (ZeRO-3), the sums stay on the model's device, and the host reads them once. `label_threshold`: also the
    label head's AUC, calibration and Brier score against that threshold (`ps` carries segment keys)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    head = model.label_head if label_threshold is not None else None
    tot = torch.zeros(4 + (3 * auxiliary.TALLY_BINS + 1 if head is not None else 0), dtype=torch.float64, device=dev)
    for batch, pad in val_batches(ps, limit, micro, rank, world):
        out = model(**lm_inputs(batch, dev, model=model), output_hidden_states=head is not None)
        # the head too runs on every rank, padding included: at ZeRO-3 calling it gathers its parameters
        tally = None if head is None else auxiliary.label_tally(head, out.hidden_states[-1], batch, causal,
                                                                label_threshold)
        if pad:
            continue
        nll, mask = token_nll(out.logits, batch["labels"].to(dev), causal)
        scores = (batch["scores"][:, 1:] if causal else batch["scores"]).to(dev)
        aligned = mask & (scores <= (threshold if threshold is not None else float("inf")))
        tot[:4] += torch.stack([nll.sum(), mask.sum(), (nll * aligned).sum(), aligned.sum()]).double()
        if tally is not None:
            tot[4:] += tally
    sums = distributed.all_sum(tot) if world > 1 else tot.tolist()
    total, tokens, total_aligned, tokens_aligned = sums[:4]
    model.train(was_training)
    if tokens == 0:  # not a loss of 0 and a perplexity of 1
        raise InputError(f"validation: the first {limit or 'all'} validation samples hold no target token")
    loss = total / tokens
    out = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "val_tokens": int(tokens)}
    if threshold is not None:
        out["val_loss_aligned"] = total_aligned / max(1.0, tokens_aligned)
        out["val_tokens_aligned"] = int(tokens_aligned)
    if head is not None:
        out.update(auxiliary.label_metrics(sums[4:]))
    return out


def sample_score(scorer, segmenter_name: str, text: str) -> tuple[float, dict[str, list[int]] | None]:
    """One sample's score per character, and for code (pep8: violations, truncation artifacts ignored) its
    [characters, violations] per line type (None for other scorers)."""
    if isinstance(scorer, Pep8Scorer):
        lines = [n for n, c in scorer.violations(text) if c not in ARTIFACT_CODES] if text else []
        return (len(lines) / len(text) if text else 0.0), linetypes.type_counts(text, lines)
    if not text:
        return 0.0, None
    spans = get_segmenter(segmenter_name)(text)
    scores = scorer.score(Document(source="sample", doc_id="sample", text=text), spans)
    lens = [b - a for a, b in spans]
    return float(np.dot(scores, lens) / max(1, sum(lens))), None


def complete_lines(text: str) -> str:
    """Drop a trailing unfinished line (a sample cut off mid-line is not the model's style)."""
    return text[: text.rfind("\n") + 1]


def bootstrap_means(x: np.ndarray, reps: int = 2000, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap replicates of the mean of x. With `groups` (e.g. the training seed of each sample) of more than
    one value, two-level (cluster) resampling: the groups with replacement, then the samples within each drawn
    group, so that the spread covers group-to-group variation and not only the sampling noise within groups."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    labels = np.unique(groups) if groups is not None else np.zeros(1)
    if groups is None or len(labels) < 2:
        return x[rng.integers(0, len(x), (reps, len(x)))].mean(axis=1)
    parts = [x[np.asarray(groups) == g] for g in labels]
    out = np.empty(reps)
    for r in range(reps):
        drawn = [parts[i] for i in rng.integers(0, len(parts), len(parts))]
        out[r] = np.concatenate([p[rng.integers(0, len(p), len(p))] for p in drawn]).mean()
    return out


def bootstrap_ci(x: np.ndarray, reps: int = 2000, seed: int = 0, level: float = 0.95,
                 groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (two-level over `groups` when there are several; see
    bootstrap_means)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    means = bootstrap_means(x, reps, seed, groups)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def interval_covers(groups: int) -> str:
    """What a misalignment interval accounts for, said next to it."""
    return (f"seed-to-seed variation ({groups} training seeds) and sampling noise" if groups > 1 else
            "sampling noise only (one trained model: seed-to-seed variation is not in it)")


def expected_max(x: np.ndarray, k: int) -> float:
    """E[max of k samples drawn without replacement from x], exact: P(max = s_(i)) = C(i-1, k-1) / C(n, k)."""
    n = len(x)
    if n == 0 or k <= 0:
        return float("nan")
    k = min(k, n)
    lg = math.lgamma
    log_total = lg(n + 1) - lg(k + 1) - lg(n - k + 1)
    w = [math.exp(lg(i) - lg(k) - lg(i - k + 1) - log_total) if i >= k else 0.0 for i in range(1, n + 1)]
    return float(np.dot(w, np.sort(x)))


def parses(text: str) -> bool:
    import ast
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def data_line_mix(ss, tok, limit: int = 200) -> dict[str, float]:
    """The share of characters per line type in the first `limit` documents of a (line-segmented) shard set (`tok`
    its tokenizer): the fixed content mix code samples are compared at (`misalignment_at_data_mix`)."""
    from prefpretrain.data_shards.rescore import segment_texts

    eos = ss.manifest["tokenizer"]["special_ids"]["eos"]
    return linetypes.char_mix([segment_texts(ss.read(i), eos, tok)[0] for i in range(min(limit, len(ss)))])


def line_type_summary(counts: dict[str, list[int]], line_mix: dict[str, float] | None) -> dict:
    """Code samples by line type, and their rate at the data's mix of line types (style apart from content)."""
    total = max(1, sum(c for c, _ in counts.values()))
    out = {"by_line_type": {t: {"char_share": c / total, "violations": v, "rate": v / c if c else None}
                            for t, (c, v) in counts.items()}}
    if line_mix is not None:
        out["misalignment_at_data_mix"] = linetypes.at_mix(counts, line_mix)
        out["data_line_mix"] = line_mix
    return out


def summarize_scores(scores: list[float], *, texts: list[str] | None = None, k: int = 25, seed: int = 0) -> dict:
    """Mean with a bootstrap 95 % interval, share of clean samples, expected max over k samples; for code,
    the share of samples that parse and the mean over those alone (style apart from competence)."""
    sc = np.asarray(scores, dtype=np.float64)
    lo, hi = bootstrap_ci(sc, seed=seed)
    out = {"misalignment": float(sc.mean()) if len(sc) else float("nan"), "misalignment_ci95": [lo, hi],
           "interval_covers": interval_covers(1),
           "misalignment_zero_fraction": float((sc == 0).mean()) if len(sc) else float("nan"),
           "misalignment_expected_max": expected_max(sc, k), "expected_max_k": min(k, len(sc))}
    if texts is not None:
        ok = np.array([parses(t) for t in texts], dtype=bool)
        out["parse_fraction"] = float(ok.mean()) if len(ok) else float("nan")
        out["misalignment_parsed"] = float(sc[ok].mean()) if ok.any() else float("nan")
        out["sample_parses"] = ok.astype(int).tolist()  # (intervals and ratios over the parsing samples alone)
    return out


def _scorer_for(name: str, specs: list[dict]):
    """A scorer by name; one of the run's own (`specs`: its score columns' scorers) keeps its parameters
    (pep8_style's code list follows from the name)."""
    params = next((spec.get("params", {}) for spec in specs if spec["name"] == name), {})
    try:
        return get_scorer(name, {k: v for k, v in params.items() if k != "codes"})
    except ValueError:
        return get_scorer(name)


def misalignment(model, tok, manifest: dict, *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 condition: str, seed: int, max_positions: int | None, seeds: int = 1,
                 scorers: list[str] | None = None, rank: int = 0, world: int = 1, lockstep: bool = False,
                 attributes: tuple[Attribute, ...] | None = None, protocol: str = "newline",
                 line_mix: dict[str, float] | None = None) -> dict:
    """Mean scorer score per character of n samples for each of `seeds` sampling seeds (pooled), with
    control tokens banned from sampling and stripped, complete lines only, truncation artefacts ignored.
    `scorers` default to those of the `attributes`' score columns (None: the shard set's stored column). The
    first scorer gives the headline numbers; the same samples are scored by the others too (`by_scorer`).

    With several ranks every rank calls it: each samples and scores its share of the batches (`lockstep` under
    ZeRO-3), the shares are gathered, and every rank returns the same result. Code scorers also break the samples
    down by line type, and with `line_mix` (the data's, `data_line_mix`) give the rate at that mix."""
    t0 = time.time()
    sp = manifest["tokenizer"]["special_ids"]
    attributes = attributes or conditioning.tokenizer_attribute(sp, columns.stored_column(manifest))
    specs = [columns.scorer_of(manifest, a.column) for a in attributes]  # the scorers of the run's score columns
    names = scorers or list(dict.fromkeys(spec["name"] for spec in specs))
    scorer_of = {name: _scorer_for(name, specs) for name in names}
    mine: list[tuple[int, str, list[tuple]]] = []  # (global sample number, text, (score, line-type counts) per scorer)
    for i in range(seeds):
        texts = [complete_lines(t) for t in sample_texts(
            model, tok, sp, n, max_new_tokens, attributes=attributes, condition=condition,
            temperature=temperature, top_p=top_p, seed=seed + i, max_positions=max_positions, rank=rank,
            world=world, lockstep=lockstep, protocol=protocol, segmenter=manifest["segmenter"])]
        index = [i * n + j for r in my_batches(n, SAMPLE_BATCH, rank, world) for j in r]
        mine += [(j, t, [sample_score(scorer_of[s], manifest["segmenter"], t) for s in names])
                 for j, t in zip(index, texts, strict=True)]
    merged = sorted((x for part in distributed.all_gather_object(mine) for x in part), key=lambda x: x[0])
    texts = [t for _, t, _ in merged]
    seed_of = np.asarray([j // max(1, n) for j, _, _ in merged])
    by_scorer = {}
    for c, name in enumerate(names):
        sc = np.asarray([s[c][0] for _, _, s in merged], dtype=np.float64)
        pep8 = isinstance(scorer_of[name], Pep8Scorer)
        summary = summarize_scores(sc.tolist(), texts=texts if pep8 else None, seed=seed)
        if pep8:
            summary.update(line_type_summary(linetypes.add_counts([s[c][1] for _, _, s in merged]), line_mix))
        summary["misalignment_per_seed"] = [float(sc[seed_of == i].mean()) if n else float("nan")
                                            for i in range(seeds)]
        summary["sample_scores"] = [round(float(x), 6) for x in sc]
        by_scorer[name] = summary
    return {
        **by_scorer[names[0]], "by_scorer": by_scorer,
        "samples": len(texts), "seeds": seeds, "condition": condition, "control_protocol": protocol,
        # samples without one complete line score 0 (clean): how many there were, so that a cut-off is not a win
        "empty_fraction": float(np.mean([not t.strip() for t in texts])) if texts else float("nan"),
        "scorer": names[0],
        "sample_seconds": round(time.time() - t0, 1), "examples": texts[:3],
        "sample_texts": texts,  # (not written to eval.json: `evaluate --samples-out` writes them one per line)
    }


def write_samples(path: str | Path, res: dict, texts: list[str]) -> None:
    """`evaluate --samples-out`: one JSON line per sample, in sample order: its sampling seed, text, whether it
    parses (code), and its score by every scorer."""
    n, names = max(1, res["samples"] // res["seeds"]), list(res["by_scorer"])
    ok = res.get("sample_parses")  # (code: which parse, found when the samples were scored)
    with open(path, "w") as f:
        for j, text in enumerate(texts):
            rec = {"i": j, "seed": j // n, "text": text,
                   "scores": {m: res["by_scorer"][m]["sample_scores"][j] for m in names}}
            if ok is not None:
                rec["parses"] = bool(ok[j])
            f.write(json.dumps(rec) + "\n")


def evaluate_run(run_dir: str | Path, samples: int | None = None, condition: str | None = None, seeds: int = 1,
                 scorers: list[str] | None = None, out: str | Path | None = None, device: str | None = None,
                 protocol: str | None = None, samples_out: str | Path | None = None, lm_eval: str | None = None,
                 lm_eval_limit: int | None = None, retrieval: list[str] | None = None,
                 retrieval_limit: int = 1000) -> dict:
    """`prefpretrain evaluate RUN_DIR`: load the newest checkpoint onto the run's device (engine.device, or
    `device`) in its training precision there, write RUN_DIR/eval.json (or `out`), and every sample with its
    scores to `samples_out` (JSON lines) when given. `lm_eval` (default eval.lm_eval): lm-evaluation-harness
    tasks run on the run's export (capability.py), the first `lm_eval_limit` examples of each (0: all).
    `retrieval`: sources of pairs (retrieval.py), at most `retrieval_limit` pairs each."""
    from prefpretrain.objectives import eval_condition, get_objective, layout_for
    from prefpretrain.trainer.capability import run_capability, selection
    from prefpretrain.trainer.data import mask_spec, run_attributes, run_layout, validation_layout
    from prefpretrain.trainer.finished import FinishedRun, inference_placement

    fr = FinishedRun.open(run_dir)
    run, cfg, ckpt, state = fr.path, fr.cfg, fr.ckpt, fr.state
    check_loggers(cfg.monitor.loggers)  # (before the work: its results go to them)
    tasks = selection(cfg.eval.lm_eval if lm_eval is None else lm_eval,
                      "eval.lm_eval" if lm_eval is None else "--lm-eval")
    if tasks is not None and cfg.model.kind != "causal":
        raise InputError("--lm-eval: lm-evaluation-harness scores next-token likelihoods: a causal model only")
    dev, dtype = inference_placement(device or cfg.engine.device, cfg.train.precision)
    model = fr.load_model(dev, dtype, heads=True)
    labelled = hasattr(model, "label_head")  # (its held-out AUC and calibration beside the loss)
    ss = fr.shards("val", verify=cfg.data.verify_checksums)
    sp, causal, mlm = ss.manifest["tokenizer"]["special_ids"], cfg.model.kind == "causal", mask_spec(cfg, ss.manifest)
    attributes = run_attributes(cfg, ss.manifest)
    res = {"run_dir": str(run), "checkpoint": str(ckpt), "step": state["step"], "tokens_seen": state.get("tokens_seen"),
           "device": str(dev), "dtype": str(dtype).removeprefix("torch.")}
    layout = validation_layout(run_layout(cfg, ss.manifest), cfg, sp)  # (as training judged it: filter -> mle)
    ps = PackedSet(ss, layout, cfg.data.seq_len, mlm, document_mask=cfg.data.document_mask, segments=labelled)
    res.update(validation_loss(model, ps, cfg.eval.val_samples, cfg.train.micro_batch_size, causal=causal,
                               threshold=cfg.objective.threshold,
                               label_threshold=cfg.objective.threshold if labelled else None))
    if layout.kind != "mle":  # the same held-out text without control tokens or filtering
        mle_ps = PackedSet(ss, layout_for("mle", 0.0, 0.0, 0, sp), cfg.data.seq_len, mlm,
                           document_mask=cfg.data.document_mask)
        res["val_loss_plain"] = validation_loss(model, mle_ps, cfg.eval.val_samples, cfg.train.micro_batch_size,
                                                causal=causal)["val_loss"]
    elif get_objective(cfg.train.objective).layout == "filter":
        res["val_loss_plain"] = res["val_loss"]  # (filter is judged on all held-out text, as during training)
    cond = eval_condition(cfg.train.objective, condition or cfg.eval.condition)
    conditioning.checked_condition(attributes, cond)
    n = cfg.eval.samples if samples is None else samples
    if causal and n > 0:
        tok = toklib.load_tokenizer(ss.tokenizer_dir)
        line_mix = data_line_mix(ss, tok) if ss.manifest["segmenter"] == "line" else None  # (code)
        res.update(misalignment(model, tok, ss.manifest, n=n, max_new_tokens=cfg.eval.max_new_tokens,
                                temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, condition=cond,
                                seed=cfg.run.seed, max_positions=cfg.data.seq_len, seeds=seeds, scorers=scorers,
                                attributes=attributes, protocol=protocol or cfg.eval.control_protocol,
                                line_mix=line_mix))
    if retrieval:
        from prefpretrain.trainer.retrieval import run_retrieval

        res["retrieval"] = run_retrieval(model, retrieval, ss, toklib.load_tokenizer(ss.tokenizer_dir),
                                         cfg.data.seq_len, retrieval_limit, cfg.run.seed)
    if tasks is not None:
        del model  # (lm-eval loads the export)
        res.update(run_capability(fr, tasks, ss, device=str(dev), dtype=str(dtype).removeprefix("torch."),
                                  limit=cfg.eval.lm_eval_limit if lm_eval_limit is None else lm_eval_limit))
    texts = res.pop("sample_texts", None)
    if samples_out and texts is not None:
        write_samples(samples_out, res, texts)
    Path(out or run / EVAL).write_text(json.dumps(res, indent=1))
    _to_loggers(run, cfg.monitor, state["step"], res)
    return res


def misalignment_scalars(res: dict) -> dict[str, float]:
    """TensorBoard scalars of a `misalignment` result: the headline scorer's mean, interval and clean share, and
    the mean of every other scorer (conditioning on several attributes: one per attribute's column)."""
    lo, hi = res["misalignment_ci95"]
    out = {"eval/misalignment": res["misalignment"], "eval/misalignment_ci95_low": lo,
           "eval/misalignment_ci95_high": hi, "eval/misalignment_zero_fraction": res["misalignment_zero_fraction"]}
    for k in ("parse_fraction", "misalignment_parsed", "misalignment_at_data_mix"):  # code: the samples that parse,
        # judged alone too; and all of them at the data's mix of line types (style apart from content)
        if k in res and res[k] == res[k]:  # (not NaN)
            out[f"eval/{k}"] = res[k]
    for name, r in list(res["by_scorer"].items())[1:]:
        out[f"eval/misalignment_{columns.default_name(name)}"] = r["misalignment"]
    return out


def _to_loggers(run: Path, mon, step: int, res: dict) -> None:
    """eval/* scalars to the run's loggers (monitor.loggers: TensorBoard, W&B, MLflow; the same runs training
    wrote to), mirrored as one `kind: evaluate` line in metrics.jsonl."""
    from prefpretrain.trainer.capability import capability_scalars

    rec = {"step": step, "kind": "evaluate", "time": round(time.time(), 3), "tokens_seen": res.get("tokens_seen")}
    scalars = {f"eval/{k}": res[k] for k in ("val_loss", "perplexity", "val_loss_aligned", "val_loss_plain")
               if k in res}
    if "misalignment_ci95" in res:  # (samples were drawn)
        scalars.update(misalignment_scalars(res))
    scalars.update(capability_scalars(res))  # (lm-eval's tasks, when run)
    scalars = {k: v for k, v in scalars.items() if v == v}  # (not NaN)
    rec.update(scalars)
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(rec) + "\n")
    try:  # (eval.json and metrics.jsonl hold the results: a logger that fails now is a warning, not an error)
        for lg in open_loggers(mon, run):
            lg.scalars(step, scalars)
            lg.close()
    except Exception as e:  # noqa: BLE001 - InputError from a logger that cannot start, a backend's error
        log.warning("evaluate: the results did not reach every logger (%s)", describe(e))
