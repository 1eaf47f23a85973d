"""Documents -> fixed-length training samples, cut for one objective's layout at train start.

Why pack here and not at shard time: one shard set serves every objective. MLE sees the documents
unchanged (true MLE); `filter` leaves out documents whose mean score is above a threshold;
`conditional` inserts a control token before every segment (seeded drop), which changes lengths.
Each layout's per-document lengths follow from the shard index alone (token and segment counts,
mean score; the drop decision is a hash of (seed, document, segment)), so the packing index is a
cumulative sum computed in one vectorised pass, without reading a shard.

That index (one int64 per document) is cached in SHARDS/packing_cache/, keyed by the split's shard
checksums and the layout, and memory-mapped by later starts: every rank of every later run shares one
copy in the page cache instead of building its own (8 GB per rank at 10^9 documents).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prefpretrain.data_shards.order import mix_array
from prefpretrain.data_shards.reader import ShardError, ShardSet

IGNORE = -100
# the per-token arrays of a packed sample (position_ids only with document masking, segment only when asked for)
SAMPLE_ARRAYS = ("input_ids", "labels", "scores", "control", "position_ids", "segment")
SEGMENT_BITS = 24  # a sample's `segment` key: document << SEGMENT_BITS | segment number in the document (-1: none)
CACHE_DIR = "packing_cache"
# how document masking cuts a window into attention blocks (recorded in checkpoints: a run resumes with the layout it
# was trained with): 2 = a document's block opens with the EOS that ends the document before it (1, before
# 2026-12-01: each document's own EOS closed its block)
DOCUMENT_BLOCKS = 2
log = logging.getLogger(__name__)


def segment_key(doc: int, seg: np.ndarray) -> np.ndarray:
    """The `segment` keys of segments `seg` of document `doc`: unique per (document, segment); consecutive
    segments of one document have consecutive keys (the similarity task's neighbours)."""
    return (np.int64(doc) << SEGMENT_BITS) | np.asarray(seg, dtype=np.int64)


@dataclass(frozen=True)
class Control:
    """One attribute's control tokens: a segment scoring <= threshold in its column is preceded by aligned_id, any
    other by misaligned_id."""

    threshold: float
    aligned_id: int
    misaligned_id: int


@dataclass(frozen=True)
class Layout:
    kind: str = "mle"  # mle | filter | conditional
    threshold: float = 0.0  # aligned iff score <= threshold (0 means 0); filter: documents' mean score
    drop_prob: float = 0.0  # conditional: share of control tokens left out (each attribute's independently)
    seed: int = 0
    aligned_id: int = -1  # conditional: the (first) attribute's control tokens
    misaligned_id: int = -1
    more: tuple[Control, ...] = ()  # conditional on several attributes: the others, in order (their scores are the
    # shard set's extra columns, ShardSet(extra_columns=...)); each segment gets one control token per attribute

    @property
    def controls(self) -> tuple[Control, ...]:
        return (Control(self.threshold, self.aligned_id, self.misaligned_id), *self.more)


@dataclass(frozen=True)
class MaskSpec:
    """BERT-style dynamic masking: `prob` of the target tokens; of those 80 % [MASK], 10 % random, 10 % kept."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    prob: float = 0.15
    seed: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: dict, prob: float, seed: int) -> MaskSpec:
        """The masking of a shard set's tokenizer (its manifest's `tokenizer` entry)."""
        sp = tokenizer["special_ids"]
        return cls(mask_id=sp["mask"], vocab_size=tokenizer["vocab_size"], special_ids=tuple(sorted(set(sp.values()))),
                   prob=prob, seed=seed)


def mlm_mask(ids: np.ndarray, labels: np.ndarray, spec: MaskSpec,
             key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(masked inputs, labels with IGNORE everywhere but the chosen positions); seeded by `key`."""
    rng = np.random.default_rng([spec.seed, *key])
    u, r = rng.random(len(ids)), rng.random(len(ids))
    chosen = (u < spec.prob) & (labels != IGNORE) & ~np.isin(ids, spec.special_ids)
    inputs = ids.copy()
    inputs[chosen & (r < 0.8)] = spec.mask_id
    rand = chosen & (r >= 0.8) & (r < 0.9)
    repl = rng.integers(0, spec.vocab_size, len(ids))
    repl = np.where(np.isin(repl, spec.special_ids), ids, repl)  # never inject a special token
    inputs[rand] = repl[rand]
    return inputs, np.where(chosen, labels, IGNORE)


def _keep_control(layout: Layout, doc: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Deterministic keep/drop of the control tokens of (document, segment) pairs: (pairs, attributes) booleans,
    each attribute's drawn independently (so a model also learns each attribute without the others)."""
    n_attr = len(layout.controls)
    if layout.drop_prob <= 0:
        return np.ones((len(doc), n_attr), dtype=bool)
    h = mix_array(mix_array(doc.astype(np.uint64) ^ np.uint64(layout.seed & (2**63 - 1))) + seg.astype(np.uint64))
    hs = [h] + [mix_array(h + np.uint64(m)) for m in range(1, n_attr)]  # (the first attribute's: as before `more`)
    u = np.stack([(x >> np.uint64(11)).astype(np.float64) / float(1 << 53) for x in hs], axis=1)
    return u >= layout.drop_prob


def layout_lengths(ss: ShardSet, layout: Layout, part: int | None = None) -> np.ndarray:
    """Every document's length as the layout presents it (int64); `part`: only tar part `part`'s documents."""
    parts = range(len(ss.shards)) if part is None else [part]
    if not parts:
        return np.zeros(0, np.int64)
    return np.concatenate([_part_lengths(ss, layout, s) for s in parts])


def _part_lengths(ss: ShardSet, layout: Layout, s: int) -> np.ndarray:
    n = np.asarray(ss.column_part("n_tokens", s), dtype=np.int64)
    if layout.kind == "mle":
        return n
    if layout.kind == "filter":
        return np.where(np.asarray(ss.column_part("mean_score", s)) <= layout.threshold, n, 0)
    if layout.kind == "conditional":
        nseg = np.asarray(ss.column_part("n_segments", s), dtype=np.int64)
        out = n.copy()
        docs = int(ss.starts[s]) + np.arange(len(n), dtype=np.int64)  # global document numbers (the keep hash)
        for lo in range(0, len(n), 1 << 16):  # chunked: memory stays bounded on large shard sets
            hi = min(len(n), lo + (1 << 16))
            d = np.repeat(docs[lo:hi], nseg[lo:hi])
            first = np.repeat(np.cumsum(np.r_[0, nseg[lo:hi]])[:-1], nseg[lo:hi])
            keep = _keep_control(layout, d, np.arange(len(d), dtype=np.int64) - first).sum(axis=1)
            out[lo:hi] += np.bincount(d - docs[lo], weights=keep, minlength=hi - lo).astype(np.int64)
        return out
    raise ValueError(f"unknown layout {layout.kind!r}")


def doc_window(ss: ShardSet, d: int, layout: Layout, lo: int, hi: int, segments: bool = False) -> dict:
    """Positions [lo, hi) of document d as the layout presents it, reading only the tokens needed; `segments`:
    with each position's `segment` key (segment_key; a control token has its segment's).

    Conditional: segment j is preceded by its kept control tokens (C[j] of them, one per attribute, a hash: no
    I/O). With K[j] the controls kept before segment j and S[j] its first raw token, segment j's first control is
    at layout position P[j] = S[j] + K[j], increasing in j. Binary searches over S (4-byte reads) find the
    segments [j_lo, j_end) the window touches; the raw tokens in it are [a, b) with a = lo - K[j_lo + 1] unless
    the window starts among segment j_lo's controls (then S[j_lo]), likewise for b. Only those segments and
    tokens are read.
    """
    if layout.kind != "conditional":
        ids, scores = ss.read_tokens(d, lo, hi)
        out = {"ids": ids, "labels": ids.copy(), "scores": scores, "control": np.zeros(len(ids), bool)}
        if segments:
            out["segment"] = segment_key(d, ss.segment_indices(d, lo, hi))
        return out
    nseg = ss.n_segments(d)
    kept = _keep_control(layout, np.full(nseg, d, dtype=np.int64), np.arange(nseg, dtype=np.int64))
    K = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])

    def first_at_or_after(pos: int) -> int:  # first segment j with P[j] >= pos
        a, b = 0, nseg
        while a < b:
            m = (a + b) // 2
            if ss.segment_start(d, m) + K[m] < pos:
                a = m + 1
            else:
                b = m
        return a

    j_lo, j_end = max(0, first_at_or_after(lo + 1) - 1), max(1, first_at_or_after(hi))
    starts, seg_score = ss.read_segments(d, j_lo, j_end)
    a = max(int(starts[0]), lo - int(K[j_lo + 1]))
    b = max(int(starts[-1]), hi - int(K[j_end]))
    tokens, scores = ss.read_tokens(d, a, b)
    ctrl, pos = _controls(layout, kept[j_lo:j_end], K[j_lo:j_end] + starts, seg_score,
                          ss.extra_segment_scores(d, j_lo, j_end), lo, hi)
    seg = np.repeat(np.arange(j_end - j_lo), kept[j_lo:j_end].sum(axis=1))[pos]  # the segment of each control kept
    at = np.maximum(starts[seg] - a, 0)  # where in the raw tokens each goes (several at one place keep their order)
    ids = np.insert(tokens, at, ctrl)
    is_ctrl = np.insert(np.zeros(len(tokens), bool), at, True)
    out = {"ids": ids, "labels": np.where(is_ctrl, IGNORE, ids), "scores": np.insert(scores, at, seg_score[seg]),
           "control": is_ctrl}
    if segments:
        raw = j_lo + np.searchsorted(starts, np.arange(a, b), side="right") - 1
        out["segment"] = segment_key(d, np.insert(raw, at, j_lo + seg))
    return out


def _controls(layout: Layout, kept: np.ndarray, first: np.ndarray, scores: np.ndarray, extra: np.ndarray,
              lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(control token ids in layout order, their numbers among the controls kept) of the segments with kept
    controls `kept` (segments x attributes) whose first controls sit at layout positions `first`, scored `scores`
    in the first attribute's column and `extra` (attributes - 1, segments) in the others; those in [lo, hi) only."""
    by_attr = np.vstack([scores[None, :], extra])
    ids = np.stack([np.where(by_attr[m] <= c.threshold, c.aligned_id, c.misaligned_id)
                    for m, c in enumerate(layout.controls)], axis=1)  # (segments, attributes)
    rank = np.cumsum(kept, axis=1) - 1  # a kept control's place among its segment's
    where = first[:, None] + rank
    flat = kept.ravel()  # (row-major: segment by segment, attributes in order = layout order)
    inside = (where.ravel() >= lo) & (where.ravel() < hi)
    number = np.cumsum(flat) - 1
    sel = flat & inside
    return ids.ravel()[sel], number[sel]


def _crc(a: np.ndarray) -> str:
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(a)).cast('B')):08x}"


def _crc_file(path: Path) -> Path:
    return path.with_name(path.name + ".crc32")


def packing_index(ss: ShardSet, layout: Layout) -> np.ndarray:
    """[0, cumulative layout lengths of documents 0..n-1]: from SHARDS/packing_cache/ (memory-mapped) when
    there, else computed and written there atomically (skipped, with a log line, where the directory is
    read-only). A cache file of the wrong shape is recomputed."""
    key = {"v": 1, "split": ss.split, "shards": [[sh["sha256"], sh["samples"]] for sh in ss.shards],
           "layout": asdict(layout)}
    scores = ss.score_key()
    if scores is not None:  # a score column's files (the filter layout's lengths follow its means)
        key["scores"] = scores
    key = json.dumps(key, sort_keys=True)
    path = Path(ss.path) / CACHE_DIR / f"{ss.split}-{layout.kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    n = len(ss) + 1
    if path.is_file():
        try:
            cum = np.load(path, mmap_mode="r", allow_pickle=False)
            ok = cum.shape == (n,) and cum.dtype == np.int64 and cum[0] == 0
            if ok and _crc_file(path).read_text().strip() == _crc(cum):
                return cum
        except (OSError, ValueError):
            pass
        log.warning("%s: packing index damaged (shape or CRC-32); recomputing it", path)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # nodes may share the directory
    try:
        path.parent.mkdir(exist_ok=True)
        crc = _write_index(ss, layout, tmp)
        crc_tmp = tmp.with_name(tmp.name + ".crc32")
        crc_tmp.write_text(crc + "\n")
        os.replace(crc_tmp, _crc_file(path))  # (same content from every rank: the order does not matter)
        os.replace(tmp, path)  # ranks that compute it at once each write their own file; the last one stays
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        log.info("packing index not cached (%s); computed in memory (8 bytes a document)", e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return np.concatenate([[0], np.cumsum(layout_lengths(ss, layout))]).astype(np.int64)


def _write_index(ss: ShardSet, layout: Layout, tmp: Path) -> str:
    """Write [0, cumulative lengths] to `tmp` (a .npy) part by part, so memory holds one part's documents, not the
    set's; return the CRC-32 of the array's bytes."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(len(ss) + 1,))
    out[0] = 0
    crc, acc = zlib.crc32(memoryview(out[:1]).cast("B")), 0
    for s in range(len(ss.shards)):
        lo, hi = int(ss.starts[s]) + 1, int(ss.starts[s + 1]) + 1
        part = np.cumsum(_part_lengths(ss, layout, s)) + acc
        out[lo:hi] = part
        crc = zlib.crc32(memoryview(np.ascontiguousarray(part)).cast("B"), crc)
        acc = int(part[-1]) if len(part) else acc
    out.flush()
    del out
    return f"{crc:08x}"


def block_positions(lengths: list[int], ends_with_eos: list[bool]) -> np.ndarray:
    """Position ids of a window of consecutive document parts (`lengths`): they restart where a block starts, at
    the window's start and at the EOS that ends a part (the EOS opens the next document's block)."""
    pos = np.arange(sum(lengths), dtype=np.int64)
    at, start = 0, 0
    for n, eos in zip(lengths, ends_with_eos, strict=True):
        at += n
        nxt = at - 1 if eos else at  # (a part ending with its EOS: the next block starts at that EOS)
        pos[start:nxt] -= start
        start = max(start, nxt)
    pos[start:] -= start
    return pos


class PackedSet:
    """Packed samples of `seq_len` tokens over one split of one shard set, for one layout.

    `document_mask` (causal samples only): each sample also carries `position_ids` that restart at 0 where a
    document's attention block starts: at the EOS that ends the document before it (or where the window starts).
    So a document's first token is predicted from [EOS] at position 0, which is how sampling starts (a prompt of
    EOS, then the control tokens), and the EOS that ends a document is still its last target. A model given them
    attends within blocks only: transformers turns restarting positions into a block-diagonal causal mask (SDPA,
    eager) or a variable-length flash-attention call (prefpretrain.trainer.model.lm_inputs passes them)."""

    def __init__(self, ss: ShardSet, layout: Layout, seq_len: int, mlm: MaskSpec | None = None,
                 skip_corrupt: bool = False, document_mask: bool = False, segments: bool = False):
        self.ss, self.layout, self.seq_len, self.mlm, self.skip_corrupt = ss, layout, seq_len, mlm, skip_corrupt
        self.segments = segments  # samples carry `segment` keys (the label head and the similarity task pool by them)
        self.document_mask = document_mask and mlm is None
        self.eos = ss.manifest["tokenizer"]["special_ids"]["eos"]
        self.cum = packing_index(ss, layout)
        self._named: set[str] = set()
        self.total_tokens = int(self.cum[-1])
        self.n_samples = self.total_tokens // seq_len

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict:
        return self.get(i)

    def get(self, i: int, epoch: int = 0) -> dict:
        """Sample i; with MLM the mask depends on (seed, epoch, i): dynamic across epochs, exactly resumable."""
        if not 0 <= i < self.n_samples:
            raise IndexError(i)
        L = self.seq_len
        lo, hi = i * L, (i + 1) * L
        d = int(np.searchsorted(self.cum, lo, side="right") - 1)
        parts = []
        try:
            while self.cum[d] < hi:
                if self.cum[d + 1] > self.cum[d]:  # filtered-out documents have length 0 and are never read
                    base = int(self.cum[d])
                    parts.append(doc_window(self.ss, d, self.layout, max(lo, base) - base,
                                            min(hi, int(self.cum[d + 1])) - base, self.segments))
                d += 1
        except ShardError as e:
            if not self.skip_corrupt:
                raise
            if str(e) not in self._named:  # each bad shard named once (it is not re-read either)
                self._named.add(str(e))
                log.warning("data.on_corrupt=skip: %s; samples touching it carry no loss", e)
            return self._blank()
        out = {
            "input_ids": np.concatenate([p["ids"] for p in parts]),
            "labels": np.concatenate([p["labels"] for p in parts]),
            "scores": np.concatenate([p["scores"] for p in parts]).astype(np.float32),
            "control": np.concatenate([p["control"] for p in parts]),
        }
        if self.segments:
            out["segment"] = np.concatenate([p["segment"] for p in parts])
        if self.mlm is not None:
            out["input_ids"], out["labels"] = mlm_mask(out["input_ids"], out["labels"], self.mlm, (epoch, i))
        if self.document_mask:
            out["position_ids"] = block_positions([len(p["ids"]) for p in parts],
                                                  [len(p["ids"]) > 0 and p["ids"][-1] == self.eos for p in parts])
        out["corrupt"] = np.bool_(False)
        return out

    def _blank(self) -> dict:
        """Stands in for a sample that touches a corrupt shard (data.on_corrupt=skip): it carries no loss."""
        L = self.seq_len
        out = {"input_ids": np.zeros(L, np.int64), "labels": np.full(L, IGNORE, np.int64),
               "scores": np.zeros(L, np.float32), "control": np.zeros(L, bool), "corrupt": np.bool_(True)}
        if self.segments:
            out["segment"] = np.full(L, -1, np.int64)
        if self.document_mask:
            out["position_ids"] = np.arange(L, dtype=np.int64)
        return out
