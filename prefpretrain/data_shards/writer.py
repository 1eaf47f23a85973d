"""Corpus -> scored, tokenized WebDataset shards + binary indexes + manifest.json. Resumable.

One tar sample is one document (key = CHUNK-INDEX, stable across runs):
  KEY.tokens.npy    token ids (uint16 when the vocabulary allows, else int32), EOS appended
  KEY.scores.npy    float16 score of every token (its segment's score)
  KEY.segments.npy  int32 [n_segments, 2]: first token of each segment, and its score's float32 bits
  KEY.json          provenance: source, doc_id, chars
Documents are packed into fixed-length training samples at train start (packing.py), so one shard
set serves every objective and MLE stays true MLE.

Input files are grouped, in sorted order, into chunks of about `shard_size_mb` of output; chunk c
becomes `train-CCCCCC-PPP.tar` (part PPP > 000 only when a chunk outgrows the bound) and
`val-CCCCCC-PPP.tar`. A chunk is finished when its record `_progress/chunk-CCCCCC.json` exists, so an
interrupted run resumes at its unfinished chunks. The chunks are planned once (plan.py) and written by
one or many tasks (task.py, on the engine of engine.py); `merge` writes the manifest. Beside each tar,
`NAME.idx.npy` holds one INDEX_DTYPE record per sample (byte offsets of the sample and of its arrays'
data, counts, mean score): the reader reads exactly the token range a training sample needs, and the
manifest stays small. The output bytes do not depend on the number of tasks or workers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from prefpretrain.data_shards.stats import ScoreStats
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: every index file checksummed in the manifest
MANIFEST = "manifest.json"  # a shard set's table of contents: every file with its checksum, the tokenizer, stats
READABLE_FORMATS = (2, 3)  # 2 (no index checksums) is still read, with a warning: memories of earlier runs are
INDEX_DTYPE = np.dtype([
    ("offset", "<u8"), ("size", "<u8"), ("tokens_at", "<u8"), ("scores_at", "<u8"), ("segments_at", "<u8"),
    ("n_tokens", "<u4"), ("n_segments", "<u4"), ("mean_score", "<f4"),
])


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _atomic_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


class ChunkWriter:
    """The tar part(s) of one split of one chunk, their indexes and statistics."""

    def __init__(self, out: Path, split: str, chunk: int, max_bytes: int, tok_dtype):
        self.out, self.split, self.chunk, self.max_bytes, self.tok_dtype = out, split, chunk, max_bytes, tok_dtype
        self.shards: list[dict] = []
        self.stats = ScoreStats()
        self.n_docs = 0
        self._tar = self._f = None
        self._index: list[tuple] = []

    def _open(self) -> None:
        name = f"{self.split}-{self.chunk:06d}-{len(self.shards):03d}.tar"
        self._tmp = self.out / f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"  # renamed once whole
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close_part
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": 0, "tokens": 0})
        self._index = []

    def _add(self, name: str, data: bytes) -> int:
        """Append a member; return the file offset of its data."""
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
        at = self._f.tell() + 512
        self._tar.addfile(ti, io.BytesIO(data))
        return at

    def _add_npy(self, name: str, a: np.ndarray) -> int:
        b = _npy_bytes(a)
        return self._add(name, b) + len(b) - a.nbytes  # skip the .npy header

    def add(self, enc: dict) -> None:
        if self._tar is None:
            self._open()
        key = f"{self.chunk:06d}-{self.n_docs:07d}"
        start = self._f.tell()
        t_at = self._add_npy(f"{key}.tokens.npy", enc["tokens"].astype(self.tok_dtype))
        s_at = self._add_npy(f"{key}.scores.npy", enc["scores"])
        g_at = self._add_npy(f"{key}.segments.npy", enc["segments"])
        self._add(f"{key}.json", json.dumps(enc["meta"], sort_keys=True).encode())
        end = self._f.tell()
        n_tok = len(enc["tokens"])
        self._index.append((start, end - start, t_at, s_at, g_at, n_tok, len(enc["segments"]), enc["mean_score"]))
        sh = self.shards[-1]
        sh["samples"] += 1
        sh["tokens"] += n_tok
        self.n_docs += 1
        self.stats.add(enc["seg_scores"], enc["seg_lens"])
        if end >= self.max_bytes:
            self.close_part()

    def close_part(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        sh = self.shards[-1]
        path = self.out / sh["name"]
        sh["index"] = sh["name"] + ".idx.npy"
        index = _npy_bytes(np.asarray(self._index, dtype=INDEX_DTYPE))
        sh["index_sha256"] = hashlib.sha256(index).hexdigest()
        sh["bytes"] = self._tmp.stat().st_size
        sh["sha256"] = hashlib.sha256(self._tmp.read_bytes()).hexdigest()
        os.replace(self._tmp, path)  # a part appears whole or not at all (a task killed here leaves a .tmp-*)
        atomic_write(self.out / sh["index"], index)
        self._tar = self._f = None

    def record(self) -> dict:
        self.close_part()
        return {"shards": self.shards, "samples": self.n_docs, "tokens": sum(s["tokens"] for s in self.shards),
                "stats": self.stats.to_state()}


def is_val(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _keep_columns(out: Path, manifest: dict) -> None:
    """A finished shard set sharded again (the same inputs and options: the same tars) keeps its score columns."""
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return
    same = all([sh["sha256"] for sh in old.get("splits", {}).get(s, {}).get("shards", [])] ==
               [sh["sha256"] for sh in manifest["splits"][s]["shards"]] for s in ("train", "val"))
    if same and old.get("columns"):
        manifest["columns"] = old["columns"]


def chunk_record(out: Path, c: int) -> Path:
    """A chunk is finished when this record exists (written last, atomically, by the task that wrote it)."""
    return out / "_progress" / f"chunk-{c:06d}.json"


def finished_chunks(out: Path, n_chunks: int) -> set[int]:
    return {c for c in range(n_chunks) if chunk_record(out, c).is_file()}


def merge(out: Path, p: dict, inputs: list[str], secs: float) -> dict:
    """One manifest from every chunk's record (all must be finished); written last, atomically."""
    n_chunks = len(p["chunks"])
    missing = sorted(set(range(n_chunks)) - finished_chunks(out, n_chunks))
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {n_chunks} chunks are not finished (first: {missing[:5]}); "
                         f"run the same command again to finish them")
    splits = {s: {"samples": 0, "tokens": 0, "shards": [], "stats": ScoreStats()} for s in ("train", "val")}
    skipped: Counter = Counter()
    problems: list[str] = []
    for c in range(n_chunks):
        rec = json.loads(chunk_record(out, c).read_text())
        for s, r in rec["splits"].items():
            sp = splits[s]
            for sh in r["shards"]:
                sp["shards"].append(dict(sh, first_index=sp["samples"]))
                sp["samples"] += sh["samples"]
                sp["tokens"] += sh["tokens"]
            sp["stats"].merge(ScoreStats.from_state(r["stats"]))
        skipped.update(rec["skipped"])
        problems.extend(rec["problems"])
    for line in problems:
        log.warning("shard: skipped %s", line)
    (out / "skipped.log").write_text("".join(line + "\n" for line in problems))
    if splits["train"]["samples"] == 0:
        raise ValueError(f"no documents survived reading; see {out / 'skipped.log'}")
    for sp in splits.values():
        sp["score_stats"] = sp.pop("stats").summary()
    from prefpretrain.data_shards import tokenizer as toklib

    tok = toklib.load_tokenizer(out / "tokenizer")
    st = p["settings"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "prefpretrain shard",
        "inputs": inputs,
        "files": p.get("n_files", len(p["files"])),
        "input_bytes": sum(f[2] for f in p["files"]),
        "tokenizer": {"path": "tokenizer", "hash": p["tokenizer"], "vocab_size": p["vocab_size"],
                      "special_ids": toklib.special_ids(tok)},
        "token_dtype": "uint16" if p["vocab_size"] <= 65535 else "int32",
        "scorer": p["scorer_info"],
        "segmenter": p["segmenter"],
        "val_fraction": st["val_fraction"],
        "shard_size_mb": st["shard_size_mb"],
        "index_dtype": [list(d) for d in INDEX_DTYPE.descr],
        "splits": splits,
        "skipped": dict(sorted(skipped.items())),
        "build_seconds": round(secs, 1),
    }
    _keep_columns(out, manifest)
    _atomic_json(out / MANIFEST, manifest)
    return manifest
