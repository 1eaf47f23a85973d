"""The PHF protocol at GPU scale (ready for a GPU machine; not run here: no GPU was lent to this project yet).

    .venv/bin/python bench/gpu_phf.py [--steps 6000] [--samples 512] [--out runs/gpu_phf]

1. Gathers every installed `.py` tree on the machine it runs on (stdlib, site-packages, dist-packages),
   deduplicated by content, so nothing large has to be copied there; leaves out tests and codec tables.
2. Shards it with the `pep8_style` scorer (per line) and a 32 k BPE.
3. Trains a GPT-2-small-sized model (12 x 768, ~124 M parameters) with `mle` and with `conditional` on the
   same tokens (bf16, ZeRO-2, all local GPUs; ~10 minutes each on one H200 at the default steps).
4. Evaluates both with the misalignment protocol (N samples, bootstrap intervals, both pep8 scorers) and
   prints MLE / conditional with an interval, plus the control check (misaligned / aligned).
Goal: conditional beats MLE by >= 3x at this scale. Ends with ONE line of JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from phf_experiment import bootstrap_ci_of, ratio_ci  # noqa: E402

SKIP_PARTS = {"test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}


def gather(dst: Path, max_mb: float) -> dict:
    roots = {Path(sysconfig.get_paths()["stdlib"]), *map(Path, site.getsitepackages())}
    roots |= {p for p in Path("/usr/lib").glob("python3*/dist-packages")}
    seen, n, size = set(), 0, 0
    dst.mkdir(parents=True, exist_ok=True)
    for root in sorted(roots):
        for f in sorted(root.rglob("*.py")):
            if SKIP_PARTS & set(f.relative_to(root).parts) or not f.is_file():
                continue
            data = f.read_bytes()
            h = hashlib.sha1(data).hexdigest()
            if h in seen or len(data) > 1_000_000:
                continue
            seen.add(h)
            (dst / f"{h[:2]}").mkdir(exist_ok=True)
            (dst / h[:2] / f"{h}.py").write_bytes(data)
            n, size = n + 1, size + len(data)
            if size > max_mb * 1e6:
                return {"files": n, "mb": size / 1e6, "roots": [str(r) for r in roots]}
    return {"files": n, "mb": size / 1e6, "roots": [str(r) for r in roots]}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefpretrain", *args], cwd=ROOT, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--max-corpus-mb", type=float, default=400.0)
    ap.add_argument("--out", default="runs/gpu_phf")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_phf.py needs a GPU")
    gpus = torch.cuda.device_count()
    out = Path(a.out).resolve()
    corpus, shards = out / "corpus", out / "shards"
    if not (shards / "manifest.json").is_file():
        shutil.rmtree(corpus, ignore_errors=True)
        info = gather(corpus, a.max_corpus_mb)
        print(f"corpus: {info['files']} unique .py files, {info['mb']:.0f} MB", flush=True)
        cli("shard", "--input", str(corpus), "--output", str(shards), "--scorer", "pep8_style", "--vocab-size", "32768",
            "--workers", str(max(1, len(os.sched_getaffinity(0)) - 1)))
    micro = 16
    glob = micro * gpus * 2
    res = {}
    for obj in ("mle", "conditional"):
        run = out / obj
        over = [f"run.output_dir={run}", f"data.shards=[{shards}]", "data.seq_len=512", "model.hidden_size=768",
                "model.num_layers=12", "model.num_heads=12", f"train.objective={obj}", f"train.max_steps={a.steps}",
                f"train.micro_batch_size={micro}", f"train.global_batch_size={glob}", "train.lr=6.0e-4",
                "train.min_lr=6.0e-5", "train.warmup_steps=300", "train.precision=bf16", "train.log_every=50",
                "engine.zero_stage=2", "engine.device=cuda", "checkpoint.every_steps=1000", "eval.every_steps=1000",
                "eval.samples=0", "eval.max_new_tokens=256", f"launch.nproc_per_node={gpus}",
                "objective.threshold=0.0", "objective.drop_prob=0.1"]
        if not (run / "summary.json").is_file():
            cli("run", str(ROOT / "configs" / "experiments" / f"pep8_style_{obj}.yaml"), *over)
        conds = ["auto", "misaligned"] if obj == "conditional" else ["auto"]
        for c in conds:
            cli("evaluate", str(run), "--samples", str(a.samples), "--condition", c, "--scorer", "pep8_style,pep8",
                "--out", str(run / f"eval_{c}.json"), "--samples-out", str(run / f"eval_{c}.samples.jsonl"))
            res[(obj, c)] = json.loads((run / f"eval_{c}.json").read_text())
    import numpy as np

    def scores(key, sc, parsed=False):  # parsed: the samples that parse alone
        by = res[key]["by_scorer"][sc]
        x = np.asarray(by["sample_scores"])
        return x[np.asarray(by["sample_parses"], dtype=bool)] if parsed else x

    summary = {"gpus": gpus, "steps": a.steps, "samples": a.samples,
               "parse_fraction": {k[0] + "_" + k[1]: res[k]["parse_fraction"] for k in res}}
    for sc in ("pep8_style", "pep8"):
        for tag, parsed in (("", False), ("_parsed", True)):
            m, c = scores(("mle", "auto"), sc, parsed), scores(("conditional", "auto"), sc, parsed)
            mis = scores(("conditional", "misaligned"), sc, parsed)
            summary[sc + tag] = {"mle": bootstrap_ci_of(m), "conditional": bootstrap_ci_of(c),
                                 "misaligned": bootstrap_ci_of(mis), "mle_over_conditional": ratio_ci(m, c),
                                 "misaligned_over_aligned": ratio_ci(mis, c)}
    summary["val_loss"] = {o: res[(o, "auto")].get("val_loss_plain", res[(o, "auto")]["val_loss"])
                           for o in ("mle", "conditional")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
