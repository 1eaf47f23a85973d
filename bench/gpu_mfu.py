"""MFU of a ~1 B-parameter Llama through the full trainer (`prefpretrain launch`), and fp16's overflow path.

    python bench/gpu_mfu.py [--gpus 1] [--steps 30] [--micro 8] [--zero 2] [--attn sdpa] [--compile]
                            [--chunked-ce] [--grad-ckpt] [--shards DIR] [--skip-fp16]
    python bench/gpu_mfu.py --smoke --shards data/tiny     # the same launches and parsing on CPU, tiny Llama

mfu:  a Llama (hidden 2048, 16 layers, 16 heads, MLP 5632, vocab 32 k, seq 2048; 1.1 B parameters) trained for
      --steps steps in bf16 at ZeRO --zero; the trainer's own perf/mfu: model FLOPs per token (6 N + 12 L H Q T,
      PaLM appendix B) x tokens/s over the device's datasheet peak (989 TFLOP/s dense bf16 on an H100/H200).
      Goal: >= 50 % on an H200. The speed levers switch on from the command line.
fp16: a tiny model in fp16 whose initial loss scale 2^32 overflows: DeepSpeed skips those steps (halving the
      scale), the trainer counts them (train/skipped_steps) and goes on training; passes when some steps were
      skipped, the run finished, and the last steps were applied.
Every part's result is printed, even when another part fails: ONE line of JSON, exit status 1 if a part failed.
--smoke runs on CPU with a tiny Llama (the fp16 part in bf16: CPU has no fp16, so only its launch and
parsing are exercised, without a verdict); tests/test_engine.py runs it.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = ["model.arch=llama", "model.hidden_size=2048", "model.num_layers=16", "model.num_heads=16",
            "model.intermediate_size=5632", "data.seq_len=2048"]
LLAMA_TINY = ["model.arch=llama", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=128", "data.seq_len=64"]
QUIET = ["checkpoint.every_steps=0", "eval.every_steps=0", "eval.val_samples=4", "eval.samples=0"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`prefpretrain ARGS`; raises with the end of its log when it fails."""
    r = subprocess.run([sys.executable, "-m", "prefpretrain", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"prefpretrain {args[0]} exited {r.returncode}:\n{r.stderr[-2500:]}")
    return r


def metrics(run: Path, kind: str = "train") -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["kind"] == kind]


def shard(out: str, vocab: int = 32000, max_files: int = 0) -> str:
    """The interpreter's standard library, scored by pycodestyle (unless `out` holds a shard set already)."""
    if not (Path(out) / "manifest.json").is_file():
        cli("shard", "--input", "@stdlib", "--output", out, "--vocab-size", str(vocab), "--workers", "8",
            *(["--max-files", str(max_files)] if max_files else []))
    return out


def run_part(results: dict, name: str, fn, *args) -> None:
    """fn(*args) -> dict stored under `name` with its time; a failure is stored as an error, not raised."""
    t0 = time.time()
    try:
        results[name] = dict(fn(*args), seconds=round(time.time() - t0, 1))
    except Exception as e:  # noqa: BLE001 - every part reports, whatever the others do
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}", "seconds": round(time.time() - t0, 1)}


def mfu_part(a, shards: str, run: Path) -> dict:
    model = LLAMA_TINY if a.smoke else LLAMA_1B
    levers = [f"model.attn_implementation={a.attn}", f"train.compile={str(a.compile).lower()}",
              f"train.cross_entropy={'chunked' if a.chunked_ce else 'torch'}",
              f"model.gradient_checkpointing={str(a.grad_ckpt).lower()}"]
    cli("launch", str(ROOT / "configs" / "demo.yaml"), "--nproc-per-node", str(a.gpus), f"data.shards=[{shards}]",
        f"run.output_dir={run}", *model, *levers, f"train.max_steps={a.steps}", f"train.micro_batch_size={a.micro}",
        f"train.global_batch_size={a.micro * a.gpus}", "train.precision=bf16", f"engine.zero_stage={a.zero}",
        f"train.log_every={2 if a.smoke else 5}", "train.warmup_steps=5", "train.lr=3.0e-4", "train.min_lr=3.0e-5",
        "train.objective=mle", "checkpoint.at_end=false", *QUIET)  # a 1.1 B model's checkpoint: ~15 GB, minutes
    train = metrics(run)[1:]  # the first window holds start-up (and compilation)
    info = json.loads((run / "run_info.json").read_text())
    rank0 = json.loads((run / "ranks" / "rank0.json").read_text())
    return {"device": rank0["device"], "n_params": info["n_params"], "zero": a.zero, "micro": a.micro,
            "seq_len": 64 if a.smoke else 2048, "levers": levers, "peak_flops_source": info["peak_flops_source"],
            "peak_tflops": info["peak_flops_per_rank"] / 1e12,
            "model_flops_per_token": info["model_flops_per_token"],
            "tokens_per_s": sum(m["tokens_per_s"] for m in train) / len(train),
            "mfu": sum(m["mfu"] for m in train) / len(train), "goal_mfu": 0.5,
            "step_time_s": sum(m["step_time_s"] for m in train) / len(train),
            "cuda_max_allocated_gb": max(m.get("cuda_max_allocated_gb", 0) for m in train)}


def fp16_verdict(ms: list[dict], steps: int) -> dict:
    """From a run's per-step metrics: how many steps were skipped, and whether training went on after them."""
    skipped = [int(m["skipped_steps"]) for m in ms]
    losses = [m["loss"] for m in ms]
    tail_applied = len(skipped) >= 5 and skipped[-1] == skipped[-5]  # the last 4 steps were not skipped
    return {"steps": len(ms), "skipped_steps": skipped[-1] if skipped else None, "last_loss": losses[-1] if losses
            else None, "passed": bool(len(ms) == steps and 0 < skipped[-1] < steps and tail_applied
                                      and math.isfinite(losses[-1]))}


def fp16_part(a, shards: str, run: Path) -> dict:
    steps = 40
    precision = "bf16" if a.smoke else "fp16"  # CPU has no fp16: the smoke run checks the launch and parsing
    cli("launch", str(ROOT / "configs" / "tiny.yaml"), "--nproc-per-node", "1", f"data.shards=[{shards}]",
        f"run.output_dir={run}", f"train.precision={precision}", "engine.loss_scale_power=32",
        f"train.max_steps={steps}", f"train.max_bad_steps={steps}", "train.log_every=1", "train.global_batch_size=2",
        *QUIET)
    out = fp16_verdict(metrics(run), steps)
    if a.smoke:
        out["passed"] = None  # no verdict without fp16
    return dict(out, precision=precision, initial_scale_power=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--chunked-ce", action="store_true", help="train.cross_entropy=chunked")
    ap.add_argument("--grad-ckpt", action="store_true", help="model.gradient_checkpointing=true")
    ap.add_argument("--shards", help="an existing shard set (default: shard the stdlib first)")
    ap.add_argument("--skip-fp16", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny Llama: checks the script itself")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.micro = min(a.steps, 6), 2
    res: dict = {"bench": "gpu_mfu", "smoke": a.smoke, "gpus": a.gpus}
    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if shards is None:
            run_part(res, "shards", lambda: {"path": shard(f"{tmp}/shards")})
            shards = f"{tmp}/shards"
        run_part(res, "mfu", mfu_part, a, shards, Path(tmp) / "mfu")
        if not a.skip_fp16:
            run_part(res, "fp16", fp16_part, a, shards, Path(tmp) / "fp16")
    failed = [k for k, v in res.items() if isinstance(v, dict) and ("error" in v or v.get("passed") is False)]
    res["failed"] = failed
    print(json.dumps(res))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
