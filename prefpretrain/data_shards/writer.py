"""Corpus -> scored, tokenized WebDataset shards + binary indexes + manifest.json.

One tar sample is one document (key = its index in the split, zero padded):
  KEY.tokens.npy    token ids (uint16/int32), EOS appended
  KEY.scores.npy    float16 score of every token (its segment's score)
  KEY.segments.npy  int32 [n_segments, 2]: first token of each segment, and the score as float32 bits
  KEY.json          provenance: source, doc_id, chars
Documents are packed into fixed-length training samples at train start (packing.py), so one shard
set serves every objective and MLE stays true MLE.

Beside each tar, `NAME.idx.npy` holds one INDEX_DTYPE record per sample (byte offset, size, token
and segment counts, mean score): the reader seeks straight to a sample, and the manifest stays small.
Output bytes do not depend on the number of workers: files are processed in sorted order and
written in that order, tar headers carry fixed metadata.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefpretrain.data_shards import sources
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.scorers import default_segmenter, get_scorer
from prefpretrain.data_shards.segment import get_segmenter

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([
    ("offset", "<u8"), ("size", "<u8"), ("n_tokens", "<u4"), ("n_segments", "<u4"), ("mean_score", "<f4"),
])


@dataclass
class ShardOptions:
    inputs: list[str]
    output: str
    scorer: str = "pep8"
    segmenter: str = "auto"
    tokenizer: str = "train"  # "train" or a directory
    vocab_size: int = 8192
    val_fraction: float = 0.05
    shard_size_mb: float = 64.0
    workers: int = 2
    max_files: int = 0
    text_field: str = "text"
    score_field: str | None = None
    progress: bool = True


# ---------------------------------------------------------------- worker side

_W: dict = {}


def _init_worker(tok_json: str, scorer: str, segmenter: str, text_field: str, score_field: str | None):
    from tokenizers import Tokenizer

    _W.update(tok=Tokenizer.from_str(tok_json), scorer=get_scorer(scorer), seg=get_segmenter(segmenter),
              text_field=text_field, score_field=score_field)
    _W["eos"] = _W["tok"].token_to_id(toklib.EOS)


def encode_document(doc: sources.Document, tok, scorer, segmenter, eos: int) -> dict | None:
    spans = segmenter(doc.text)
    if not spans:
        return None
    seg_scores = np.asarray(scorer.score(doc, spans), dtype=np.float32)
    enc = tok.encode(doc.text, add_special_tokens=False)
    ids = np.asarray(enc.ids + [eos], dtype=np.int64)
    starts = np.asarray([a for a, _ in spans], dtype=np.int64)
    tok_starts = np.asarray([o[0] for o in enc.offsets] + [len(doc.text)], dtype=np.int64)
    seg_of_tok = np.clip(np.searchsorted(starts, tok_starts, side="right") - 1, 0, len(spans) - 1)
    # segments that own at least one token; their first token index
    first = np.flatnonzero(np.r_[True, seg_of_tok[1:] != seg_of_tok[:-1]])
    seg_ids = seg_of_tok[first]
    lens = np.asarray([b - a for a, b in spans], dtype=np.float64)
    mean = float((seg_scores * lens).sum() / max(1.0, lens.sum()))
    segments = np.stack([first.astype(np.int32), seg_scores[seg_ids].view(np.int32)], axis=1)
    return {
        "tokens": ids,
        "scores": seg_scores[seg_of_tok].astype(np.float16),
        "segments": segments,
        "meta": {"source": doc.source, "doc_id": doc.doc_id, "chars": len(doc.text)},
        "mean_score": mean,
        "seg_scores": seg_scores,
        "seg_lens": lens,
    }


def _process_file(item: tuple[str, str]):
    path, name = item
    res = sources.read_file(path, name, _W["text_field"], _W["score_field"])
    out = []
    for doc in res.docs:
        try:
            enc = encode_document(doc, _W["tok"], _W["scorer"], _W["seg"], _W["eos"])
        except Exception as e:  # a scorer failing on one document must not stop the run
            res.skipped["scorer_error"] += 1
            res.problems.append(f"{doc.doc_id}: scorer failed ({type(e).__name__}: {e})")
            continue
        if enc is None:
            res.skipped["empty"] += 1
        else:
            out.append(enc)
    return name, out, res.skipped, res.problems


# ---------------------------------------------------------------- writing


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class _SplitWriter:
    """Bounded-size tar shards for one split, with their indexes and statistics."""

    def __init__(self, out: Path, split: str, max_bytes: int, vocab_size: int):
        self.out, self.split, self.max_bytes = out, split, max_bytes
        self.tok_dtype = np.uint16 if vocab_size <= 65535 else np.int32
        self.shards: list[dict] = []
        self.n_docs = 0
        self.n_tokens = 0
        self._tar = self._f = None
        self._index: list[tuple] = []
        self.seg_scores: list[np.ndarray] = []
        self.seg_lens: list[np.ndarray] = []

    def _open(self):
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._f = open(self.out / name, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "first_index": self.n_docs, "samples": 0, "tokens": 0})
        self._index = []

    def _add(self, name: str, data: bytes):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
        self._tar.addfile(ti, io.BytesIO(data))

    def add(self, enc: dict):
        if self._tar is None:
            self._open()
        key = f"{self.n_docs:010d}"
        start = self._f.tell()
        self._add(f"{key}.tokens.npy", _npy_bytes(enc["tokens"].astype(self.tok_dtype)))
        self._add(f"{key}.scores.npy", _npy_bytes(enc["scores"]))
        self._add(f"{key}.segments.npy", _npy_bytes(enc["segments"]))
        self._add(f"{key}.json", json.dumps(enc["meta"], sort_keys=True).encode())
        end = self._f.tell()
        n_tok = len(enc["tokens"])
        self._index.append((start, end - start, n_tok, len(enc["segments"]), enc["mean_score"]))
        sh = self.shards[-1]
        sh["samples"] += 1
        sh["tokens"] += n_tok
        self.n_docs += 1
        self.n_tokens += n_tok
        self.seg_scores.append(enc["seg_scores"])
        self.seg_lens.append(enc["seg_lens"])
        if end >= self.max_bytes:
            self.close_shard()

    def close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        self._f.close()
        sh = self.shards[-1]
        path = self.out / sh["name"]
        np.save(self.out / (sh["name"] + ".idx.npy"), np.asarray(self._index, dtype=INDEX_DTYPE))
        sh["bytes"] = path.stat().st_size
        sh["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        sh["index"] = sh["name"] + ".idx.npy"
        self._tar = self._f = None

    def summary(self) -> dict:
        self.close_shard()
        return {"samples": self.n_docs, "tokens": self.n_tokens, "shards": self.shards,
                "score_stats": score_stats(self.seg_scores, self.seg_lens)}


def score_stats(scores: list[np.ndarray], lens: list[np.ndarray]) -> dict:
    if not scores:
        return {"segments": 0}
    s = np.concatenate(scores).astype(np.float64)
    w = np.concatenate(lens)
    pct = np.percentile(s, [10, 50, 90, 99]).tolist()
    edges = [0.0, 1e-9, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, np.inf]
    hist, _ = np.histogram(s, bins=edges)
    return {
        "segments": len(s),
        "mean_per_char": float((s * w).sum() / max(1.0, w.sum())),
        "mean_per_segment": float(s.mean()),
        "zero_fraction": float((s <= 0).mean()),
        "p10": pct[0], "p50": pct[1], "p90": pct[2], "p99": pct[3], "max": float(s.max()),
        "histogram": {"edges": [str(e) for e in edges], "counts": hist.tolist()},
    }


def is_val(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def build_shards(opt: ShardOptions) -> dict:
    """Run the whole shard pipeline; returns the manifest (also written to OUTPUT/manifest.json)."""
    t0 = time.time()
    out = Path(opt.output)
    out.mkdir(parents=True, exist_ok=True)
    files = sources.expand_inputs(opt.inputs)
    if opt.max_files:
        files = files[: opt.max_files]
    if not files:
        raise ValueError("no input files found")
    segmenter = default_segmenter(opt.scorer) if opt.segmenter == "auto" else opt.segmenter
    scorer = get_scorer(opt.scorer)  # fail early on an unknown scorer
    in_bytes = sum(Path(p).stat().st_size for p, _ in files)
    log.info("shard: %d files, %.1f MB, scorer=%s, segmenter=%s", len(files), in_bytes / 1e6, opt.scorer, segmenter)

    tok_dir = out / "tokenizer"
    if opt.tokenizer == "train":
        def texts():
            for p, n in files:
                for d in sources.read_file(p, n, opt.text_field, opt.score_field).docs:
                    yield d.text
        tok = toklib.train_tokenizer(texts(), opt.vocab_size)
        tok_hash = toklib.save_tokenizer(tok, tok_dir)
        log.info("shard: trained byte-level BPE, vocab %d, in %.1fs", tok.get_vocab_size(), time.time() - t0)
    else:
        tok = toklib.load_tokenizer(opt.tokenizer)
        tok_hash = toklib.save_tokenizer(tok, tok_dir)
    vocab = tok.get_vocab_size()

    max_bytes = int(opt.shard_size_mb * 1e6)
    writers = {s: _SplitWriter(out, s, max_bytes, vocab) for s in ("train", "val")}
    skipped: Counter = Counter()
    problems: list[str] = []
    initargs = (tok.to_str(), opt.scorer, segmenter, opt.text_field, opt.score_field)
    done_bytes = 0
    from tqdm import tqdm

    bar = tqdm(total=in_bytes, unit="B", unit_scale=True, desc="shard", disable=not opt.progress,
               mininterval=1.0)
    sizes = {n: Path(p).stat().st_size for p, n in files}
    if opt.workers > 1:
        pool = mp.get_context("spawn").Pool(opt.workers, initializer=_init_worker, initargs=initargs)
        results = pool.imap(_process_file, files, chunksize=1)
    else:
        pool = None
        _init_worker(*initargs)
        results = map(_process_file, files)
    try:
        for name, encs, skip, probs in results:
            for enc in encs:
                writers["val" if is_val(enc["meta"]["doc_id"], opt.val_fraction) else "train"].add(enc)
            skipped.update(skip)
            problems.extend(probs)
            done_bytes += sizes[name]
            bar.update(sizes[name])
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    for p in problems:
        log.warning("shard: skipped %s", p)
    (out / "skipped.log").write_text("".join(p + "\n" for p in problems))

    splits = {s: w.summary() for s, w in writers.items()}
    if splits["train"]["samples"] == 0:
        raise ValueError("no documents survived reading; see skipped.log")
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "prefpretrain shard",
        "inputs": opt.inputs,
        "files": len(files),
        "input_bytes": in_bytes,
        "tokenizer": {"path": "tokenizer", "hash": tok_hash, "vocab_size": vocab,
                      "special_ids": toklib.special_ids(tok)},
        "scorer": {"name": scorer.name, "version": scorer.version, "params": scorer.params},
        "segmenter": segmenter,
        "val_fraction": opt.val_fraction,
        "index_dtype": INDEX_DTYPE.descr,
        "splits": splits,
        "skipped": dict(sorted(skipped.items())),
        "build_seconds": round(time.time() - t0, 1),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")
    log.info("shard: %d train / %d val documents, %d / %d tokens, %d skipped, %.1fs -> %s",
             splits["train"]["samples"], splits["val"]["samples"], splits["train"]["tokens"],
             splits["val"]["tokens"], sum(skipped.values()), time.time() - t0, out)
    return manifest
