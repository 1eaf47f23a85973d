"""How the data layer's start-up cost grows with the corpus: shard parts and documents.

    .venv/bin/python bench/data_layer_growth.py [--docs 1e6 1e7 1e8] [--shards 1e3 1e4 1e5] [--out FILE.json]

Synthetic shard sets (a manifest, one index file per tar part with random document lengths, a tokenizer; no
tars: opening a set and packing it never read them) from 10^3 to 10^5 parts and 10^6 to 10^8 documents. Each
is opened in a fresh process the way a training rank opens it (ShardSet with checksums on, PackedSet with the
MLE layout, the global order, 1,000 positions of it), twice: cold (the packing index is computed and written)
and warm (it is mapped from the cache). Per step: seconds, and memory as the rank's private heap peak
(tracemalloc: numpy's arrays included) and the file-backed pages it maps (shared by the ranks of a node through
the page cache). Growth exponents are log-log slopes over each axis. One line of JSON; --out keeps it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROBE = r"""
import json, sys, time, tracemalloc
tracemalloc.start()
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.packing import PackedSet
from prefpretrain.data_shards.order import GlobalOrder
from prefpretrain.data_shards.packing import Layout

def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0

out = {}
base = tracemalloc.get_traced_memory()[0]  # the modules' own heap: not the shard set's
def step(name, fn):
    t, before = time.perf_counter(), tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    r = fn()
    out[name + "_s"], out[name + "_heap_peak"] = time.perf_counter() - t, tracemalloc.get_traced_memory()[1] - before
    return r
ss = step("open", lambda: ShardSet(sys.argv[1], "train", verify=True))
ps = step("pack", lambda: PackedSet(ss, Layout("mle"), 256))
order = step("order", lambda: GlobalOrder([len(ps)], [1.0], 0))
step("positions", lambda: [order(j) for j in range(1000)])
out["heap_held"] = tracemalloc.get_traced_memory()[0] - base  # what the rank keeps: manifest, indexes, order
out["mapped_file_bytes"] = rss_file()
out["packed_samples"] = len(ps)
print(json.dumps(out))
"""


def make_set(d: Path, n_shards: int, n_docs: int, tok_dir: Path) -> None:
    """A manifest and `n_shards` index files for `n_docs` documents (random lengths), and the tokenizer."""
    from prefpretrain.data_shards import tokenizer as toklib
    from prefpretrain.data_shards.writer import FORMAT_VERSION, INDEX_DTYPE

    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = np.full(n_shards, n_docs // n_shards)
    per[: n_docs % n_shards] += 1
    shards, first = [], 0
    for s, n in enumerate(per):
        a = np.zeros(n, INDEX_DTYPE)
        a["n_tokens"] = rng.integers(50, 1500, n)
        a["n_segments"] = rng.integers(1, 20, n)
        a["mean_score"] = rng.random(n, dtype=np.float32)
        name = f"train-{s:06d}-000.tar"
        np.save(d / f"{name}.idx.npy", a, allow_pickle=False)
        digest = hashlib.sha256((d / f"{name}.idx.npy").read_bytes()).hexdigest()
        shards.append({"name": name, "samples": int(n), "tokens": int(a["n_tokens"].sum()), "index": f"{name}.idx.npy",
                       "index_sha256": digest, "bytes": 0, "sha256": "0" * 64, "first_index": first})
        first += int(n)
    (d / "tokenizer").mkdir()
    for f in tok_dir.iterdir():
        (d / "tokenizer" / f.name).write_bytes(f.read_bytes())
    empty = {"samples": 0, "tokens": 0, "shards": [], "score_stats": {}}
    manifest = {"format_version": FORMAT_VERSION, "token_dtype": "uint16",
                "tokenizer": {"path": "tokenizer", "hash": toklib.tokenizer_hash(tok_dir), "vocab_size": 300,
                              "special_ids": toklib.special_ids(toklib.load_tokenizer(tok_dir))},
                "splits": {"train": {"samples": first, "tokens": sum(s["tokens"] for s in shards), "shards": shards,
                                     "score_stats": {}}, "val": empty},
                "index_dtype": [list(x) for x in INDEX_DTYPE.descr], "scorer": {"name": "none"}}
    (d / "manifest.json").write_text(json.dumps(manifest))


def probe(d: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(d)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float:
    xs, ys = np.log10(xs), np.log10(np.maximum(ys, 1e-9))
    return float(np.polyfit(xs, ys, 1)[0])


def main() -> None:
    from prefpretrain.data_shards import tokenizer as toklib

    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--shards", type=float, nargs="+", default=[1e3, 1e4, 1e5])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    configs = [(int(a.shards[0]), int(n)) for n in a.docs] + [(int(s), int(a.docs[0])) for s in a.shards[1:]]
    rows = []
    with tempfile.TemporaryDirectory(dir=".", prefix=".growth-") as tmp:
        tok = toklib.train_tokenizer(["def f(x):\n    return x\n"] * 10, 300)
        toklib.save_tokenizer(tok, Path(tmp) / "tok")
        for n_shards, n_docs in configs:
            d = Path(tmp) / f"s{n_shards}_d{n_docs}"
            t0 = time.perf_counter()
            make_set(d, n_shards, n_docs, Path(tmp) / "tok")
            made = time.perf_counter() - t0
            cold, warm = probe(d), probe(d)
            rows.append({"shards": n_shards, "docs": n_docs, "make_s": round(made, 1), "cold": cold, "warm": warm})
            print(json.dumps(rows[-1]), file=sys.stderr)
            for p in d.glob("*.idx.npy"):
                p.unlink()  # (disk: 10^8 documents are 4.8 GB of index)
    by_docs = [r for r in rows if r["shards"] == configs[0][0]]
    by_shards = [r for r in rows if r["docs"] == configs[0][1]]
    res = {"bench": "data_layer_growth", "rows": rows, "exponents": {}}
    for axis, rs in (("docs", by_docs), ("shards", by_shards)):
        xs = [r[axis] for r in rs]
        if len(xs) < 2:  # (one size on this axis: no slope)
            continue
        for when in ("cold", "warm"):
            for k in ("open_s", "pack_s", "open_heap_peak", "pack_heap_peak", "heap_held", "mapped_file_bytes"):
                res["exponents"][f"{when}.{k} vs {axis}"] = round(slope(xs, [r[when][k] for r in rs]), 2)
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
