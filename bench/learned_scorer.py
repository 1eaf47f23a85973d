"""The preference-label head as a scorer (`--scorer learned:RUN`) against the labels it learned from, on held-out code.

    python bench/learned_scorer.py [--work DIR] [--max-files 300] [--steps 400] [--out docs/results/learned_scorer.json]

1. Shards: the interpreter's standard library (first --max-files files), scored by pep8 (violations per character
   of each line), 20 % of the documents held out (`val`); kept in WORK/shards and reused.
2. Train: a small causal LM (GPT-2, hidden 64, 2 layers, 128-token windows) for --steps steps with MLE plus the
   preference-label head (objective.label_head_weight 1.0, threshold 0: a line is preferred when it has no
   violation), 2 ranks on this machine; WORK/run.
3. Score the val split's documents (the segments the shards stored) with `learned:WORK/run` and with pep8 itself,
   one process, side by side, after a warm-up. A line is misaligned for pep8 when its score > 0 (the run's
   threshold), for the learned scorer when 1 - P(preferred) > 0.5.
Reported: the AUC of the learned score against pep8's labels (misaligned = positive; ties count one half), beside
the AUC of a line's length alone; the misaligned share each finds; precision / recall of "misaligned" at 0.5 and
at the cut that flags as many lines as pep8 does; seconds per MB of text of each scorer (the model's loading time
apart). One JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prefpretrain.data_shards.encode import batch_scores  # noqa: E402
from prefpretrain.data_shards.reader import TAR_SCORES, ShardSet  # noqa: E402
from prefpretrain.data_shards.rescore import segment_texts  # noqa: E402
from prefpretrain.data_shards.scorers import get_scorer  # noqa: E402
from prefpretrain.data_shards.sources import Document  # noqa: E402
from prefpretrain.data_shards.tokenizer import load_tokenizer  # noqa: E402


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefpretrain", *args], cwd=ROOT, check=True)


def train_overrides(shards: Path, run: Path, steps: int) -> list[str]:
    return [f"data.shards=[{shards}]", f"run.output_dir={run}", "objective.label_head_weight=1.0",
            "objective.threshold=0.0", "train.objective=mle", f"train.max_steps={steps}", "data.seq_len=128",
            "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "train.micro_batch_size=4",
            "train.global_batch_size=16", "train.lr=3e-3", "train.warmup_steps=20", f"checkpoint.every_steps={steps}",
            f"eval.every_steps={steps}", "eval.val_samples=64", "eval.samples=0", "train.log_every=50"]


def val_documents(shards: Path) -> tuple[list, np.ndarray, np.ndarray]:
    """(document, spans) of every val document as stored, each segment's pep8 score and characters."""
    ss = ShardSet(shards, "val", verify=False, column=TAR_SCORES)
    tok, eos = load_tokenizer(ss.tokenizer_dir), ss.manifest["tokenizer"]["special_ids"]["eos"]
    docs, scores, lens = [], [], []
    for i in range(len(ss)):
        d = ss.read(i)
        text, spans = segment_texts(d, eos, tok)
        docs.append((Document("val", str(i), text), spans))
        scores.append(d["seg_score"])
        lens += [b - a for a, b in spans]
    return docs, np.concatenate(scores).astype(np.float64), np.asarray(lens, np.float64)


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(a positive's score > a negative's), ties one half (Mann-Whitney with mid ranks)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        ranks[a:b] = (a + b + 1) / 2  # mid rank (1-based) of a run of ties
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flagged(pred: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((pred & truth).sum())
    return {"share": float(pred.mean()), "precision": tp / int(pred.sum()) if pred.any() else None,
            "recall": tp / int(truth.sum()) if truth.any() else None}


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/learned_bench")
    ap.add_argument("--max-files", type=int, default=300)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(a.work)
    shards, run = work / "shards", work / "run"
    t_shard = t_train = None
    if not (shards / "manifest.json").is_file():
        t_shard, _ = _timed(lambda: _cli("shard", "--input", "@stdlib", "--max-files", str(a.max_files), "--output",
                                         str(shards), "--scorer", "pep8", "--vocab-size", "2048", "--val-fraction",
                                         "0.2", "--overwrite"))
    if not (run / "checkpoints" / "latest").is_file():
        t_train, _ = _timed(lambda: _cli("launch", "configs/tiny.yaml", "--nproc-per-node", "2",
                                         *train_overrides(shards, run, a.steps)))
    docs, pep8, lens = val_documents(shards)
    truth = pep8 > 0.0  # misaligned for the run's threshold
    mb = sum(len(d.text.encode()) for d, _ in docs) / 1e6
    t_load, learned = _timed(lambda: get_scorer(f"learned:{run}"))
    learned.score_many(docs[:2])  # warm-up
    t_learned, got = _timed(lambda: batch_scores(learned, docs))
    score = np.concatenate(got).astype(np.float64)
    p8 = get_scorer("pep8")
    t_pep8, again = _timed(lambda: [p8.score(d, s) for d, s in docs])
    assert np.allclose(np.concatenate(again), pep8, rtol=1e-3, atol=1e-6), "pep8 does not reproduce the stored scores"
    k = int(truth.sum())
    at_rate = np.zeros(len(score), bool)
    at_rate[np.argsort(-score, kind="mergesort")[:k]] = True
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [e for e in evals if e.get("kind") == "eval"][-1]
    res = {
        "bench": "learned_scorer", "val_documents": len(docs), "val_segments": len(score), "val_mb": round(mb, 3),
        "train": {"steps": a.steps, "overrides": train_overrides(shards, run, a.steps), "seconds": t_train,
                  "eval_label_auc": last_eval.get("eval/label_auc"), "eval_val_loss": last_eval.get("eval/val_loss")},
        "shard_seconds": t_shard,
        "auc_learned": auc(score, truth), "auc_line_length": auc(lens, truth),
        "misaligned_pep8": float(truth.mean()),
        "learned_at_0.5": flagged(score > 0.5, truth), "learned_at_pep8_rate": flagged(at_rate, truth),
        "score_quantiles": {str(q): float(np.quantile(score, q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)},
        "seconds_per_mb": {"learned": round(t_learned / mb, 2), "pep8": round(t_pep8 / mb, 2)},
        "learned_load_seconds": round(t_load, 2), "cpu_threads": torch.get_num_threads(),
        "device": str(learned._device),
    }
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
