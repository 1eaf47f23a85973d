"""`prefpretrain rescore`: a score column for a shard set from its stored segments (the format: columns.py)."""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from prefpretrain.data_shards.columns import NOT_RESCORABLE, check_name, column_file
from prefpretrain.data_shards.reader import TAR_SCORES, ShardSet
from prefpretrain.data_shards.stats import ScoreStats
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)


def segment_texts(doc: dict, eos: int, tok) -> tuple[str, list[tuple[int, int]]]:
    """A read document as its scorer saw it: the decoded text and the character span of each stored segment."""
    ids, starts = doc["tokens"], doc["seg_start"]
    bounds = [*starts.tolist(), len(ids) - (1 if len(ids) and ids[-1] == eos else 0)]
    pieces = [tok.decode(ids[a:max(a, b)].tolist(), skip_special_tokens=False)
              for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    return "".join(pieces), spans


_W: dict = {}  # a scoring process's shard set, scorer and tokenizer


def _init(path: str, split: str, scorer: str, params: dict) -> None:
    from tokenizers import Tokenizer

    from prefpretrain.data_shards.scorers import get_scorer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ss = ShardSet(path, split, verify=True, column=TAR_SCORES)
    tok = Tokenizer.from_file(str(ss.tokenizer_dir / "tokenizer.json"))
    _W.update(ss=ss, scorer=get_scorer(scorer, params), tok=tok, eos=ss.manifest["tokenizer"]["special_ids"]["eos"])


def _score_part(s: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(part, document means, segment scores, segment characters) of tar part s of the worker's split."""
    from prefpretrain.data_shards.sources import Document

    ss, scorer = _W["ss"], _W["scorer"]
    means, segs, lens = [], [], []
    for i in range(int(ss.starts[s]), int(ss.starts[s + 1])):
        doc = ss.read(i)
        text, spans = segment_texts(doc, _W["eos"], _W["tok"])
        meta = doc["meta"]
        sc = np.asarray(scorer.score(Document(meta.get("source", ""), meta.get("doc_id", str(i)), text), spans),
                        dtype=np.float32)
        if len(sc) != len(spans) or not np.isfinite(sc).all():
            raise ValueError(f"{ss.shards[s]['name']} document {i}: scorer returned {len(sc)} scores for "
                             f"{len(spans)} segments (finite: {bool(np.isfinite(sc).all())})")
        ln = np.asarray([b - a for a, b in spans], dtype=np.float64)
        means.append(float((sc * ln).sum() / max(1.0, ln.sum())))
        segs.append(sc)
        lens.append(ln)
    return s, np.asarray(means, np.float32), _cat(segs, np.float32), _cat(lens, np.float64)


def _cat(xs: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)


def rescore(path: str | os.PathLike, scorer: str, column: str | None = None, params: dict | None = None,
            workers: int = 0) -> dict:
    """Add (or replace) score column `column` (default: the scorer's name) to the shard set at `path`, scoring
    every stored segment of both splits with `scorer`; returns the manifest's entry for it."""
    from prefpretrain.data_shards.scorers import get_scorer
    from prefpretrain.data_shards.writer import MANIFEST

    t0, path, params = time.time(), Path(path), params or {}
    sc = get_scorer(scorer, params)  # an unknown scorer or bad parameters: refused before any work
    if sc.name in NOT_RESCORABLE:
        raise ValueError(f"--scorer {sc.name}: cannot rescore, {NOT_RESCORABLE[sc.name]}")
    column = column or sc.name
    check_name(column)
    entry = {"column": column, "scorer": {"name": sc.name, "version": sc.version, "params": sc.params}, "splits": {}}
    for split in ("train", "val"):
        ss = ShardSet(path, split, verify=True, column=TAR_SCORES)
        stats, files = ScoreStats(), {}
        n = len(ss.shards)
        args = (str(path), split, scorer, params)
        with _pool(workers, n, args) as run:
            for s, means, segs, lens in run(_score_part, range(n)):
                name = column_file(ss.shards[s]["name"], column)
                _save(path / name, np.concatenate([means, segs]))
                files[ss.shards[s]["name"]] = {"file": name, "sha256": _sha256(path / name),
                                               "documents": len(means), "segments": len(segs)}
                stats.add(segs, lens)
        entry["splits"][split] = {"files": files, "score_stats": stats.summary()}
    entry["seconds"] = round(time.time() - t0, 1)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.setdefault("columns", {})[column] = entry
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))  # the column exists once this is written
    log.info("rescore: column %r (%s) for %s in %.1fs", column, sc.name, path, entry["seconds"])
    return entry


class _pool:
    """map over tar parts in `workers` spawned processes (0: one per CPU; 1: in this process)."""

    def __init__(self, workers: int, n: int, initargs: tuple):
        self.k = min(max(1, n), workers or os.cpu_count() or 1)
        self.initargs, self.pool = initargs, None

    def __enter__(self):
        if self.k <= 1:
            _init(*self.initargs)
            return lambda fn, items: map(fn, items)
        self.pool = mp.get_context("spawn").Pool(self.k, initializer=_init, initargs=self.initargs)
        return lambda fn, items: self.pool.imap(fn, items, chunksize=1)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _save(path: Path, a: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, a, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()
