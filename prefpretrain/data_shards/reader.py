"""Random access to documents in a shard set, by the byte offsets in each tar's index.

A rank (or DataLoader worker) opens only the shards it touches and reads only its own samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from prefpretrain.data_shards.writer import FORMAT_VERSION, INDEX_DTYPE


class ShardError(RuntimeError):
    """A shard is missing, truncated, corrupt, or does not match its manifest."""


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


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardSet:
    """One split ("train" / "val") of a shard directory; documents addressed 0..len-1."""

    def __init__(self, path: str | os.PathLike, split: str = "train", verify: bool = True):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise ShardError(f"{self.path}: no manifest.json")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.path}: shard format {self.manifest.get('format_version')} != {FORMAT_VERSION}")
        self.split = split
        self.verify = verify
        self.shards = self.manifest["splits"][split]["shards"]
        idx = []
        for sh in self.shards:
            p = self.path / sh["index"]
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ShardError(f"{p}: unreadable index ({e})") from None
            if a.dtype != INDEX_DTYPE or len(a) != sh["samples"]:
                raise ShardError(f"{p}: index does not match the manifest")
            idx.append(a)
        self.index = np.concatenate(idx) if idx else np.zeros(0, INDEX_DTYPE)
        self.shard_of = np.repeat(np.arange(len(self.shards)), [sh["samples"] for sh in self.shards])
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self._verified: set[int] = set()

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.manifest["tokenizer"]["path"]

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, s: int):
        if os.getpid() != self._pid:  # forked DataLoader worker: own handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            p = self.path / self.shards[s]["name"]
            if not p.is_file():
                raise ShardError(f"{p}: shard missing")
            if p.stat().st_size != self.shards[s]["bytes"]:
                raise ShardError(f"{p}: size {p.stat().st_size} != manifest {self.shards[s]['bytes']} (truncated?)")
            if self.verify and s not in self._verified:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                if h.hexdigest() != self.shards[s]["sha256"]:
                    raise ShardError(f"{p}: sha256 mismatch (corrupt shard)")
                self._verified.add(s)
            f = self._files[s] = open(p, "rb")
        return f

    def read(self, i: int) -> dict:
        """Document i: tokens (int64), scores (float32 per token), seg_start (int64), seg_score (float32)."""
        rec = self.index[i]
        s = int(self.shard_of[i])
        f = self._file(s)
        f.seek(int(rec["offset"]))
        buf = f.read(int(rec["size"]))
        where = f"{self.shards[s]['name']} sample {i}"
        m = parse_tar_members(buf, where)
        try:
            tokens = _load_npy(m["tokens.npy"]).astype(np.int64)
            scores = _load_npy(m["scores.npy"]).astype(np.float32)
            seg = _load_npy(m["segments.npy"])
        except (KeyError, ValueError) as e:
            raise ShardError(f"{where}: missing or bad member ({e})") from None
        if len(tokens) != rec["n_tokens"] or len(seg) != rec["n_segments"]:
            raise ShardError(f"{where}: does not match its index")
        return {"tokens": tokens, "scores": scores, "seg_start": seg[:, 0].astype(np.int64),
                "seg_score": np.ascontiguousarray(seg[:, 1]).view(np.float32)}

    def close(self):
        for f in self._files.values():
            f.close()
        self._files = {}
