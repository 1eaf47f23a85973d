"""Writer throughput vs the scorer alone, measured side by side on the same files.

    .venv/bin/python bench/shard_throughput.py [--workers 2] [--max-files 0]

Baseline: one process reads every file and scores it with pycodestyle (the slow step), nothing else.
Measured: `build_shards` with W workers (read, segment, score, tokenize, tar, index, sha256, manifest),
with the tokenizer already trained so the two measure the same work plus the writing.
Goal: writer MB/s >= 0.9 x W x the single-process scorer rate. Prints ONE line of JSON at the end.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from prefpretrain.data_shards import sources
from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.scorers import get_scorer
from prefpretrain.data_shards.segment import line_spans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-files", type=int, default=0)
    a = ap.parse_args()
    files = sources.expand_inputs(["@stdlib"])
    if a.max_files:
        files = files[: a.max_files]
    paths = [f.path for f in files]
    mb = sum(len(open(p, "rb").read()) for p in paths) / 1e6

    scorer = get_scorer("pep8")
    t0 = time.perf_counter()
    for f in files:
        for d in sources.read_file(f.path, f.name).docs:
            scorer.score(d, line_spans(d.text))
    t_scorer = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        # train the tokenizer once, outside the timed run
        build_shards(ShardOptions(inputs=paths[:50], output=f"{tmp}/tok", workers=1, progress=False))
        t0 = time.perf_counter()
        m = build_shards(ShardOptions(inputs=paths, output=f"{tmp}/out", tokenizer=f"{tmp}/tok/tokenizer",
                                      workers=a.workers, progress=False))
        t_writer = time.perf_counter() - t0
    scorer_rate, writer_rate = mb / t_scorer, mb / t_writer
    res = {
        "bench": "shard_throughput", "files": len(paths), "input_mb": round(mb, 2), "workers": a.workers,
        "scorer_alone_mb_s": round(scorer_rate, 3), "writer_mb_s": round(writer_rate, 3),
        "ratio_vs_workers_x_scorer": round(writer_rate / (a.workers * scorer_rate), 3),
        "goal": 0.9, "documents": m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"],
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
