"""Reader throughput on 2 ranks vs what training consumes, and bytes read per rank, in one run.

    .venv/bin/python bench/reader_throughput.py [--shards data/stdlib_pep8] [--steps 40]

Baseline: the demo trainer (configs/demo.yaml: GPT-2 5.3 M, ZeRO-2, bf16, 2 ranks) runs `--steps`
steps; its samples/s is what training consumes. Measured: 2 processes, each reading its own rank
slice of the same global order (conditional layout, seq 256, global batch 16) for one epoch, without
training. Goals: reader samples/s >= 20 x training; bytes read per rank <= 1.2 / world of the shard
bytes. Prints ONE line of JSON at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_rank(shards: str, rank: int, world: int, steps: int, q) -> None:
    from prefpretrain.data_shards.loader import MixtureDataset, rank_positions
    from prefpretrain.data_shards.packing import PackedSet
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.objectives import layout_for

    ss = ShardSet(shards, verify=False)
    sp = ss.manifest["tokenizer"]["special_ids"]
    ds = MixtureDataset([PackedSet(ss, layout_for("conditional", 0.0, 0.1, 1, sp), 256)], [1.0], seed=1)
    t0 = time.perf_counter()
    n = 0
    for step in range(steps):
        for mb in rank_positions(step, 8, 16, rank, world):
            for j in mb:
                ds[j]
                n += 1
    q.put({"rank": rank, "samples": n, "seconds": time.perf_counter() - t0, "bytes_read": ss.bytes_read})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=str(ROOT / "data" / "stdlib_pep8"))
    ap.add_argument("--steps", type=int, default=40, help="training steps for the baseline")
    a = ap.parse_args()
    if not (Path(a.shards) / "manifest.json").is_file():
        sys.exit(f"no shards at {a.shards}: run `make demo` (or prefpretrain shard) first")
    from prefpretrain.data_shards.packing import PackedSet
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.objectives import layout_for

    ss = ShardSet(a.shards, verify=False)
    sp = ss.manifest["tokenizer"]["special_ids"]
    n_samples = len(PackedSet(ss, layout_for("conditional", 0.0, 0.1, 1, sp), 256))
    epoch_steps = n_samples // 16
    shard_bytes = sum(sh["bytes"] for sh in ss.shards)

    world = 2
    q = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=read_rank, args=(a.shards, r, world, epoch_steps, q))
             for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    res = sorted((q.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    reader_rate = sum(r["samples"] for r in res) / max(r["seconds"] for r in res)

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "prefpretrain", "launch", str(ROOT / "configs" / "demo.yaml"),
               f"data.shards=[{a.shards}]", f"run.output_dir={tmp}/run", f"train.max_steps={a.steps}",
               "train.log_every=5", "checkpoint.every_steps=0", "eval.every_steps=0", "eval.val_samples=8"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        ms = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        tps = [m["tokens_per_s"] for m in ms if m["kind"] == "train"][1:]  # skip the warm-up window
    train_rate = sum(tps) / len(tps) / 256
    out = {
        "bench": "reader_throughput", "world": world, "epoch_samples": epoch_steps * 16,
        "reader_samples_per_s": round(reader_rate, 1), "train_samples_per_s": round(train_rate, 2),
        "ratio_reader_vs_training": round(reader_rate / train_rate, 1), "goal_ratio": 20,
        "shard_bytes": shard_bytes, "bytes_read_per_rank": [r["bytes_read"] for r in res],
        "bytes_per_rank_vs_total_over_world": [round(r["bytes_read"] / (shard_bytes / world), 3) for r in res],
        "goal_bytes": 1.2, "reader_wall_s": round(wall, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
