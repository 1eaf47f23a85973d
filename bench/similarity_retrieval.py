"""The sentence-similarity task (objective.similarity_weight), measured offline: runs trained side by side with
the same config, seed and steps, with and without the auxiliary loss, then `prefpretrain evaluate --retrieval`
on each (docs/evaluation.md#retrieval) with the LM's validation loss beside it.

    .venv/bin/python bench/similarity_retrieval.py [--steps 400] [--weight 0.2] [--variants base,neighbour]
        [--seed 1] [--work /tmp/similarity_bench] [--out docs/results/similarity_retrieval.json]

Data: the interpreter's stdlib top-level modules plus idlelib/ and tkinter/ (242 files for CPython 3.11),
pep8-scored and sharded with a 4096-token BPE, 10 % of the documents held out as the validation split. Model: a
causal GPT-2 4 x 128 (1.3 M parameters), seq 128, 16 samples per step on 2 CPU ranks (ZeRO-2, fp32), MLE, lr 1e-3;
a masked-LM pair (`masked_base,masked_neighbour`: BERT of the same size, 15 % masking) if asked.
Variants: base (weight 0), neighbour (weight W, the next segment of the document as the positive), dropout_base
(weight 0, model.dropout 0.1) and dropout (weight W, the dropout view as the positive, model.dropout 0.1).
Retrieval sources: `val` (adjacent segments, i.e. lines, of the validation split) and docstring -> body pairs of
held-out stdlib packages that are not in the training shards (asyncio, email, json, ...), at most 1000 pairs each.
A run already in WORK with its final checkpoint is reused (its train_seconds: null). Prints ONE line of JSON (also
written to --out).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ["asyncio", "email", "json", "multiprocessing", "unittest", "importlib", "logging", "http", "urllib",
           "concurrent", "xml", "sqlite3", "ctypes", "tomllib", "wsgiref", "dbm", "zoneinfo", "html", "collections"]
COMMON = ["data.seq_len=128", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
          "train.objective=mle", "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=1e-3",
          "train.warmup_steps=40", "train.log_every=50", "eval.every_steps=200", "eval.val_samples=128",
          "eval.samples=0"]
MASKED = ["model.kind=masked", "model.arch=bert"]


def variant(name: str, weight: float) -> list[str]:
    w = {"base": 0.0, "neighbour": weight, "dropout_base": 0.0, "dropout": weight}[name.removeprefix("masked_")]
    out = [f"objective.similarity_weight={w}"]
    if name.removeprefix("masked_").startswith("dropout"):
        out += ["model.dropout=0.1"] + (["objective.similarity_positive=dropout"] if w else [])
    return out + (MASKED if name.startswith("masked_") else [])


def shards(work: Path) -> Path:
    out = work / "shards"
    if not (out / "manifest.json").is_file():
        std = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(std.glob("*.py")) + sorted(std.glob("idlelib/*.py")) + sorted(std.glob("tkinter/*.py"))
        subprocess.run([sys.executable, "-m", "prefpretrain", "shard", "--input", *map(str, files), "--output",
                        str(out), "--scorer", "pep8", "--vocab-size", "4096", "--val-fraction", "0.1", "--workers",
                        "2", "--overwrite"], check=True, cwd=ROOT, capture_output=True)
    return out


def heldout(work: Path) -> Path:
    """A copy of the held-out packages' Python files (one directory: one retrieval source)."""
    out = work / "heldout"
    if not out.is_dir():
        std = Path(sysconfig.get_paths()["stdlib"])
        for pkg in HELDOUT:
            for f in sorted((std / pkg).rglob("*.py")):
                if "test" not in f.relative_to(std).parts[1:-1]:
                    dest = out / f.relative_to(std)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, dest)
    return out


def train(run: Path, data: Path, steps: int, extra: list[str]) -> float | None:
    if (run / "checkpoints" / f"step_{steps:08d}").is_dir():
        return None  # (reused)
    t = time.time()
    cmd = [sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", "--nproc-per-node", "2",
           f"data.shards=[{data}]", f"run.output_dir={run}", f"train.max_steps={steps}",
           f"checkpoint.every_steps={steps}", *COMMON, *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return round(time.time() - t, 1)


def evaluate(run: Path, sources: str) -> dict:
    subprocess.run([sys.executable, "-m", "prefpretrain", "evaluate", str(run), "--samples", "0", "--device", "cpu",
                    "--retrieval", sources, "--retrieval-limit", "1000"], check=True, cwd=ROOT, capture_output=True)
    return json.loads((run / "eval.json").read_text())


def last_train(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"][-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--weight", type=float, default=0.2)
    ap.add_argument("--variants", default="base,neighbour")
    ap.add_argument("--seed", type=int, default=1, help="run.seed (runs of a seed other than 1: NAME_seedN)")
    ap.add_argument("--tag", default="", help="suffix of the run directories of the non-base variants (another "
                    "weight, or a rerun), so that existing runs of the same name are not reused")
    ap.add_argument("--work", default="/tmp/similarity_bench")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "similarity_retrieval.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data, held = shards(work), heldout(work)
    res = {"bench": "similarity_retrieval", "steps": a.steps, "weight": a.weight, "seed": a.seed, "tag": a.tag,
           "config": COMMON,
           "train_files": json.loads((data / "manifest.json").read_text())["files"],
           "heldout_packages": HELDOUT, "heldout_files": len(list(held.rglob("*.py"))), "runs": {}}
    for name in a.variants.split(","):
        tag = f"_{a.tag}" if a.tag and not name.endswith("base") else ""
        run = work / "runs" / ((name if a.seed == 1 else f"{name}_seed{a.seed}") + tag)
        seconds = train(run, data, a.steps, [f"run.seed={a.seed}", *variant(name, a.weight)])
        ev = evaluate(run, f"val,{held}")
        last = last_train(run)
        ret = {("val" if k == "val" else "docstring_body"): v for k, v in ev["retrieval"].items()}
        res["runs"][name] = {"overrides": variant(name, a.weight), "train_seconds": seconds,
                             "val_loss": ev["val_loss"], "final_train_nll": last.get("nll"),
                             "train_similarity_accuracy": last.get("similarity_accuracy"), "retrieval": ret}
    line = json.dumps(res)
    print(line)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
