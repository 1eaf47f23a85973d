"""One shard task: the chunks `task_chunks(rank, world)` of a plan, each scored, tokenized and written.

What a task writes depends only on the plan and its chunks (never on the task count or the worker count),
so any engine may run it anywhere the output directory is shared: datatrove's local, SLURM and Ray
executors call `ShardTask` (engine.py). A chunk is finished when its record exists; a task run again
skips its finished chunks and rewrites an unfinished one from its start (its tar parts are simply
overwritten, and the merge only ever reads the parts a record names).
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefpretrain.data_shards import encode, plan
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.writer import ChunkWriter, is_val
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)


@dataclass
class ShardTask:
    """A datatrove pipeline step (called with (data, rank, world_size)): run one task of the plan in `out`."""

    out: str
    workers: int = 1  # scoring processes inside the task (1: score in the task's own process)
    progress: bool = False

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        forward = None
        if not logging.getLogger().handlers:  # a task process of the engine: our log lines go to its task log
            forward = _ToEngineLog()
            logging.getLogger("prefpretrain").addHandler(forward)
            logging.getLogger("prefpretrain").setLevel(logging.INFO)
        try:
            run_task(Path(self.out), rank, world_size, self.workers, self.progress)
        finally:
            if forward is not None:
                logging.getLogger("prefpretrain").removeHandler(forward)
        return data


class _ToEngineLog(logging.Handler):
    """stdlib logging -> datatrove's logger (its task log file and the task's stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        from datatrove.utils.logging import logger

        logger.log(record.levelname if record.levelno in (10, 20, 30, 40, 50) else "INFO", record.getMessage())


def _tokenizer(out: Path, p: dict):
    plan.check_tokenizer(out, p)
    return toklib.load_tokenizer(out / "tokenizer")


def run_task(out: Path, rank: int, world: int, workers: int = 1, progress: bool = False) -> list[int]:
    """Write this task's unfinished chunks; return the chunks it wrote."""
    from tqdm import tqdm

    p = plan.read_plan(out)
    s, files, chunks = p["settings"], p["files"], p["chunks"]
    mine = plan.task_chunks(len(chunks), rank, world)
    todo = [c for c in mine if not plan.chunk_record(out, c).is_file()]
    log.info("shard task %d of %d: %d chunks, %d finished before", rank, world, len(mine), len(mine) - len(todo))
    if not todo:
        return []
    for c in todo:  # what a killed earlier attempt at these chunks left half-written (never in a manifest)
        for stale in out.glob(f"*-{c:06d}-*.tar.tmp-*"):
            stale.unlink(missing_ok=True)
    tok = _tokenizer(out, p)
    tok_dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.int32
    sizes = [f[2] for f in files]
    # within a chunk, the largest files go to the pool first (less idle time at the chunk's end); the
    # chunk is written in file order once all its results are in, so the bytes do not change
    order = {c: sorted(chunks[c], key=lambda i: (-sizes[i], i)) for c in todo}
    items = [(files[i][0], files[i][1], files[i][3]) for c in todo for i in order[c]]
    total = sum(sizes[i] for c in todo for i in chunks[c])
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"shard {rank}/{world}", disable=not progress,
               mininterval=1.0, smoothing=0.1)
    # the scorer as the plan's settings name it (a learned one pinned to its checkpoint; its name alone, `learned`,
    # does not say which head)
    initargs = (tok.to_str(), s["scorer"], s["scorer_params"], p["segmenter"], s["text_field"], s["score_field"])
    pool = None
    if workers > 1:  # (a killed scoring process breaks the pool: an error, not a hang)
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=encode.init_worker,
                                   initargs=initargs)
        results = pool.map(encode.process_file, items)
    else:
        encode.init_worker(*initargs)
        results = map(encode.process_file, items)
    t_start, done_bytes, skipped = time.time(), 0, 0
    try:
        for n, c in enumerate(todo, 1):
            got = {i: next(results) for i in order[c]}
            rec = _write_chunk(out, c, [got.pop(i) for i in chunks[c]], s, tok_dtype)
            rec["input_bytes"] = sum(sizes[i] for i in chunks[c])
            atomic_write(plan.chunk_record(out, c), json.dumps(rec, indent=1))  # the chunk is finished now
            bar.update(rec["input_bytes"])
            done_bytes += rec["input_bytes"]
            skipped += sum(rec["skipped"].values())
            if not progress:  # plain log lines where there is no progress bar (cluster logs)
                rate = done_bytes / max(1e-9, time.time() - t_start)
                log.info("shard task %d: chunk %d of %d done, %.1f of %.1f MB, %.2f MB/s, ETA %.0fs, %d skipped so far "
                         "(reasons in its record)", rank, n, len(todo), done_bytes / 1e6, total / 1e6, rate / 1e6,
                         (total - done_bytes) / max(rate, 1), skipped)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return todo


def _write_chunk(out: Path, c: int, results: list, s: dict, tok_dtype) -> dict:
    """The tar parts of chunk `c` from its files' encoded documents (in file order); its record."""
    max_bytes = int(s["shard_size_mb"] * 1e6)
    writers = {sp: ChunkWriter(out, sp, c, max_bytes, tok_dtype) for sp in ("train", "val")}
    skipped: Counter = Counter()
    problems: list[str] = []
    for _name, encs, skip, probs in results:
        for enc in encs:
            writers["val" if is_val(enc["meta"]["doc_id"], s["val_fraction"]) else "train"].add(enc)
        skipped.update(skip)
        problems.extend(probs)
    return {"chunk": c, "files": len(results), "splits": {sp: w.record() for sp, w in writers.items()},
            "skipped": dict(skipped), "problems": problems}
