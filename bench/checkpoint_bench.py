"""Checkpoint save/load time vs raw torch.save, and recovery time after a SIGKILLed rank, in one run.

    .venv/bin/python bench/checkpoint_bench.py [--shards data/stdlib_pep8] [--precision bf16|fp32]

Model: the demo's GPT-2 (5.3 M parameters), ZeRO-2, bf16 (or --precision: fp32 on a CPU without bf16 units,
where bf16 training is ~20x slower; the baseline writes whatever the checkpoint holds), 2 ranks, a checkpoint
every 10 steps.
Save: our checkpoint (DeepSpeed's save + RNG + per-rank checksums + state.json + `latest`, measured by the
trainer as ckpt/save_seconds) vs `torch.save` of the same objects written the same way: one process per rank,
both at once, no fsync of the .pt files (DeepSpeed's save has none; ours fsyncs only state.json and `latest`)
(baseline = the slower rank). Load: ckpt/load_seconds at resume. Recovery: SIGKILL rank 1
of a `--max-restarts 1` run; time until the next step finishes after the restart.
Goals: save <= 1.5 x raw torch.save; recovery <= 30 s. Prints ONE line of JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefpretrain.trainer import safe_load

ROOT = Path(__file__).resolve().parents[1]


def metrics(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _raw_rank(paths: list[Path], tmp: Path, start, out) -> None:
    safe_load.enforce()  # the run's own files, but still loaded as any checkpoint is: weights-only, allow-listed
    objs = [(p, torch.load(p, map_location="cpu", weights_only=True)) for p in paths]
    start.wait()  # both "ranks" write at once, as the trainer's ranks do
    t0 = time.perf_counter()
    for p, obj in objs:
        torch.save(obj, tmp / f"raw_{p.name}")  # no fsync: DeepSpeed's save of these files does not fsync either
    out.put(time.perf_counter() - t0)


def raw_save_seconds(ckpt: Path, tmp: Path) -> float:
    """torch.save of the same objects written the same way: one process per rank writing its own files at the
    same time, no fsync (DeepSpeed's torch.save of them has none); the slower rank."""
    import multiprocessing as mp

    by_rank: dict[int, list[Path]] = {0: [], 1: []}
    for p in ckpt.glob("*.pt"):
        by_rank[1 if "rank_1_" in p.name else 0].append(p)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_raw_rank, args=(by_rank[r], tmp, start, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def launch(args: list[str], **kw):
    return subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", str(ROOT / "configs" / "demo.yaml"),
                             "--nproc-per-node", "2", *args], cwd=ROOT, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=str(ROOT / "data" / "stdlib_pep8"))
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    a = ap.parse_args()
    if not (Path(a.shards) / "manifest.json").is_file():
        sys.exit(f"no shards at {a.shards}: run `make demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        common = [f"data.shards=[{a.shards}]", "train.log_every=1", "eval.every_steps=0", "eval.val_samples=2",
                  "checkpoint.every_steps=10", "checkpoint.keep_last=10", f"train.precision={a.precision}"]
        assert launch([f"run.output_dir={run}", "train.max_steps=30", *common],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
        saves = [m["ckpt/save_seconds"] for m in metrics(run, "checkpoint") if "ckpt/save_seconds" in m]
        raws = [raw_save_seconds(run / "checkpoints" / "step_00000020", Path(tmp)) for _ in saves]  # as many
        raw = sum(raws) / len(raws)
        ckpt_bytes = sum(p.stat().st_size for p in (run / "checkpoints" / "step_00000020").iterdir())

        # resume (load time), then a killed rank under torchrun elastic (recovery time)
        rec = Path(tmp) / "rec"
        p = launch(["--max-restarts", "1", f"run.output_dir={rec}", "train.max_steps=40", *common],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (rec / "checkpoints" / "latest").is_file():
            time.sleep(0.05)
        time.sleep(1.0)
        pid = None
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and f"run.output_dir={rec}".encode() in (d / "cmdline").read_bytes() \
                        and b"RANK=1" in (d / "environ").read_bytes().split(b"\0"):
                    pid = int(d.name)
            except OSError:
                pass
        last_before = metrics(rec, "train")[-1]["step"]
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        assert p.wait() == 0
        after = [m for m in metrics(rec, "train") if m["time"] > t_kill]
        loads = [m["ckpt/load_seconds"] for m in metrics(rec, "checkpoint") if "ckpt/load_seconds" in m]
    save = sum(saves) / len(saves)
    print(json.dumps({
        "bench": "checkpoint", "precision": a.precision, "checkpoint_mb": round(ckpt_bytes / 1e6, 1),
        "save_seconds": round(save, 3), "save_seconds_each": [round(x, 3) for x in saves],
        "raw_torch_save_seconds": round(raw, 3), "raw_seconds_each": [round(x, 3) for x in raws],
        "save_ratio": round(save / raw, 2), "goal_save_ratio": 1.5,
        "load_seconds": round(loads[-1], 3) if loads else None,
        "recovery_seconds": round(after[0]["time"] - t_kill, 1), "goal_recovery_seconds": 30,
        "step_before_kill": last_before, "first_step_after": after[0]["step"],
    }))


if __name__ == "__main__":
    main()
