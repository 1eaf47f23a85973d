"""The replay memory: a uniform reservoir over raw-token windows of every shard set seen, stored as a shard set.

A *window* is up to `seq_len` consecutive raw tokens of one document (documents are cut at multiples of
seq_len; the tail window is shorter). Windows are the reservoir's items: every window of every shard set an
update trains on is offered once, in a fixed order (set, document, window), so the memory is a uniform sample
of everything seen so far, of at most `capacity` windows (capacity x seq_len tokens), whatever the epochs.

The memory is written like any shard set (tar + index + manifest.json + tokenizer/, train split only, one
memory document per window, with its tokens, per-token scores and segments), so `ShardSet` reads it and the
trainer packs it for any objective. `reservoir.json` beside the manifest holds the reservoir's state (windows
seen, capacity, the numpy PCG64 state): the next update continues the same reservoir from there, and does not
need the earlier raw corpus.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefpretrain.data_shards.columns import scorer_of
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.stats import ScoreStats
from prefpretrain.data_shards.writer import FORMAT_VERSION, ChunkWriter, _atomic_json

log = logging.getLogger(__name__)

# one window of one source: source number, document, raw token range [lo, hi)
WINDOW = np.dtype([("src", "<i4"), ("doc", "<i8"), ("lo", "<i8"), ("hi", "<i8")])


@dataclass
class Reservoir:
    """Algorithm R: the first `capacity` items fill it; item t (1-based) then replaces a uniform slot with
    probability capacity / t. `slots` are the items held; `rng` is a PCG64 state (JSON-able)."""

    capacity: int
    seen: int = 0
    rng: dict = field(default_factory=dict)
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, WINDOW))

    @classmethod
    def new(cls, capacity: int, seed: int) -> Reservoir:
        return cls(capacity, 0, np.random.PCG64(seed).state, np.zeros(0, WINDOW))

    def state(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "rng": self.rng}


def reservoir_update(res: Reservoir, items: np.ndarray, chunk: int = 1 << 20) -> Reservoir:
    """Offer `items` (in order) to the reservoir; returns the new state (the argument is not changed)."""
    gen = np.random.Generator(np.random.PCG64())
    gen.bit_generator.state = res.rng
    slots, seen = res.slots.copy(), res.seen
    if len(slots) > res.capacity:  # a smaller bound than before: a uniform subsample of a uniform sample
        slots = slots[np.sort(gen.choice(len(slots), res.capacity, replace=False))]
    k = min(len(items), res.capacity - len(slots))
    slots = np.concatenate([slots, items[:k]])
    seen += k
    for a in range(k, len(items), chunk):
        part = items[a: a + chunk]
        t = seen + 1 + np.arange(len(part), dtype=np.int64)  # 1-based index of each item in the whole stream
        j = gen.integers(0, t)  # uniform on [0, t): the item is kept iff j < capacity, in slot j
        hit = np.flatnonzero(j < res.capacity)
        if len(hit):  # several items may land in one slot: the last one wins (as in the sequential algorithm)
            js = j[hit][::-1]
            _, first = np.unique(js, return_index=True)
            keep = hit[::-1][first]
            slots[j[keep]] = part[keep]
        seen += len(part)
    return Reservoir(res.capacity, seen, gen.bit_generator.state, slots)


def windows(ss: ShardSet, src: int, seq_len: int) -> np.ndarray:
    """Every window of a shard set's documents, in order, computed from the index alone."""
    n = ss.column("n_tokens").astype(np.int64)
    per = (n + seq_len - 1) // seq_len
    out = np.zeros(int(per.sum()), WINDOW)
    out["src"] = src
    out["doc"] = np.repeat(np.arange(len(n)), per)
    first = np.repeat(np.cumsum(per) - per, per)
    out["lo"] = (np.arange(len(out)) - first) * seq_len
    out["hi"] = np.minimum(out["lo"] + seq_len, n[out["doc"]])
    return out


def memory_windows(ss: ShardSet, src: int) -> np.ndarray:
    """A memory shard set's documents are windows already: one item each."""
    n = ss.column("n_tokens").astype(np.int64)
    out = np.zeros(len(n), WINDOW)
    out["src"], out["doc"], out["hi"] = src, np.arange(len(n)), n
    return out


def load_reservoir(mem_dir: Path, capacity: int, seed: int) -> tuple[Reservoir, ShardSet | None]:
    """The reservoir held by a memory directory (None: a fresh one), with its documents as slots of source 0."""
    if mem_dir is None:
        return Reservoir.new(capacity, seed), None
    ss = ShardSet(mem_dir, "train")
    st = json.loads((mem_dir / "reservoir.json").read_text())
    return Reservoir(capacity, int(st["seen"]), st["rng"], memory_windows(ss, 0)), ss


def _window_doc(doc: dict, lo: int, hi: int, mean_score: float, meta: dict) -> dict:
    """The encoded-document dict `ChunkWriter.add` takes, for tokens [lo, hi) of a read document."""
    s0, sc = doc["seg_start"], doc["seg_score"]
    j0 = int(np.searchsorted(s0, lo, side="right") - 1)
    j1 = int(np.searchsorted(s0, hi, side="left"))
    first = np.maximum(s0[j0:j1] - lo, 0)
    scores = sc[j0:j1].astype(np.float32)
    lens = np.diff(np.r_[first, hi - lo]).astype(np.float64)
    return {"tokens": doc["tokens"][lo:hi], "scores": doc["scores"][lo:hi].astype(np.float16),
            "segments": np.stack([first.astype(np.int32), scores.view(np.int32)], axis=1),
            "meta": meta, "mean_score": mean_score, "seg_scores": scores, "seg_lens": lens}


def write_memory(out: Path, res: Reservoir, sources: list[ShardSet], history: list[dict]) -> dict:
    """Materialise the reservoir's windows as a shard set at `out` (atomically: written beside, then renamed).

    Windows are written sorted by (source, document, start): each source document is read once, and the
    slot order does not matter to the reservoir (a replaced slot is uniform)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = sources[0]
    shutil.copytree(base.tokenizer_dir, tmp / "tokenizer")
    tok_dtype = np.dtype(base.manifest["token_dtype"])
    writer = ChunkWriter(tmp, "train", 0, 256 * 10**6, tok_dtype)
    slots = np.sort(res.slots, order=["src", "doc", "lo"])
    cached: tuple[int, int, dict] | None = None
    for w in slots:
        src, d = int(w["src"]), int(w["doc"])
        if cached is None or cached[:2] != (src, d):
            cached = (src, d, sources[src].read(d))
        doc = cached[2]
        mean = sources[src].mean_score(d)  # the source document's (filter keeps its meaning)
        m = doc["meta"]  # provenance survives later updates: the original set, document and token offset
        meta = {"source": m.get("source"), "doc_id": m.get("doc_id"), "from": m.get("from", str(sources[src].path)),
                "offset": int(w["lo"]) + int(m.get("offset", 0))}
        writer.add(_window_doc(doc, int(w["lo"]), int(w["hi"]), mean, meta))
    rec = writer.record()
    sp = {"shards": [dict(sh, first_index=int(i)) for sh, i in
                     zip(rec["shards"], np.cumsum([0] + [s["samples"] for s in rec["shards"]]), strict=False)],
          "samples": rec["samples"], "tokens": rec["tokens"],
          "score_stats": ScoreStats.from_state(rec["stats"]).summary()}
    empty = {"shards": [], "samples": 0, "tokens": 0, "score_stats": ScoreStats().summary()}
    manifest = {
        "format_version": FORMAT_VERSION, "created_by": "prefpretrain continual (replay memory)",
        "inputs": [str(s.path) for s in sources], "files": 0, "input_bytes": 0,
        "tokenizer": dict(base.manifest["tokenizer"], path="tokenizer"), "token_dtype": tok_dtype.name,
        "scorer": scorer_of(base.manifest, None), "segmenter": base.manifest["segmenter"], "val_fraction": 0.0,
        "shard_size_mb": 256.0, "index_dtype": base.manifest["index_dtype"],
        "splits": {"train": sp, "val": empty}, "skipped": {}, "build_seconds": 0.0,
    }
    _atomic_json(tmp / "manifest.json", manifest)
    _atomic_json(tmp / "reservoir.json", dict(res.state(), windows=int(len(slots)), history=history))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("memory %s: %d windows, %d tokens, %d windows seen so far", out, rec["samples"], rec["tokens"], res.seen)
    return manifest


def build_memory(out: Path, start: Path | None, stream: list[str], capacity: int, seq_len: int, seed: int,
                 verify: bool = True) -> dict:
    """The memory after offering every window of the `stream` shard sets to the reservoir held by `start`."""
    res, mem_ss = load_reservoir(start, capacity, seed)
    sources = [mem_ss] if mem_ss is not None else []
    history = json.loads((start / "reservoir.json").read_text()).get("history", []) if start is not None else []
    for path in stream:
        ss = ShardSet(path, "train", verify=verify)
        if sources and ss.tokenizer_hash != sources[0].tokenizer_hash:
            raise ValueError(f"{path}: tokenizer {ss.tokenizer_hash} differs from the memory's "
                             f"{sources[0].tokenizer_hash}")
        items = windows(ss, len(sources), seq_len)
        sources.append(ss)
        res = reservoir_update(res, items)
        history.append({"shards": str(path), "windows": int(len(items)), "seen_after": res.seen})
    if not sources:
        raise ValueError("a replay memory needs at least one shard set")
    return write_memory(Path(out), res, sources, history)
