"""`prefpretrain shard`: plan (one machine, tokenizer first) -> tasks (on an engine) -> one manifest.

The three steps, each resumable: the plan is kept while the inputs and options are the same, a task skips its
finished chunks, and the manifest is written last from every chunk's record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

from prefpretrain.data_shards import engine, remote, storage
from prefpretrain.data_shards.options import ShardOptions  # noqa: F401 - re-exported (scripts import it here)
from prefpretrain.data_shards.plan import make_plan, survey
from prefpretrain.data_shards.writer import merge

log = logging.getLogger(__name__)


def staging_dir(url: str) -> Path:
    """Where a shard set bound for object storage is built (and resumed) before it is uploaded."""
    return remote.cache_root().parent / "stage" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def build_shards(opt: ShardOptions, cluster: engine.Cluster | None = None) -> dict:
    """Run (or resume) the whole shard job; returns the manifest (also OUTPUT/manifest.json). An output URL is
    built in a local staging directory (shared by the tasks: with SLURM, set PREFPRETRAIN_CACHE to a shared
    filesystem) and uploaded once finished, the manifest last."""
    t0 = time.time()
    url = opt.output if storage.is_url(opt.output) else None
    if url is not None:
        storage.check_reachable(url)  # one line before any work: no credentials, no bucket, a wrong endpoint
        opt = dataclasses.replace(opt, output=str(staging_dir(url)))
    out = Path(opt.output)
    surveyed = survey(opt)  # inputs and scorer checked before anything is written
    with engine.exclusive(out, opt.executor, opt.tasks, opt.overwrite):
        p = make_plan(opt, surveyed=surveyed)
        engine.run_tasks(out, opt.tasks, opt.executor, opt.workers, opt.progress, cluster)
        manifest = merge(out, p, opt.inputs, time.time() - t0)
        if url is not None:
            remote.upload(out, url)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    log.info("shard: %d train / %d val documents, %d / %d tokens, %d skipped, %.1fs -> %s", tr["samples"],
             va["samples"], tr["tokens"], va["tokens"], sum(manifest["skipped"].values()), time.time() - t0, out)
    return manifest


def dry_run(opt: ShardOptions, cluster: engine.Cluster | None = None) -> str:
    """What `shard` would do: the plan's size and the job (the SLURM script), writing and starting nothing."""
    p = make_plan(opt, write=False)
    per_task = [len(range(r, len(p["chunks"]), opt.tasks)) for r in range(min(opt.tasks, 3))]
    head = (f"# {len(p['files'])} input files, {sum(f[2] for f in p['files']) / 1e6:.1f} MB -> {len(p['chunks'])} "
            f"chunks; {opt.tasks} task(s) on {opt.executor} (chunks of the first tasks: {per_task})\n")
    return head + engine.run_tasks(Path(opt.output), opt.tasks, opt.executor, opt.workers, False, cluster,
                                   dry_run=True)
