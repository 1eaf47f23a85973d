"""Shard throughput: the writer vs the scorer alone, and tasks on the engine vs one task, side by side.

    .venv/bin/python bench/shard_throughput.py [--workers 2] [--max-files 0] [--out FILE.json]

Baseline: one process reads every file and scores it with pycodestyle (the slow step), nothing else.
Measured, on the same files with the tokenizer already trained (so every run does the same work):
  default     `shard` as it runs by default: 1 task, W scoring processes
  1 task, 1   one task, one process (the unit the scaling ratio is taken against)
  N tasks     N tasks on datatrove's local executor, one process each (N = W)
All with --shard-size-mb 2 (default here): a chunk, the unit of work a task takes, is one shard's worth of input,
so the 10 MB stdlib makes ~7 chunks (at the default 64 MB it is one chunk, and one task would get all of it).
Engine overhead: the same runs on a tiny input (2 small files), where the wall time is start-up and
bookkeeping (datatrove's logger, completion markers, stats; the spawn of each task process), next to the
task's own work called directly (task.run_task, no engine).
Goal (issue 19): default >= 0.68 x W x the scorer rate (what it was before the engine). One line of JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from prefpretrain.data_shards import plan, sources, task
from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.scorers import get_scorer
from prefpretrain.data_shards.segment import line_spans

SHARD_MB = [2.0]  # the chunk (the unit a task takes) is one shard's worth of input: ~7 chunks of the stdlib


def _timed_build(paths: list[str], out: str, tok: str, tasks: int, workers: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    m = build_shards(ShardOptions(inputs=paths, output=out, tokenizer=tok, workers=workers, tasks=tasks,
                                  shard_size_mb=SHARD_MB[0], progress=False))
    return time.perf_counter() - t0, m


def _direct(paths: list[str], out: str, tok: str) -> float:
    """The plan, then the one task called in this process without the engine, then the merge."""
    from prefpretrain.data_shards.writer import merge

    t0 = time.perf_counter()
    opt = ShardOptions(inputs=paths, output=out, tokenizer=tok, workers=1, shard_size_mb=SHARD_MB[0], progress=False)
    p = plan.make_plan(opt)
    task.run_task(Path(out), 0, 1, 1)
    merge(Path(out), p, paths, 0.0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-files", type=int, default=0)
    ap.add_argument("--shard-size-mb", type=float, default=2.0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    SHARD_MB[0] = a.shard_size_mb
    files = sources.expand_inputs(["@stdlib"])
    if a.max_files:
        files = files[: a.max_files]
    paths = [f.path for f in files]
    mb = sum(f.size for f in files) / 1e6

    scorer = get_scorer("pep8")
    t0 = time.perf_counter()
    for f in files:
        for d in sources.read_file(f.path, f.name).docs:
            scorer.score(d, line_spans(d.text))
    scorer_rate = mb / (time.perf_counter() - t0)

    W = a.workers
    with tempfile.TemporaryDirectory() as tmp:
        build_shards(ShardOptions(inputs=paths[:50], output=f"{tmp}/tok", workers=1, progress=False))
        tok = f"{tmp}/tok/tokenizer"
        t_default, m = _timed_build(paths, f"{tmp}/default", tok, 1, W)
        t_one, _ = _timed_build(paths, f"{tmp}/one", tok, 1, 1)
        t_tasks, m_tasks = _timed_build(paths, f"{tmp}/tasks", tok, W, W)  # W tasks at once, 1 process each
        n_chunks = len(json.loads(Path(f"{tmp}/tasks/_progress/plan.json").read_text())["chunks"])
        same = all(m["splits"][s]["shards"] == m_tasks["splits"][s]["shards"] for s in ("train", "val"))
        tiny = sorted((p for p in paths if Path(p).stat().st_size > 2000), key=lambda p: Path(p).stat().st_size)[:2]
        o_direct = _direct(tiny, f"{tmp}/tiny_direct", tok)
        o_one, _ = _timed_build(tiny, f"{tmp}/tiny1", tok, 1, 1)
        o_tasks, _ = _timed_build(tiny, f"{tmp}/tinyN", tok, W, W)
    res = {
        "bench": "shard_throughput", "files": len(paths), "input_mb": round(mb, 2), "workers": W,
        "shard_size_mb": a.shard_size_mb, "chunks": n_chunks, "train_parts": len(m_tasks["splits"]["train"]["shards"]),
        "scorer_alone_mb_s": round(scorer_rate, 3),
        "default_1_task_mb_s": round(mb / t_default, 3),
        "ratio_default_vs_workers_x_scorer": round(mb / t_default / (W * scorer_rate), 3), "goal": 0.68,
        "one_task_one_process_mb_s": round(mb / t_one, 3),
        f"{W}_tasks_mb_s": round(mb / t_tasks, 3),
        "scaling_tasks_vs_one_task": round(t_one / t_tasks, 3),
        "tasks_vs_default": round(t_default / t_tasks, 3),
        "same_shards": same,
        "tiny_input_s": {"direct_no_engine": round(o_direct, 2), "engine_1_task": round(o_one, 2),
                         f"engine_{W}_tasks": round(o_tasks, 2)},
        "engine_overhead_s": {"1_task": round(o_one - o_direct, 2), f"{W}_tasks": round(o_tasks - o_direct, 2)},
        "documents": m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"],
    }
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
