"""Where a run continues from (`run.resume`), with everything that would make that wrong refused first.

auto:  the newest complete checkpoint whose files match their checksums. When checkpoints exist but none
       verifies, the run stops (exit 2) instead of starting again from step 0 over them.
PATH:  that checkpoint, verified the same way; a damaged one is refused.
never: a fresh start; checkpoints already in the run directory are moved aside (checkpoints.before_TIME),
       never overwritten or pruned by the new run.
At another world size a ZeRO checkpoint is loaded through its universal form (converted once, by rank 0).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from prefpretrain import distributed
from prefpretrain.config import Config
from prefpretrain.data_shards.packing import DOCUMENT_BLOCKS
from prefpretrain.errors import ConfigError, InputError
from prefpretrain.trainer import checkpoint as ckptlib
from prefpretrain.trainer.model import run_heads

log = logging.getLogger(__name__)


def _pick(cfg: Config, ckpt_root: Path) -> Path | None:
    """The checkpoint run.resume names, verified by rank 0 (CRC-32 of every file: long for large models) while
    the others wait on the store; every rank gets the same answer or the same error."""

    def auto() -> tuple[Path | None, str | None]:
        found = ckptlib.find_latest(ckpt_root)
        done = ckptlib.complete(ckpt_root)
        if found is None and not done and (ckpt_root / "latest").is_file():  # written after a complete save only
            return None, (f"run.resume: {ckpt_root / 'latest'} names {(ckpt_root / 'latest').read_text().strip()!r} "
                          f"but no complete checkpoint is left in {ckpt_root}; nothing was overwritten. Set "
                          f"run.resume=never to start again from step 0")
        if found is None and done:
            return None, (f"run.resume: none of the {len(done)} checkpoint(s) in {ckpt_root} verifies (newest, "
                          f"{done[0].name}: {ckptlib.verify(done[0])}); nothing was overwritten. Repair or move "
                          f"them, or set run.resume=never to start again from step 0")
        return found, None

    def named() -> tuple[Path | None, str | None]:
        ckpt = Path(cfg.run.resume)
        if not (ckpt / "state.json").is_file():
            return None, f"run.resume: {ckpt} is not a complete checkpoint (no state.json)"
        problem = ckptlib.verify(ckpt)
        return (None, f"run.resume: {ckpt} is damaged ({problem})") if problem else (ckpt, None)

    def never() -> tuple[None, None]:
        done = ckptlib.complete(ckpt_root)
        if done or (ckpt_root / "latest").is_file():
            aside = ckpt_root.with_name(f"checkpoints.before_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}")
            ckpt_root.rename(aside)
            log.warning("run.resume=never: the %d checkpoint(s) already here moved to %s", len(done), aside)
        return None, None

    fn = {"auto": auto, "never": never}.get(cfg.run.resume, named)
    ckpt, problem = distributed.broadcast_object(distributed.rank0_does("choosing the checkpoint", fn))
    if problem:
        raise (ConfigError if cfg.run.resume not in ("auto", "never") else InputError)(problem)
    return ckpt


def resume_point(cfg: Config, ckpt_root: Path, rank: int, world: int, tokenizer_hash: str, cont=None,
                 scores_digest: str | None = None):
    """(checkpoint, its state, the directory to load) for run.resume, or (None, None, None) for a fresh start."""
    ckpt = _pick(cfg, ckpt_root)
    if ckpt is None:
        return None, None, None
    st, G = ckptlib.read_state(ckpt), cfg.train.global_batch_size
    if st.get("tokenizer_hash") not in (None, tokenizer_hash):
        raise ConfigError(f"run.resume: {ckpt} was trained with tokenizer {st['tokenizer_hash']}, the shards "
                          f"use {tokenizer_hash}")
    if st["global_batch_size"] != G:
        raise ConfigError(f"train.global_batch_size: {G}, but {ckpt} was trained with {st['global_batch_size']} "
                          f"(it defines the data order; keep it when resuming)")
    then = bool(st.get("document_mask", False))  # (checkpoints from before the option: trained unmasked)
    if then != (cfg.data.document_mask and cfg.model.kind == "causal"):
        raise ConfigError(f"data.document_mask: {str(cfg.data.document_mask).lower()}, but {ckpt} was trained "
                          f"{'with' if then else 'without'} document masking; keep it when resuming "
                          f"(data.document_mask={str(then).lower()}), or start afresh with run.resume=never")
    if then and st.get("document_blocks", 1) != DOCUMENT_BLOCKS:
        raise ConfigError(f"data.document_mask: {ckpt} was trained with an earlier document-mask layout (each "
                          f"document's EOS closed its attention block; now it opens the next document's block, as "
                          f"sampling starts); finish it with the version that wrote it, or start afresh with "
                          f"run.resume=never")
    if st.get("scores_digest") != scores_digest:  # (None: the tars' own scores, before columns existed too)
        raise ConfigError(f"objective.attributes: the score column {ckpt} was trained on has changed since (rescored, "
                          f"or another column); rescore it back, or start afresh with run.resume=never")
    then, now = st.get("heads", run_heads(st.get("objective", cfg.train.objective), 0.0)), run_heads(
        cfg.train.objective, cfg.objective.label_head_weight)
    if sorted(then) != now:
        raise ConfigError(f"objective: {ckpt} was trained with heads {then or 'none'}, this config has "
                          f"{now or 'none'} (train.objective, objective.label_head_weight); a head is turned on or off "
                          f"by starting afresh (run.resume=never) or by a continual update from it (continual.from)")
    if st["config_hash"] != cfg.hash():
        log.warning("resuming %s written with another config (hash %s, now %s)", ckpt, st["config_hash"], cfg.hash())
    if cont:
        cont.check_resume(st, ckpt)
    load_from = ckpt
    if st["world_size"] != world and st.get("zero_stage", 0) >= 1:
        load_from = ckptlib.universal(ckpt)
        log.info("checkpoint %s was written by %d ranks; loading its universal form %s on %d", ckpt,
                 st["world_size"], load_from, world)
    return ckpt, st, load_from
