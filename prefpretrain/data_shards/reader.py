"""Random access to documents in a shard set, by the byte offsets in each tar's index.

A rank (or DataLoader worker) opens only the shards it touches and reads only the token ranges its
own samples need (the index records where each array's data starts), so the bytes a rank reads are
about its share of the data. Per-shard indexes are memory-mapped: resident memory is O(shards).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from prefpretrain.data_shards import remote, storage
from prefpretrain.data_shards.indexes import Indexes, ShardError, _sha256  # noqa: F401 - ShardError: re-exported
from prefpretrain.data_shards.writer import FORMAT_VERSION, INDEX_DTYPE, MANIFEST, READABLE_FORMATS

log = logging.getLogger(__name__)
_WARNED: set[str] = set()
MAX_OPEN_PARTS = 64  # tar parts a ShardSet keeps open (least recently used closed first)
WHOLE_TABLE = 1 << 16  # a window's segments come from one read of the document's whole segment table (8 bytes a
# segment) up to this many segments: cheaper than the ~2 log2(n) 4-byte reads of two binary searches
TAR_SCORES = ""  # ShardSet(column=TAR_SCORES): the scores the tars hold, even where a column replaces them


def _per_token(starts: np.ndarray, seg_scores: np.ndarray, a: int, b: int) -> np.ndarray:
    """The score of tokens [a, b): each its segment's (segments given by their first tokens, covering [a, b))."""
    return seg_scores[np.searchsorted(starts, np.arange(a, b), side="right") - 1]


def parse_tar_members(buf: bytes, where: str) -> dict[str, bytes]:
    """Parse consecutive ustar members in `buf` into {extension: data}. Unsafe names are rejected."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos + 512 <= len(buf):
        header = buf[pos: pos + 512]
        if header == b"\0" * 512:
            break
        try:
            ti = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardError(f"{where}: bad tar header at +{pos}: {e}") from None
        name = ti.name
        if name.startswith("/") or ".." in Path(name).parts:
            raise ShardError(f"{where}: unsafe member name {name!r}")
        start = pos + 512
        if start + ti.size > len(buf):
            raise ShardError(f"{where}: member {name} truncated")
        ext = name.split(".", 1)[1] if "." in name else ""
        out[ext] = buf[start: start + ti.size]
        pos = start + (ti.size + 511) // 512 * 512
    return out


class ShardSet:
    """One split ("train" / "val") of a shard directory; documents addressed 0..len-1."""

    def __init__(self, path: str | os.PathLike, split: str = "train", verify: bool = True,
                 column: str | None = None, extra_columns: tuple[str, ...] = ()):
        """`column`: the score column samples carry (columns.py); None: the stored one (or what replaced it),
        TAR_SCORES: the scores the tars hold whatever the manifest says. `extra_columns`: more columns whose segment
        scores `extra_segment_scores` reads (conditioning on several attributes)."""
        self.path = remote.mirror(str(path)) if storage.is_url(str(path)) else Path(path)
        self._origin = remote.origin(self.path)  # a mirror of object storage: tar parts come on first read
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise ShardError(f"{self.path}: no {MANIFEST}")
        try:
            self.manifest = json.loads(mf.read_text())
            fmt = self.manifest.get("format_version")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise ShardError(f"{mf}: unreadable ({type(e).__name__})") from None
        if fmt not in READABLE_FORMATS:
            raise ShardError(f"{self.path}: shard format {fmt}, this prefpretrain reads {READABLE_FORMATS}; "
                             f"re-run `prefpretrain shard`")
        if fmt != FORMAT_VERSION and str(self.path) not in _WARNED:
            _WARNED.add(str(self.path))
            log.warning("%s: shard format %s: its index files carry no checksums (shard again to get them)",
                        self.path, fmt)
        self.split, self.verify = split, verify
        self.shards = self.manifest["splits"][split]["shards"]
        self.tok_dtype = np.dtype(self.manifest["token_dtype"])
        self._check_tokenizer()
        self.indexes = Indexes(self.path, self.shards, verify, fmt == FORMAT_VERSION)
        self.starts = np.cumsum([0] + [sh["samples"] for sh in self.shards])
        self._col_arrays: dict[tuple[int, int], np.ndarray] = {}  # (column number, tar part) -> its file
        self._sources = [self._open_column(c) for c in (column, *extra_columns)]  # [(name, files or None)]
        self.score_column, self._cols = self._sources[0]
        self._seg_offsets: dict[int, np.ndarray] = {}
        self._files: dict[int, object] = {}  # open tar parts, least recently used first
        self._touched: dict[int, float] = {}
        self._pid = os.getpid()
        self._verified: set[int] = set()
        self._bad: dict[int, str] = {}  # shards that failed a check: refused again at once, not re-hashed
        self.bytes_read = 0

    def _open_column(self, column: str | None) -> tuple[str, dict | None]:
        """(the column's name, its files' manifest records per tar part, or None where the tars hold the scores).
        A missing file is refused here; each file is checked (sha256, shape) and memory-mapped when first read."""
        from prefpretrain.data_shards import columns as cols

        stored = cols.stored_column(self.manifest)
        if column == TAR_SCORES:
            return stored, None
        name = column or stored
        entry = self.manifest.get("columns", {}).get(name)
        if entry is None:
            if name == stored:
                return stored, None
            have = ", ".join(cols.columns_of(self.manifest))
            raise ShardError(f"{self.path}: no score column {name!r} (it has {have}; `prefpretrain rescore` adds one)")
        files = entry["splits"][self.split]["files"]
        for sh in self.shards:
            rec = files.get(sh["name"])
            if rec is None or not (self.path / rec["file"]).is_file():
                raise ShardError(f"{self.path}: score column {name!r}: file for {sh['name']} missing")
        return name, files

    def _col(self, s: int, c: int = 0) -> np.ndarray:
        """Tar part s's file of score column c (0: the selected one, then extra_columns), checked once per
        process and memory-mapped."""
        a = self._col_arrays.get((c, s))
        if a is None:
            rec, idx = self._sources[c][1][self.shards[s]["name"]], self.indexes[s]
            p = self.path / rec["file"]
            if self.verify and _sha256(p) != rec["sha256"]:
                raise ShardError(f"{p}: sha256 mismatch (damaged score column)")
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ShardError(f"{p}: unreadable score column ({e})") from None
            if a.dtype != np.float32 or a.shape != (len(idx) + int(np.sum(idx["n_segments"], dtype=np.int64)),):
                raise ShardError(f"{p}: does not match its shard's index")
            while len(self._col_arrays) >= Indexes.MAX_OPEN:  # (mapped regions per process are limited)
                self._col_arrays.pop(next(iter(self._col_arrays)))
            self._col_arrays[(c, s)] = a
        return a

    def score_key(self) -> dict | None:
        """What the samples' scores depend on beyond the tars (packing-cache keys, resume checks): the columns'
        files (None: the tars alone)."""
        keys = [{"column": name, "sha256": [files[sh["name"]]["sha256"] for sh in self.shards] if files else None}
                for name, files in self._sources]
        if len(keys) > 1:
            return {"columns": keys}
        return keys[0] if self._cols is not None else None

    def _column_scores(self, s: int, k: int, j0: int = 0, j1: int | None = None,
                       c: int = 0) -> tuple[np.ndarray, float]:
        """(scores of segments [j0, j1), mean score) of document k of tar part s, from score column c's file."""
        offs = self._seg_offsets.pop(s, None)
        if offs is None:
            if len(self._seg_offsets) >= 16:  # the 16 parts read last: memory stays O(a few shards)
                self._seg_offsets.pop(next(iter(self._seg_offsets)))
            offs = len(self.indexes[s]) + np.concatenate([[0], np.cumsum(self.indexes[s]["n_segments"],
                                                                             dtype=np.int64)])
        self._seg_offsets[s] = offs  # (re-inserted: the dict's order is the order of use)
        a, lo = self._col(s, c), int(offs[k])
        hi = int(offs[k + 1]) if j1 is None else lo + j1
        return np.asarray(a[lo + j0:hi], dtype=np.float32), float(a[k])

    def _check_tokenizer(self) -> None:
        """The tokenizer must be the one the shards were encoded with (always checked: it is small)."""
        from prefpretrain.data_shards.tokenizer import tokenizer_hash

        f = self.tokenizer_dir / "tokenizer.json"
        if not f.is_file():
            raise ShardError(f"{f}: missing (the shards' tokenizer)")
        if tokenizer_hash(f) != self.manifest["tokenizer"]["hash"]:
            raise ShardError(f"{f}: does not match the manifest's tokenizer hash (damaged or replaced)")

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.manifest["tokenizer"]["path"]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def column(self, name: str) -> np.ndarray:
        """One index field for every document (all in memory: 4-8 bytes a document; the packing index reads
        `column_part` shard by shard instead); `mean_score` is the score column's."""
        if not self.indexes:
            return np.zeros(0, INDEX_DTYPE[name])
        return np.concatenate([self.column_part(name, s) for s in range(len(self.indexes))])

    def column_part(self, name: str, s: int) -> np.ndarray:
        """One index field for the documents of tar part s (memory-mapped where it can be)."""
        if name == "mean_score" and self._cols is not None:
            return np.array(self._col(s)[:self.shards[s]["samples"]])
        return self.indexes.column(s, name)

    def mean_score(self, i: int) -> float:
        """Document i's mean score (segments weighted by their characters) in the selected column."""
        s, rec = self._locate(i)
        return float(rec["mean_score"]) if self._cols is None else float(self._col(s)[i - self.starts[s]])

    def _locate(self, i: int) -> tuple[int, np.void]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return s, self.indexes[s][i - self.starts[s]]

    def _file(self, s: int):
        if os.getpid() != self._pid:  # a forked DataLoader worker gets its own handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(s, None)
        if f is not None:
            self._files[s] = f  # most recently used last
            if self._origin is not None and time.monotonic() - self._touched.get(s, 0.0) > 60:
                self._touched[s] = time.monotonic()
                remote.touch(self.path / self.shards[s]["name"])  # (a cached part in use is not evicted first)
        else:
            if s in self._bad:
                raise ShardError(self._bad[s])
            try:
                self._check_shard(s)
            except ShardError as e:
                self._bad[s] = str(e)
                raise
            while len(self._files) >= MAX_OPEN_PARTS:  # bounded: file handles, and cache space evicted parts hold
                self._files.pop(next(iter(self._files))).close()
            try:
                f = open(self.path / self.shards[s]["name"], "rb")  # noqa: SIM115 - random access
            except FileNotFoundError:
                if self._origin is None:
                    raise ShardError(f"{self.path / self.shards[s]['name']}: shard missing") from None
                self._check_shard(s)  # evicted by another rank since the check: fetched again
                f = open(self.path / self.shards[s]["name"], "rb")  # noqa: SIM115
            self._files[s] = f
        return f

    def check_part(self, s: int) -> None:
        """Tar part s checked (size; sha256 once with verify) and opened; ShardError where it is bad."""
        self._file(s)

    def _check_shard(self, s: int) -> None:
        sh = self.shards[s]
        p = self.path / sh["name"]
        if self._origin is not None and not p.is_file():
            try:
                remote.fetch_part(self.path, sh["name"], sh["bytes"], sh["sha256"])  # checked as it streams in
            except (OSError, ValueError) as e:
                raise ShardError(f"{self._origin}/{sh['name']}: {e}") from None
            self._verified.add(s)
        if not p.is_file():
            raise ShardError(f"{p}: shard missing")
        if p.stat().st_size != self.shards[s]["bytes"]:
            raise ShardError(f"{p}: size {p.stat().st_size} != manifest {self.shards[s]['bytes']} (truncated?)")
        if self.verify and s not in self._verified:
            if _sha256(p) != self.shards[s]["sha256"]:
                raise ShardError(f"{p}: sha256 mismatch (corrupt shard)")
            self._verified.add(s)

    def _pread(self, s: int, at: int, n: int) -> bytes:
        f = self._file(s)
        f.seek(at)
        b = f.read(n)
        if len(b) != n:
            raise ShardError(f"{self.shards[s]['name']}: short read at {at}")
        self.bytes_read += n
        return b

    def n_segments(self, i: int) -> int:
        return int(self._locate(i)[1]["n_segments"])

    def segment_start(self, i: int, j: int) -> int:
        """First token of segment j of document i (one 4-byte read)."""
        s, rec = self._locate(i)
        return int(np.frombuffer(self._pread(s, int(rec["segments_at"]) + 8 * j, 4), dtype="<i4")[0])

    def _segment_of(self, i: int, t: int) -> int:
        """The segment of document i holding token t (a binary search of 4-byte reads; the first starts at 0)."""
        lo, hi = 0, self.n_segments(i) - 1
        while lo < hi:
            m = (lo + hi + 1) // 2
            if self.segment_start(i, m) <= t:
                lo = m
            else:
                hi = m - 1
        return lo

    def _covering(self, i: int, a: int, b: int) -> tuple[int, int]:
        """Segments [j0, j1) of document i holding tokens [a, b): all of a document of up to WHOLE_TABLE segments
        (one read of its table), else the ones two binary searches find."""
        n = self.n_segments(i)
        return (0, n) if n <= WHOLE_TABLE else (self._segment_of(i, a), self._segment_of(i, max(a, b - 1)) + 1)

    def segment_indices(self, i: int, a: int, b: int) -> np.ndarray:
        """The segment (its number in document i) of each of tokens [a, b), int64."""
        if b <= a:
            return np.zeros(0, np.int64)
        s, rec = self._locate(i)
        j0, j1 = self._covering(i, a, b)
        starts = self._segment_table(s, rec, j0, j1)[:, 0].astype(np.int64)
        return j0 + np.searchsorted(starts, np.arange(a, b), side="right") - 1

    def read_segments(self, i: int, j0: int = 0, j1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(first token, score) of segments [j0, j1) of document i."""
        s, rec = self._locate(i)
        j1 = int(rec["n_segments"]) if j1 is None else j1
        raw = self._segment_table(s, rec, j0, j1)
        if self._cols is not None:
            return raw[:, 0].astype(np.int64), self._column_scores(s, i - int(self.starts[s]), j0, j1)[0]
        return raw[:, 0].astype(np.int64), np.ascontiguousarray(raw[:, 1]).view(np.float32)

    def _segment_table(self, s: int, rec: np.void, j0: int, j1: int) -> np.ndarray:
        """Rows [j0, j1) of a document's segment table in tar part s: (first token, score as float32 bits)."""
        raw = self._pread(s, int(rec["segments_at"]) + 8 * j0, 8 * (j1 - j0))
        return np.frombuffer(raw, dtype="<i4").reshape(-1, 2)

    def extra_segment_scores(self, i: int, j0: int, j1: int) -> np.ndarray:
        """(extra columns, j1 - j0) float32: the scores of segments [j0, j1) of document i in each extra column."""
        s, rec = self._locate(i)
        rows = []
        for c in range(1, len(self._sources)):
            if self._sources[c][1] is None:  # the tars' own column
                rows.append(np.ascontiguousarray(self._segment_table(s, rec, j0, j1)[:, 1]).view(np.float32))
            else:
                rows.append(self._column_scores(s, i - int(self.starts[s]), j0, j1, c)[0])
        return np.stack(rows) if rows else np.zeros((0, j1 - j0), np.float32)

    def read_tokens(self, i: int, a: int = 0, b: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [a, b) of document i (int64) and their scores (float32), reading only those bytes."""
        s, rec = self._locate(i)
        n = int(rec["n_tokens"])
        b = n if b is None else b
        if not 0 <= a <= b <= n:
            raise IndexError(f"document {i}: token range [{a}, {b}) outside [0, {n})")
        w = self.tok_dtype.itemsize
        tokens = np.frombuffer(self._pread(s, int(rec["tokens_at"]) + a * w, (b - a) * w), dtype=self.tok_dtype)
        if self._cols is not None:  # each token carries its segment's score: read the segments [a, b) covers
            return tokens.astype(np.int64), _per_token(*self.read_segments(i, *self._covering(i, a, b)), a, b)
        scores = np.frombuffer(self._pread(s, int(rec["scores_at"]) + a * 2, (b - a) * 2), dtype="<f2")
        return tokens.astype(np.int64), scores.astype(np.float32)

    def read(self, i: int) -> dict:
        """Document i whole, parsed from its tar members (checks the index against the tar)."""
        s, rec = self._locate(i)
        where = f"{self.shards[s]['name']} sample {i}"
        m = parse_tar_members(self._pread(s, int(rec["offset"]), int(rec["size"])), where)
        try:
            tokens = np.load(io.BytesIO(m["tokens.npy"]), allow_pickle=False).astype(np.int64)
            scores = np.load(io.BytesIO(m["scores.npy"]), allow_pickle=False).astype(np.float32)
            seg = np.load(io.BytesIO(m["segments.npy"]), allow_pickle=False)
            meta = json.loads(m["json"])
        except (KeyError, ValueError) as e:
            raise ShardError(f"{where}: missing or bad member ({e})") from None
        if len(tokens) != rec["n_tokens"] or len(seg) != rec["n_segments"]:
            raise ShardError(f"{where}: does not match its index")
        seg_start, seg_score = seg[:, 0].astype(np.int64), np.ascontiguousarray(seg[:, 1]).view(np.float32)
        if self._cols is not None:
            seg_score = self._column_scores(s, i - int(self.starts[s]))[0]
            scores = _per_token(seg_start, seg_score, 0, len(tokens))
        return {"tokens": tokens, "scores": scores, "seg_start": seg_start, "seg_score": seg_score, "meta": meta}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
