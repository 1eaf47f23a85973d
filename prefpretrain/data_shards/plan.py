"""The first step of every shard job: inputs -> a plan every task reads (`_progress/plan.json`).

The plan is made once, on the machine that runs `prefpretrain shard`, before any task starts: the input
files with their sizes as work items (a file, or a run of row groups of a Parquet file larger than a chunk),
the chunks (consecutive groups of items of about `shard_size_mb` of output, the unit of work and of output),
and the tokenizer, trained here from a deterministic sample of the inputs (or copied from --tokenizer). Tasks
only read it, so N tasks encode with one vocabulary and a chunk's bytes do not depend on which task or how
many tasks wrote it: task r of N takes chunks r, r+N, r+2N, ... A plan once written is kept as it is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from prefpretrain.data_shards import sources
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.options import ShardOptions
from prefpretrain.data_shards.scorers import default_segmenter, get_scorer
from prefpretrain.data_shards.writer import FORMAT_VERSION, MANIFEST, chunk_record, finished_chunks  # noqa: F401
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)

PLAN = "_progress/plan.json"
OUTPUT_PER_INPUT_BYTE = 1.5  # tokens (2-4 B) + float16 scores per ~3.5 chars, plus tar headers
# options that change how the work is done, not what it gives (the same shards for any value)
NOT_IN_FINGERPRINT = ("output", "workers", "progress", "overwrite", "inputs", "tasks", "executor")
OURS = ("_progress", "tokenizer", MANIFEST, "skipped.log", "packing_cache")


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


def task_chunks(n_chunks: int, rank: int, world: int) -> list[int]:
    """The chunks task `rank` of `world` writes: round robin (chunks are of about equal size by construction)."""
    return list(range(rank, n_chunks, world))


def tokenizer_sample(files: list[sources.InputFile], max_mb: float) -> list[sources.InputFile]:
    """The files the tokenizer is trained on: all of them up to `max_mb`, else a deterministic spread sample
    (files in the order of a hash of their name, until the bound), whatever the number of tasks."""
    if max_mb <= 0 or sum(f.size for f in files) <= max_mb * 1e6:
        return files
    picked, acc = [], 0
    for f in sorted(files, key=lambda f: hashlib.sha256(f.name.encode()).digest()):
        picked.append(f)
        acc += f.size
        if acc >= max_mb * 1e6:
            break
    return sorted(picked, key=lambda f: f.name)


def fingerprint(opt: ShardOptions, files: list[sources.InputFile], segmenter: str) -> str:
    desc = {"format": FORMAT_VERSION, "files": [(f.name, f.size, f.version) for f in files]}
    o = asdict(opt)
    for k in NOT_IN_FINGERPRINT:
        o.pop(k)
    desc["options"] = dict(o, segmenter=segmenter)
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def check_writable(out: Path) -> None:
    """`out` is (or can be made) a directory this process may write: one line otherwise."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output: {out} is a file, not a directory")
    probe = next((p for p in [out, *out.parents] if p.exists()), None)
    if probe is not None and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output: {probe} is not writable")


def prepare_output(out: Path, fp: str, overwrite: bool) -> bool:
    """Make `out` ready; return True when it holds a compatible unfinished (or finished) run to resume."""
    plan = out / PLAN
    check_writable(out)
    if overwrite and out.exists():
        for p in out.iterdir():
            ours = p.name.endswith((".tar", ".idx.npy")) or ".tar.score-" in p.name or ".tar.tmp-" in p.name
            if ours or p.name in OURS:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if plan.is_file():
        if json.loads(plan.read_text())["fingerprint"] == fp:
            return True
        raise ValueError(f"{out} holds shards built from other inputs or options; use another directory "
                         f"or --overwrite")
    if out.exists() and any(p.name.endswith(".tar") or p.name == MANIFEST for p in out.iterdir()):
        raise ValueError(f"{out} already holds shards; use another directory or --overwrite")
    (out / "_progress").mkdir(parents=True, exist_ok=True)
    return False


def survey(opt: ShardOptions) -> tuple:
    """(input files, segmenter, scorer, fingerprint): every input listed and the scorer made, nothing written.
    Bad inputs, an unknown scorer and an unusable store fail here, in one line, before any output exists."""
    files = sources.expand_inputs(opt.inputs)
    if opt.max_files:
        files = files[: opt.max_files]
    if not files:
        raise ValueError("no input files found")
    scorer = get_scorer(opt.scorer, opt.scorer_params)  # fail early on an unknown scorer or bad params
    segmenter = default_segmenter(opt.scorer, scorer) if opt.segmenter == "auto" else opt.segmenter
    return files, segmenter, scorer, fingerprint(opt, files, segmenter)


def make_plan(opt: ShardOptions, write: bool = True, surveyed: tuple | None = None) -> dict:
    """Expand the inputs, check the scorer, plan the chunks; with `write`, also prepare the output, train (or
    load) the tokenizer and write PLAN. Without it (a dry run) nothing is written and no tokenizer trained.
    A plan already written for the same inputs and options is used as it is (its work items, chunks and tokenizer
    never change under a running job, whatever a later listing of the inputs would say)."""
    t0 = time.time()
    out = Path(opt.output)
    files, segmenter, scorer, fp = surveyed or survey(opt)
    if write and prepare_output(out, fp, opt.overwrite):
        plan = read_plan(out)
        check_tokenizer(out, plan)
        log.info("shard: %d of %d chunks already finished, resuming", len(finished_chunks(out, len(plan["chunks"]))),
                 len(plan["chunks"]))
        return plan
    target = opt.shard_size_mb * 1e6 / OUTPUT_PER_INPUT_BYTE
    items = sources.work_items(files, target)  # files, and runs of row groups of large Parquet files
    sizes = [it[2] for it in items]
    chunks = plan_chunks(sizes, target)
    plan = {"fingerprint": fp, "files": items, "n_files": len(files), "chunks": chunks,
            "segmenter": segmenter, "scorer": scorer.name, "settings": _settings(opt, scorer),
            "scorer_info": {"name": scorer.name, "version": scorer.version, "params": scorer.params}}
    log.info("shard: %d files, %.1f MB, %d chunks, scorer=%s, segmenter=%s", len(files), sum(sizes) / 1e6,
             len(chunks), scorer.name, segmenter)
    if not write:
        return plan
    if opt.tokenizer == "train":
        sample = tokenizer_sample(files, opt.tokenizer_sample_mb)
        tok = toklib.train_tokenizer(
            (d.text for f in sample for d in sources.read_file(f.path, f.name, opt.text_field, opt.score_field).docs),
            opt.vocab_size)
        log.info("shard: trained byte-level BPE on %d of %d files, vocab %d, in %.1fs", len(sample), len(files),
                 tok.get_vocab_size(), time.time() - t0)
    else:
        tok = toklib.load_tokenizer(opt.tokenizer)
    plan["tokenizer"] = toklib.save_tokenizer(tok, out / "tokenizer")
    plan["vocab_size"] = tok.get_vocab_size()
    atomic_write(out / PLAN, json.dumps(plan, indent=1))  # the plan exists (and is complete) from here on
    return plan


def check_tokenizer(out: Path, plan: dict) -> None:
    """The tokenizer in `out` is the plan's (a task must not encode with another): one line otherwise."""
    tj = out / "tokenizer" / "tokenizer.json"
    if not tj.is_file() or toklib.tokenizer_hash(tj) != plan["tokenizer"]:
        raise ValueError(f"{tj}: missing or not the plan's tokenizer (hash {plan['tokenizer']}); it was changed "
                         f"after the plan was made: shard again with --overwrite")


def _settings(opt: ShardOptions, scorer=None) -> dict:
    """The options the shard tasks run with; a learned scorer pinned to the checkpoint the survey loaded (the
    tasks make it again from this, also on other nodes and after a resume, while the run may write newer ones)."""
    out = {k: v for k, v in asdict(opt).items() if k not in ("inputs", "output", "overwrite", "progress")}
    if scorer is not None and scorer.name == "learned":
        out["scorer"] = f"learned:{scorer.params['path']}"
    return out


def read_plan(out: Path) -> dict:
    p = out / PLAN
    if not p.is_file():
        raise ValueError(f"{out}: no shard plan ({PLAN}); run `prefpretrain shard` to make one")
    return json.loads(p.read_text())
