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

from prefpretrain.data_shards.columns import NOT_RESCORABLE, check_name, column_file, default_name
from prefpretrain.data_shards.encode import batch_scores, mean_per_char, score_segments
from prefpretrain.data_shards.reader import TAR_SCORES, ShardSet
from prefpretrain.data_shards.stats import ScoreStats
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)


def segment_texts(doc: dict, eos: int, tok) -> tuple[str, list[tuple[int, int]]]:
    """A read document as its scorer saw it: the decoded text and the character span of each stored segment."""
    ids, starts = doc["tokens"], doc["seg_start"]
    bounds = [*starts.tolist(), len(ids) - (1 if len(ids) and ids[-1] == eos else 0)]
    pieces = tok.decode_batch([ids[a:max(a, b)].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                              skip_special_tokens=False)
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    return "".join(pieces), spans


_W: dict = {}  # a scoring process's shard set, scorer and tokenizer


def _init(path: str, split: str, scorer: str, params: dict, made=None) -> None:
    """A scoring process's state; `made`: the scorer already made in this process (not loaded again)."""
    from tokenizers import Tokenizer

    from prefpretrain.data_shards.scorers import get_scorer, runs_a_model

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # one scoring process per core; a learned scorer the parent made and scores with alone keeps its threads
    if runs_a_model(scorer) and (made is None or scorer == "classifier"):
        import torch

        torch.set_num_threads(1)
    ss = ShardSet(path, split, verify=False, column=TAR_SCORES)  # (the parent checked every tar part once)
    tok = Tokenizer.from_file(str(ss.tokenizer_dir / "tokenizer.json"))
    _W.update(ss=ss, scorer=made or get_scorer(scorer, params), tok=tok,
              eos=ss.manifest["tokenizer"]["special_ids"]["eos"])


DOCS_PER_ITEM = 16  # documents per unit of work (a tar part holds many: its documents are shared out)


def _items(ss: ShardSet) -> list[tuple[int, int, int]]:
    """(tar part, first document, end) of every unit of work, in document order."""
    return [(s, lo, min(lo + DOCS_PER_ITEM, int(ss.starts[s + 1])))
            for s in range(len(ss.shards)) for lo in range(int(ss.starts[s]), int(ss.starts[s + 1]), DOCS_PER_ITEM)]


def _score_docs(item: tuple[int, int, int]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(part, document means, segment scores, segment characters) of documents [lo, hi) of tar part s (a scorer
    with `score_many` scores them in one batch, encode.batch_scores)."""
    from prefpretrain.data_shards.sources import Document

    ss, scorer = _W["ss"], _W["scorer"]
    s, lo, hi = item
    docs, wheres = [], []
    for i in range(lo, hi):
        doc = ss.read(i)
        text, spans = segment_texts(doc, _W["eos"], _W["tok"])
        meta, where = doc["meta"], f"{ss.shards[s]['name']} document {i} ({doc['meta'].get('doc_id')})"
        if "chars" in meta and len(text) != meta["chars"]:
            raise ValueError(f"{where}: its tokens decode to {len(text)} characters, the original had "
                             f"{meta['chars']}: this tokenizer does not decode exactly, so a rescore cannot see "
                             f"the text; shard again with the new scorer")
        docs.append((Document(meta.get("source", ""), meta.get("doc_id", str(i)), text), spans))
        wheres.append(where)
    means, segs, lens = [], [], []
    for (doc, spans), given, where in zip(docs, batch_scores(scorer, docs), wheres, strict=True):
        try:
            sc, ln = score_segments(scorer, doc, spans, given)
        except Exception as e:  # noqa: BLE001 - one line naming the document, not a worker's traceback
            raise ValueError(f"{where}: scorer failed ({type(e).__name__}: {e})") from None
        means.append(mean_per_char(sc, ln))
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
    from prefpretrain.data_shards.writer import MANIFEST, _npy_bytes

    t0, path, params = time.time(), Path(path), params or {}
    ShardSet(path, "train", verify=False, column=TAR_SCORES)  # a shard set at all (before loading a scorer)
    sc = get_scorer(scorer, params)  # an unknown scorer or bad parameters: refused before any work
    if sc.name in NOT_RESCORABLE:
        raise ValueError(f"--scorer {sc.name}: cannot rescore, {NOT_RESCORABLE[sc.name]}")
    if sc.name == "learned":  # its processes load the checkpoint this one loaded, not a newer one of the run
        scorer = f"learned:{sc.params['path']}"
    column = column or default_name(sc.name)
    check_name(column)
    tag = os.urandom(4).hex()  # this rescore's files: a column being replaced stays readable until the switch
    entry = {"column": column, "scorer": {"name": sc.name, "version": sc.version, "params": sc.params}, "splits": {}}
    for split in ("train", "val"):
        ss = ShardSet(path, split, verify=True, column=TAR_SCORES)
        for s in range(len(ss.shards)):
            ss.check_part(s)  # every tar part's size and sha256, once, here (the scoring processes trust them)
        stats, files, items = ScoreStats(), {}, _items(ss)
        parts: dict[int, list] = {}
        with _pool(workers, len(items), (str(path), split, scorer, params), sc) as run:
            for (s, _lo, hi), got in zip(items, run(_score_docs, items), strict=True):
                parts.setdefault(s, []).append(got[1:])
                if hi == int(ss.starts[s + 1]):  # the part's last documents: its file is complete
                    means, segs, lens = (np.concatenate(x) for x in zip(*parts.pop(s), strict=True))
                    name, data = column_file(ss.shards[s]["name"], column, tag), _npy_bytes(
                        np.concatenate([means, segs]).astype(np.float32))
                    atomic_write(path / name, data)
                    files[ss.shards[s]["name"]] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                                   "documents": len(means), "segments": len(segs)}
                    stats.add(segs, lens)
        entry["splits"][split] = {"files": files, "score_stats": stats.summary()}
    entry["seconds"] = round(time.time() - t0, 1)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.setdefault("columns", {})[column] = entry
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))  # the column exists once this is written
    keep = {f["file"] for sp in entry["splits"].values() for f in sp["files"].values()}
    for old in path.glob(f"*.tar.score-{column}.*.npy"):  # the replaced column's files, or a killed rescore's
        if old.name not in keep:
            old.unlink()
    log.info("rescore: column %r (%s) for %s in %.1fs", column, sc.name, path, entry["seconds"])
    return entry


class _pool:
    """map over tar parts in `workers` spawned processes (0: one per CPU; 1: in this process)."""

    def __init__(self, workers: int, n: int, initargs: tuple, made=None):
        self.k = min(max(1, n), workers or os.cpu_count() or 1)
        self.initargs, self.pool, self.made = initargs, None, made

    def __enter__(self):
        if self.k <= 1:
            _init(*self.initargs, made=self.made)  # (the scorer the parent made: a model is loaded once)
            return lambda fn, items: map(fn, items)
        self.pool = mp.get_context("spawn").Pool(self.k, initializer=_init, initargs=self.initargs)
        return lambda fn, items: self.pool.imap(fn, items, chunksize=1)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
