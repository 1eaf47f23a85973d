"""The index files beside the tar parts: opened lazily, checked once, at most MAX_OPEN mapped at a time."""
from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import numpy as np

from prefpretrain.data_shards.writer import INDEX_DTYPE
from prefpretrain.errors import InputError


class ShardError(InputError):
    """A shard is missing, truncated, corrupt, or does not match its manifest (one line, exit 2)."""


def _sha256(p: Path) -> str | None:
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Indexes:
    """The tar parts' index files, opened (memory-mapped) and checked against the manifest's sha256 on first use:
    opening a shard set costs a stat per part (its size must be the manifest's count of records), not a read of
    every index, so start-up grows with the number of parts and not of documents."""

    MAX_OPEN = 4096

    def __init__(self, path: Path, shards: list[dict], verify: bool, checksummed: bool):
        self.path, self.shards, self.verify, self.checksummed = path, shards, verify, checksummed
        self._open: dict[int, np.ndarray] = {}  # insertion order = least recently used first
        self._verified: set[int] = set()
        for sh in shards:
            p = path / sh["index"]
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise ShardError(f"{p}: index missing") from None
            need = _npy_header_len(len(str(sh["samples"]))) + sh["samples"] * INDEX_DTYPE.itemsize
            if size != need:
                raise ShardError(f"{p}: {size} bytes where the manifest's {sh['samples']} records take {need} "
                                 f"(index does not match the manifest)")

    def __len__(self) -> int:
        return len(self.shards)

    def _check(self, s: int, data: bytes | None = None) -> None:
        """Index s's sha256 against the manifest, once per process (`data`: its bytes, if already read)."""
        sh, p = self.shards[s], self.path / self.shards[s]["index"]
        if not self.verify or s in self._verified:
            return
        if "index_sha256" not in sh:
            if self.checksummed:
                raise ShardError(f"{p}: the manifest records no checksum for it")
            return
        digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256(p)
        if digest != sh["index_sha256"]:  # (a flipped bit would shift every token read)
            raise ShardError(f"{p}: sha256 mismatch (damaged index)")
        self._verified.add(s)

    def __getitem__(self, s: int) -> np.ndarray:
        """Index s memory-mapped; at most MAX_OPEN stay mapped (a process may map only ~65k regions)."""
        a = self._open.pop(s, None)
        if a is None:
            self._check(s)
            p = self.path / self.shards[s]["index"]
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ShardError(f"{p}: unreadable index ({e})") from None
            self._match(s, a)
            while len(self._open) >= self.MAX_OPEN:
                self._open.pop(next(iter(self._open)))
        self._open[s] = a  # (most recently used last)
        return a

    def column(self, s: int, name: str) -> np.ndarray:
        """One field of index s, read with one pass over its file (hashed from the same bytes), not kept mapped:
        the packing index reads every part once."""
        if s in self._open:
            return np.array(self._open[s][name])
        p = self.path / self.shards[s]["index"]
        try:
            data = p.read_bytes()
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ShardError(f"{p}: unreadable index ({e})") from None
        self._check(s, data)
        self._match(s, a)
        return np.array(a[name])

    def _match(self, s: int, a: np.ndarray) -> None:
        if a.dtype != INDEX_DTYPE or len(a) != self.shards[s]["samples"]:
            raise ShardError(f"{self.path / self.shards[s]['index']}: index does not match the manifest")


@functools.lru_cache(maxsize=32)
def _npy_header_len(digits: int) -> int:
    """Bytes of the header np.save writes before INDEX_DTYPE records (a count of `digits` digits)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(INDEX_DTYPE),
                                               "fortran_order": False, "shape": (10 ** (digits - 1),)})
    return len(buf.getvalue())
