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
interrupted run resumes at the first unfinished chunk. Beside each tar, `NAME.idx.npy` holds one
INDEX_DTYPE record per sample (byte offsets of the sample and of its arrays' data, counts, mean score):
the reader reads exactly the token range a training sample needs, and the manifest stays small.
The output bytes do not depend on the number of workers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from prefpretrain.data_shards import encode, sources
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.options import ShardOptions, ShardSettings  # noqa: F401 - re-exported
from prefpretrain.data_shards.scorers import default_segmenter, get_scorer
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
OUTPUT_PER_INPUT_BYTE = 1.5  # tokens (2-4 B) + float16 scores per ~3.5 chars, plus tar headers


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _atomic_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


class _ChunkWriter:
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
        self._f = open(self.out / name, "wb")  # noqa: SIM115 - closed in close_part
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
        np.save(self.out / sh["index"], np.asarray(self._index, dtype=INDEX_DTYPE))
        sh["index_sha256"] = hashlib.sha256((self.out / sh["index"]).read_bytes()).hexdigest()
        sh["bytes"] = path.stat().st_size
        sh["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        self._tar = self._f = None

    def record(self) -> dict:
        self.close_part()
        return {"shards": self.shards, "samples": self.n_docs, "tokens": sum(s["tokens"] for s in self.shards),
                "stats": self.stats.to_state()}


def is_val(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def plan_chunks(sizes: list[int], chunk_bytes: float) -> list[list[int]]:
    """Consecutive groups of file indices holding about chunk_bytes of input each."""
    chunks, cur, acc = [], [], 0
    for i, s in enumerate(sizes):
        cur.append(i)
        acc += s
        if acc >= chunk_bytes:
            chunks.append(cur)
            cur, acc = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def _fingerprint(opt: ShardOptions, files: list[tuple[str, str]], segmenter: str) -> str:
    desc = {"format": FORMAT_VERSION, "files": [(n, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p, n in files]}
    o = asdict(opt)
    for k in ("output", "workers", "progress", "overwrite", "inputs"):
        o.pop(k)
    desc["options"] = dict(o, segmenter=segmenter)
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _prepare_output(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Make `out` ready; return True when it holds a compatible unfinished (or finished) run to resume."""
    plan = out / "_progress" / "plan.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output: {out} is a file, not a directory")
    probe = next((p for p in [out, *out.parents] if p.exists()), None)
    if probe is not None and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output: {probe} is not writable")
    if overwrite and out.exists():
        for p in out.iterdir():
            ours = p.name.endswith((".tar", ".idx.npy")) or ".tar.score-" in p.name  # (score columns: columns.py)
            if ours or p.name in ("_progress", "tokenizer", MANIFEST, "skipped.log", "packing_cache"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if plan.is_file():
        if json.loads(plan.read_text())["fingerprint"] == fingerprint:
            return True
        raise ValueError(f"{out} holds shards built from other inputs or options; use another directory "
                         f"or --overwrite")
    if out.exists() and any(p.name.endswith(".tar") or p.name == MANIFEST for p in out.iterdir()):
        raise ValueError(f"{out} already holds shards; use another directory or --overwrite")
    (out / "_progress").mkdir(parents=True, exist_ok=True)
    return False


def build_shards(opt: ShardOptions) -> dict:
    """Run (or resume) the whole shard pipeline; returns the manifest (also OUTPUT/manifest.json)."""
    t0 = time.time()
    out = Path(opt.output)
    files = sources.expand_inputs(opt.inputs)
    if opt.max_files:
        files = files[: opt.max_files]
    if not files:
        raise ValueError("no input files found")
    segmenter = default_segmenter(opt.scorer) if opt.segmenter == "auto" else opt.segmenter
    scorer = get_scorer(opt.scorer, opt.scorer_params)  # fail early on an unknown scorer or bad params
    fingerprint = _fingerprint(opt, files, segmenter)
    resuming = _prepare_output(out, fingerprint, opt.overwrite)
    progress = out / "_progress"
    sizes = [os.stat(p).st_size for p, _ in files]
    log.info("shard: %d files, %.1f MB, scorer=%s, segmenter=%s%s", len(files), sum(sizes) / 1e6, scorer.name,
             segmenter, " (resuming)" if resuming else "")

    tok_dir = out / "tokenizer"
    if resuming and (tok_dir / "tokenizer.json").is_file():
        tok = toklib.load_tokenizer(tok_dir)
    elif opt.tokenizer == "train":
        tok = toklib.train_tokenizer(
            (d.text for p, n in files for d in sources.read_file(p, n, opt.text_field, opt.score_field).docs),
            opt.vocab_size)
        log.info("shard: trained byte-level BPE, vocab %d, in %.1fs", tok.get_vocab_size(), time.time() - t0)
    else:
        tok = toklib.load_tokenizer(opt.tokenizer)
    tok_hash = toklib.save_tokenizer(tok, tok_dir)
    vocab = tok.get_vocab_size()
    tok_dtype = np.uint16 if vocab <= 65535 else np.int32
    chunks = plan_chunks(sizes, opt.shard_size_mb * 1e6 / OUTPUT_PER_INPUT_BYTE)
    _atomic_json(progress / "plan.json", {"fingerprint": fingerprint, "chunks": len(chunks), "tokenizer": tok_hash})

    done = {c for c in range(len(chunks)) if (progress / f"chunk-{c:06d}.json").is_file()}
    todo = [c for c in range(len(chunks)) if c not in done]
    if done:
        log.info("shard: %d of %d chunks already finished, resuming", len(done), len(chunks))
    _run_chunks(opt, out, files, sizes, chunks, todo, tok, scorer.name, segmenter, tok_dtype)

    manifest = _merge(out, opt, files, sizes, len(chunks), tok_hash, vocab, toklib.special_ids(tok), scorer,
                      segmenter, tok_dtype, time.time() - t0)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    log.info("shard: %d train / %d val documents, %d / %d tokens, %d skipped, %.1fs -> %s", tr["samples"],
             va["samples"], tr["tokens"], va["tokens"], sum(manifest["skipped"].values()), time.time() - t0, out)
    return manifest


def _run_chunks(opt, out, files, sizes, chunks, todo, tok, scorer_name, segmenter, tok_dtype) -> None:
    from tqdm import tqdm

    if not todo:
        return
    max_bytes = int(opt.shard_size_mb * 1e6)
    # within a chunk, the largest files go to the pool first (less idle time at the chunk's end); the
    # chunk is written in file order once all its results are in, so the bytes do not change
    order = {c: sorted(chunks[c], key=lambda i: (-sizes[i], i)) for c in todo}
    items = [files[i] for c in todo for i in order[c]]
    t_start, done_bytes, total = time.time(), 0, sum(sizes[i] for c in todo for i in chunks[c])
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="shard",
               disable=not opt.progress, mininterval=1.0, smoothing=0.1)
    initargs = (tok.to_str(), scorer_name, opt.scorer_params, segmenter, opt.text_field, opt.score_field)
    pool = None
    if opt.worker_count() > 1:
        pool = mp.get_context("spawn").Pool(opt.worker_count(), initializer=encode.init_worker, initargs=initargs)
        results = pool.imap(encode.process_file, items, chunksize=1)
    else:
        encode.init_worker(*initargs)
        results = map(encode.process_file, items)
    try:
        for c in todo:
            writers = {s: _ChunkWriter(out, s, c, max_bytes, tok_dtype) for s in ("train", "val")}
            skipped: Counter = Counter()
            problems: list[str] = []
            got = {i: next(results) for i in order[c]}
            for i in chunks[c]:
                _name, encs, skip, probs = got.pop(i)
                for enc in encs:
                    writers["val" if is_val(enc["meta"]["doc_id"], opt.val_fraction) else "train"].add(enc)
                skipped.update(skip)
                problems.extend(probs)
                bar.update(sizes[i])
            rec = {"chunk": c, "files": len(chunks[c]), "input_bytes": sum(sizes[i] for i in chunks[c]),
                   "splits": {s: w.record() for s, w in writers.items()}, "skipped": dict(skipped),
                   "problems": problems}
            _atomic_json(out / "_progress" / f"chunk-{c:06d}.json", rec)  # the chunk is finished now
            done_bytes += rec["input_bytes"]
            if not opt.progress:  # plain log lines where there is no progress bar (cluster logs)
                rate = done_bytes / max(1e-9, time.time() - t_start)
                log.info("shard: chunk %d of %d done, %.1f of %.1f MB, %.2f MB/s, ETA %.0fs", todo.index(c) + 1,
                         len(todo), done_bytes / 1e6, total / 1e6, rate / 1e6, (total - done_bytes) / max(rate, 1))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


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


def _merge(out, opt, files, sizes, n_chunks, tok_hash, vocab, special, scorer, segmenter, tok_dtype, secs) -> dict:
    splits = {s: {"samples": 0, "tokens": 0, "shards": [], "stats": ScoreStats()} for s in ("train", "val")}
    skipped: Counter = Counter()
    problems: list[str] = []
    for c in range(n_chunks):
        rec = json.loads((out / "_progress" / f"chunk-{c:06d}.json").read_text())
        for s, r in rec["splits"].items():
            sp = splits[s]
            for sh in r["shards"]:
                sp["shards"].append(dict(sh, first_index=sp["samples"]))
                sp["samples"] += sh["samples"]
                sp["tokens"] += sh["tokens"]
            sp["stats"].merge(ScoreStats.from_state(r["stats"]))
        skipped.update(rec["skipped"])
        problems.extend(rec["problems"])
    for p in problems:
        log.warning("shard: skipped %s", p)
    (out / "skipped.log").write_text("".join(p + "\n" for p in problems))
    if splits["train"]["samples"] == 0:
        raise ValueError(f"no documents survived reading; see {out / 'skipped.log'}")
    for sp in splits.values():
        sp["score_stats"] = sp.pop("stats").summary()
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "prefpretrain shard",
        "inputs": opt.inputs,
        "files": len(files),
        "input_bytes": sum(sizes),
        "tokenizer": {"path": "tokenizer", "hash": tok_hash, "vocab_size": vocab, "special_ids": special},
        "token_dtype": np.dtype(tok_dtype).name,
        "scorer": {"name": scorer.name, "version": scorer.version, "params": scorer.params},
        "segmenter": segmenter,
        "val_fraction": opt.val_fraction,
        "shard_size_mb": opt.shard_size_mb,
        "index_dtype": [list(d) for d in INDEX_DTYPE.descr],
        "splits": splits,
        "skipped": dict(sorted(skipped.items())),
        "build_seconds": round(secs, 1),
    }
    _keep_columns(out, manifest)
    _atomic_json(out / MANIFEST, manifest)
    return manifest
