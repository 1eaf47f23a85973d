"""Shard sets on object storage, read through a bounded local cache.

A shard set at a URL is opened from a local mirror: its small files (manifest, tokenizer, the per-tar index
files, score columns) are copied at open; each tar part is downloaded whole the first time a sample of it is
read, its sha256 checked against the manifest while it streams in (the same check as a local shard's), and
kept in the cache until the cache outgrows `data.cache_max_gb`, when the least recently used parts go.

Why whole parts and not range reads: a part is bounded (`shard_size_mb`, 64 MB by default) and read
sequentially within a shuffle window, so one request per part moves the data at full bandwidth where a range
request per sample would pay a round trip per document; and only a whole part can be checked against its
recorded sha256 before a byte of it is trained on. The index makes range reads possible, and a part that is
being evicted stays readable by a rank that has it open (POSIX unlink semantics).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from prefpretrain.data_shards import storage
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)

ORIGIN = "_origin.json"  # in a mirror: the URL it mirrors
SKIP = ("_progress/",)  # what a reader never needs
_settings = {"dir": None, "max_bytes": 50e9}


def configure(cache_dir: str | None, max_gb: float) -> None:
    """Where mirrors live and how large their downloaded parts may grow (the run's data.cache_dir/cache_max_gb)."""
    _settings["dir"], _settings["max_bytes"] = cache_dir, max_gb * 1e9


def cache_root() -> Path:
    d = _settings["dir"] or os.environ.get("PREFPRETRAIN_CACHE") or Path.home() / ".cache" / "prefpretrain"
    return Path(d) / "shards"


def _download(url: str, dest: Path, sha256: str | None = None) -> str:
    """Copy one object to `dest` atomically, hashing it as it streams; return its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    h = hashlib.sha256()
    try:
        with storage.open_url(url) as src, open(tmp, "wb") as f:
            while b := src.read(8 << 20):
                h.update(b)
                f.write(b)
        if sha256 is not None and h.hexdigest() != sha256:
            raise storage.StorageError(f"{url}: sha256 mismatch (the stored shard is damaged)")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def mirror(url: str) -> Path:
    """The local mirror of the shard set at `url`, with its small files fresh from the store."""
    url = url.rstrip("/")
    storage.check_reachable(url)
    fs = storage.filesystem(url)
    try:
        with storage.open_url(f"{url}/manifest.json") as f:
            manifest = f.read()
    except FileNotFoundError:
        raise storage.StorageError(f"{url}: no manifest.json (not a shard set, or not finished)") from None
    # one mirror per URL and manifest: a set sharded again at the same URL gets a fresh one (no stale index)
    d = cache_root() / (hashlib.sha256(url.encode()).hexdigest()[:12] + "-" + hashlib.sha256(manifest).hexdigest()[:8])
    fs.invalidate_cache()  # what the store holds now (a long-lived process may have listed it before)
    prefix = url.split("://", 1)[1]
    sizes = {f[len(prefix) + 1:]: int(i["size"]) for f, i in fs.find(url, detail=True).items()}  # one listing
    for name, size in sizes.items():
        if name.endswith(".tar") or name.startswith(SKIP):
            continue
        p = d / name
        if name != "manifest.json" and (not p.is_file() or p.stat().st_size != size):
            _download(f"{url}/{name}", p)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / "manifest.json", manifest)
    atomic_write(d / ORIGIN, json.dumps({"url": url}))
    return d


def origin(local: Path) -> str | None:
    """The URL a local directory mirrors (None: a shard set of its own)."""
    f = Path(local) / ORIGIN
    return json.loads(f.read_text())["url"] if f.is_file() else None


def fetch_part(local: Path, name: str, size: int, sha256: str) -> Path:
    """Tar part `name` of a mirror, downloaded (and checked) if it is not in the cache; marks it recently used."""
    p = Path(local) / name
    if p.is_file() and p.stat().st_size == size:
        touch(p)
        return p
    url = origin(local)
    if url is None:
        return p  # a local shard set: the reader reports what is missing
    _make_room(size)
    t0 = time.time()
    _download(f"{url}/{name}", p, sha256)
    log.info("shards: fetched %s (%.1f MB) in %.1fs", name, size / 1e6, time.time() - t0)
    return p


def touch(p: Path, every_s: float = 60.0) -> None:
    """Mark a cached part recently used (its mtime orders eviction); at most once a minute per part."""
    try:
        if time.time() - p.stat().st_mtime > every_s:
            os.utime(p)
    except FileNotFoundError:  # evicted by another rank: this one still reads its open handle
        pass


def _make_room(size: int) -> None:
    """Delete the least recently used cached parts until `size` more bytes fit under the bound."""
    limit = _settings["max_bytes"]
    if size > limit:
        raise storage.StorageError(f"a shard part of {size / 1e9:.2f} GB does not fit in data.cache_max_gb "
                                   f"({limit / 1e9:.2f} GB)")
    parts = []
    for p in cache_root().glob("*/*.tar"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another rank evicted it
            continue
        parts.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in parts)
    for _, s, p in sorted(parts):
        if total + size <= limit:
            break
        p.unlink(missing_ok=True)
        total -= s


def upload(local: Path, url: str) -> None:
    """Copy a finished shard set to `url`: every file but the build's own records, the manifest last (a reader
    that finds the manifest finds everything it names)."""
    fs = storage.filesystem(url)
    url = url.rstrip("/")
    files = sorted(p for p in local.rglob("*") if p.is_file() and not str(p.relative_to(local)).startswith(SKIP)
                   and p.name not in ("manifest.json", ORIGIN))
    for p in [*files, local / "manifest.json"]:
        fs.put_file(str(p), f"{url}/{p.relative_to(local)}")
    log.info("shard: uploaded %d files (%.1f MB) to %s", len(files) + 1,
             sum(p.stat().st_size for p in files) / 1e6, url)
