"""Ready for a GPU machine: MFU of a ~1 B-parameter Llama-style model, bf16, ZeRO-2, through the full trainer.

    .venv/bin/python bench/gpu_mfu.py [--gpus 1] [--steps 30] [--peak-tflops 989] [--shards DIR] [--dry-run]
    .venv/bin/python bench/gpu_mfu.py --smoke --shards data/tiny    # the same pipeline on CPU, tiny Llama

Shards the interpreter's stdlib there (no data has to be copied), trains a Llama (hidden 2048, 16 layers,
16 heads, MLP 5632, vocab 32 k, seq 2048) for --steps steps with `prefpretrain launch`, and reads the
trainer's own perf/mfu (6 x params x tokens/s over --peak-tflops per GPU; 989 = H100/H200 dense bf16).
Also checks fp16 on CUDA: a deliberately huge initial loss scale must give skipped, counted steps.
Goal: MFU >= 50 % on an H200. Prints ONE line of JSON. Not run yet: no GPU was available to this project.
--smoke runs the same steps on CPU with a tiny Llama and the matmul-probe peak, without the fp16 part (CPU has
no fp16), so the script's plumbing is tested before a GPU is ever lent (tests/test_engine.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = ["model.arch=llama", "model.hidden_size=2048", "model.num_layers=16", "model.num_heads=16",
            "model.intermediate_size=5632", "data.seq_len=2048"]
LLAMA_TINY = ["model.arch=llama", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=128", "data.seq_len=64"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--shards", help="an existing shard set (default: shard the stdlib first)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, no fp16: checks the script itself")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.micro = min(a.steps, 6), 2
    with tempfile.TemporaryDirectory() as tmp:
        shards, run, run16 = a.shards or f"{tmp}/shards", f"{tmp}/run", f"{tmp}/fp16"
        g = a.micro * a.gpus
        model = LLAMA_TINY if a.smoke else LLAMA_1B
        peak = [] if a.smoke else [f"train.peak_flops={a.peak_tflops * 1e12}"]  # smoke: the CPU matmul probe
        cmds = [] if a.shards else [
            [sys.executable, "-m", "prefpretrain", "shard", "--input", "@stdlib", "--output", shards,
             "--vocab-size", "32000", "--workers", "8"]]
        cmds.append(
            [sys.executable, "-m", "prefpretrain", "launch", str(ROOT / "configs" / "demo.yaml"), "--nproc-per-node",
             str(a.gpus), f"data.shards=[{shards}]", f"run.output_dir={run}", *model,
             f"train.max_steps={a.steps}", f"train.micro_batch_size={a.micro}", f"train.global_batch_size={g}",
             "train.precision=bf16", "engine.zero_stage=2", f"train.log_every={2 if a.smoke else 5}",
             "train.warmup_steps=5", *peak, "checkpoint.every_steps=0", "eval.every_steps=0",
             "eval.val_samples=4", "train.objective=mle"])
        if not a.smoke:
            cmds.append(
                [sys.executable, "-m", "prefpretrain", "launch", str(ROOT / "configs" / "tiny.yaml"),
                 "--nproc-per-node", "1", f"data.shards=[{shards}]", f"run.output_dir={run16}",
                 "train.precision=fp16", "engine.loss_scale_power=40", "train.max_steps=12", "train.log_every=1",
                 "checkpoint.every_steps=0", "train.global_batch_size=2"])
        if a.dry_run:
            for c in cmds:
                print(" ".join(c))
            return
        for c in cmds:
            subprocess.run(c, check=True, cwd=ROOT)
        ms = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in ms if m["kind"] == "train"][1:]
        info = json.loads((Path(run) / "run_info.json").read_text())
        device = json.loads((Path(run) / "ranks" / "rank0.json").read_text())["device"]
        res = {"bench": "gpu_mfu", "smoke": a.smoke, "gpus": a.gpus, "device": device,
               "n_params": info["n_params"], "tokens_per_s": sum(m["tokens_per_s"] for m in train) / len(train),
               "mfu": sum(m["mfu"] for m in train) / len(train), "goal_mfu": 0.5,
               "cuda_max_allocated_gb": max(m.get("cuda_max_allocated_gb", 0) for m in train)}
        if not a.smoke:
            m16 = [json.loads(x) for x in (Path(run16) / "metrics.jsonl").read_text().splitlines()]
            skipped = [m["skipped_steps"] for m in m16 if m["kind"] == "train"]
            res.update({"fp16_skipped_steps": skipped[-1], "fp16_trained_after_skips": skipped[-1] < 12})
        print(json.dumps(res))


if __name__ == "__main__":
    main()
