"""The full trainer vs a bare torch DDP loop, side by side on the same model and tokens, 2 ranks.

    .venv/bin/python bench/trainer_vs_bare.py [--steps 30] [--repeats 3] [--shards data/stdlib_pep8]

Trainer: `prefpretrain launch` (tar reader + packing without a document mask, DeepSpeed ZeRO-2, logging,
TensorBoard), steady-state tokens/s from metrics.jsonl (first log window dropped). Baseline: bench/bare_loop.py
under torchrun; in bf16 in DeepSpeed's regime (bf16 weights and gradient all-reduce, fp32 master weights) for
the ratio, and also in the autocast regime (fp32 weights, fp32 all-reduce), reported beside it.
Model: GPT-2, 6 layers x 320 (~10 M parameters), seq 256, 16 x 256 tokens per step, fp32 and bf16.
MFU = 6 x params x tokens/s / (sum of the ranks' matmul peaks, measured by each rank in the same run).
--repeats N alternates bare and trainer runs N times per precision and reports the median of the per-pair
ratios with their range (one pair varies by +-3 % on a shared 2-core machine).
Goals: trainer >= 0.97 x bare; trainer MFU >= 65 % (fp32), >= 45 % (bf16). Prints ONE line of JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.hidden_size=320", "model.num_layers=6", "model.num_heads=5"]


def run_trainer(shards: str, precision: str, steps: int, run: Path) -> dict:
    from prefpretrain.launcher.local import child_env

    cmd = [sys.executable, "-m", "prefpretrain", "launch", str(ROOT / "configs" / "demo.yaml"), "--nproc-per-node",
           "2", f"data.shards=[{shards}]", f"run.output_dir={run}", f"train.max_steps={steps}", "train.log_every=5",
           f"train.precision={precision}", "checkpoint.every_steps=0", "eval.every_steps=0", "eval.val_samples=2",
           "data.document_mask=false", *MODEL]  # like for like: the bare loop packs without a document mask
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=child_env(2))
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in ms if m["kind"] == "train"][1:]
    info = json.loads((run / "run_info.json").read_text())
    return {"tokens_per_s": sum(m["tokens_per_s"] for m in train) / len(train), "n_params": info["n_params"],
            "mfu_logged": sum(m["mfu"] for m in train) / len(train)}


def run_bare(shards: str, precision: str, steps: int, regime: str = "autocast") -> dict:
    from prefpretrain.distributed import free_port
    from prefpretrain.launcher.local import child_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(ROOT / "bench" / "bare_loop.py"),
           str(ROOT / "configs" / "demo.yaml"), f"data.shards=[{shards}]", f"train.max_steps={steps}",
           f"train.precision={precision}", *MODEL, "--bf16", regime]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=child_env(2)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=str(ROOT / "data" / "stdlib_pep8"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    if not (Path(a.shards) / "manifest.json").is_file():
        sys.exit(f"no shards at {a.shards}: run `make demo` (or prefpretrain shard) first")
    res = {"bench": "trainer_vs_bare", "world": 2, "steps": a.steps, "repeats": a.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in a.precisions.split(","):
            pairs, regimes = [], []
            for i in range(a.repeats):  # alternate, so slow phases of the machine hit both sides
                bare = run_bare(a.shards, prec, a.steps, "weights" if prec == "bf16" else "autocast")
                if prec == "bf16":  # the other bf16 recipe, for reference
                    regimes.append(run_bare(a.shards, prec, a.steps, "autocast")["tokens_per_s"])
                pairs.append((bare, run_trainer(a.shards, prec, a.steps, Path(tmp) / f"trainer_{prec}_{i}")))
            ratios = [tr["tokens_per_s"] / bare["tokens_per_s"] for bare, tr in pairs]
            bare_tps = statistics.median(b["tokens_per_s"] for b, _ in pairs)
            tr_tps = statistics.median(t["tokens_per_s"] for _, t in pairs)
            peak = statistics.median(sum(b["peak_flops_per_rank"]) for b, _ in pairs)
            n_params = pairs[0][1]["n_params"]
            res[prec] = {
                "trainer_tokens_per_s": round(tr_tps, 1), "bare_tokens_per_s": round(bare_tps, 1),
                "ratio": round(statistics.median(ratios), 3),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "trainer_mfu": round(6 * n_params * tr_tps / peak, 3),
                "bare_mfu": round(6 * n_params * bare_tps / peak, 3),
                "matmul_peak_gflops_2_ranks": round(peak / 1e9, 1), "n_params": n_params,
                "bare_regime": pairs[0][0].get("bf16_regime"),
            }
            if regimes:  # the trainer against the autocast recipe (fp32 weights and gradient all-reduce)
                res[prec]["bare_autocast_tokens_per_s"] = round(statistics.median(regimes), 1)
                res[prec]["ratio_vs_autocast"] = round(tr_tps / statistics.median(regimes), 3)
    res["goals"] = {"ratio": 0.97, "mfu_fp32": 0.65, "mfu_bf16": 0.45}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
