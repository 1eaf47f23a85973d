"""The training loop: one process per rank, under torchrun, srun, or alone.

`train(cfg, hooks)` = set up (session.start: data, model, engine, resume) -> the loop below -> the end (final
evaluation, checkpoint, hooks' finish). Every policy the loop applies is a small part of its own (policies.py);
what happens to one micro batch is step.py's.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from prefpretrain import distributed
from prefpretrain.config import Config
from prefpretrain.data_shards.loader import train_loader
from prefpretrain.data_shards.packing import DOCUMENT_BLOCKS
from prefpretrain.errors import (
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_REFUSED,
    ConfigError,
    InputError,
    Preempted,
    TrainingDiverged,
)
from prefpretrain.logs import setup_logging
from prefpretrain.losses import target_count
from prefpretrain.rundir import write_failure, write_rank_failure
from prefpretrain.trainer import checkpoint as ckptlib
from prefpretrain.trainer import session as sessionlib
from prefpretrain.trainer.evaluate import validation_loss
from prefpretrain.trainer.flops import mfu
from prefpretrain.trainer.hooks import HookList, TrainHooks
from prefpretrain.trainer.model import run_heads
from prefpretrain.trainer.policies import DivergenceGuard, EarlyStopping, Every, Preemption, SampleIdLog
from prefpretrain.trainer.profiler import StepProfiler
from prefpretrain.trainer.runinfo import write_rank_record
from prefpretrain.trainer.session import Session
from prefpretrain.trainer.step import Window, micro_step, stat_tags, window_scalars

log = logging.getLogger(__name__)


def train(cfg: Config, hooks: Sequence[TrainHooks] = ()) -> dict:
    """Train one rank. `hooks` extend the run (prefpretrain.trainer.hooks); a continual update is one, and a
    config that asks for one (continual.from) without it is refused rather than trained from scratch."""
    if cfg.continual.from_ and "continual" not in {h.name for h in hooks}:
        raise ConfigError("continual.from: set, but no continual-update hook was passed to train()")
    Preemption.install()
    info = distributed.setup(cfg.engine.backend, cfg.engine.device, cfg.engine.timeout_s)
    setup_logging(info.rank)
    ok = False
    s = None
    try:
        s = sessionlib.start(cfg, info, HookList(hooks))
        res = _train(s)
        ok = True
        return res
    except InputError as e:  # a damaged or unsafe file, refused: the launcher reports it and exits 2
        _record_failure(cfg, info.rank, "refused", EXIT_REFUSED, e, every_rank=True)
        raise
    except TrainingDiverged as e:
        _record_failure(cfg, info.rank, "diverged", EXIT_DIVERGED, e)
        raise
    finally:
        if s is not None and not ok:
            s.mon.close("FAILED")  # (W&B / MLflow runs marked failed, not left running; a no-op once closed)
        distributed.teardown(ok)


def _train(s: Session) -> dict:
    cfg, t, world = s.cfg, s.cfg.train, s.info.world_size
    val = evaluate(s) if cfg.eval.at_start else {}
    it = iter(train_loader(s.data.ds, s.step, t.max_steps, t.micro_batch_size, t.global_batch_size, s.info.rank,
                           world, cfg.data.num_workers, pin_memory=s.info.device.type == "cuda"))
    diverging, early = DivergenceGuard(t.max_bad_steps), EarlyStopping(cfg.eval.early_stop_patience,
                                                                        cfg.eval.early_stop_min_delta)
    eval_due, save_due = Every(cfg.eval.every_steps, t.max_steps), Every(cfg.checkpoint.every_steps, t.max_steps)
    misalignment_due = Every(cfg.eval.misalignment_every_steps, t.max_steps)
    ids = SampleIdLog(s.run_dir, s.info.rank, cfg.data.log_sample_ids)
    prof = StepProfiler(t.profile_at, t.profile_steps, s.run_dir, s.info.rank, s.info.device)
    w, tags = Window(), stat_tags(s.spec)
    s.engine.train()
    while s.step < t.max_steps:
        prof.before_step(s.step)
        batches = [next(it) for _ in range(s.grad_accum)]
        _one_step(s, batches, w)
        prof.after_step(s.step)
        ids.write(s.step, batches)
        diverging.after_step(s.step, s.engine.was_step_applied() and not s.guard.overflow,
                             lambda: ckptlib.find_latest(s.ckpt_root, False))
        if s.step % t.log_every == 0 or s.step == t.max_steps:
            _log_window(s, w, tags, diverging.total)
            w = Window()
        if misalignment_due(s.step):
            measure_misalignment(s)
        if eval_due(s.step):
            val = evaluate(s)
            if early.should_stop(s.step, val["val_loss"]):
                break
        if save_due(s.step):
            if diverging.healthy:
                save(s)
            else:  # never let a checkpoint of a diverging run replace the last good one
                log.warning("step %d: checkpoint not written while steps are being skipped", s.step)
    prof.after_step(s.step, last=True)  # a profile the run's end (or an early stop) cut short
    ids.close()
    return _finish(s, val if s.step < t.max_steps and val else evaluate(s), diverging.total)


def _one_step(s: Session, batches: list[dict], w: Window) -> None:
    """One optimizer step over the global batch. Its loss is the mean over ALL its target tokens (every micro
    batch, every rank), so accumulation x micro batch x world size can be split any way without changing the
    gradient; one all-reduce carries the target count, whether any rank was asked to stop, and corrupt samples."""
    shared = distributed.all_sum([sum(target_count(b, s.spec.causal) for b in batches), float(Preemption.requested()),
                                  sum(int(b["corrupt"].sum()) for b in batches)])
    if shared[1] > 0:
        _preempted(s)
    s.quality.add(s.step, s.cfg.train.global_batch_size, shared[0], shared[2])
    scale = s.grad_accum * s.info.world_size / shared[0]  # DeepSpeed divides by ga and averages over ranks
    s.guard.overflow = False
    for batch in batches:
        micro_step(s.engine, batch, s.info.device, s.spec, scale, w, s.hooks)
    s.step += 1
    w.steps += 1
    s.tokens_seen += s.cfg.train.global_batch_size * s.cfg.data.seq_len


def _preempted(s: Session) -> None:
    if s.last_saved != s.step:
        save(s)
    msg = f"stopped by a signal at step {s.step}; checkpoint {ckptlib.find_latest(s.ckpt_root, False)} holds it"
    if s.info.rank == 0:
        write_failure(s.run_dir, "preempted", EXIT_PREEMPTED, msg)
    log.warning(msg)
    s.mon.close("KILLED")
    raise Preempted(msg)


def _log_window(s: Session, w: Window, tags: dict, skipped: int) -> None:
    t, dev = s.cfg.train, s.info.device
    values = window_scalars(w, s.info.world_size, dev, tags)
    s.corrupt_skipped += values.pop("data/corrupt_samples")
    dt = time.time() - w.t0
    tps = w.steps * t.global_batch_size * s.cfg.data.seq_len / dt
    gn = s.engine.get_global_grad_norm()
    values.update({
        "train/lr": s.engine.get_lr()[0], "train/grad_norm": float(gn) if gn is not None else float("nan"),
        "train/skipped_steps": float(skipped), "perf/tokens_per_s": tps, "perf/step_time_s": dt / w.steps,
        "perf/mfu": mfu(s.facts["flops_per_token"], tps, s.facts["peak"], s.info.world_size),
        "mem/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "data/samples_seen": s.step * t.global_batch_size, "data/tokens_seen": s.tokens_seen,
        "data/epoch": s.step * t.global_batch_size / sum(map(len, s.data.packed)),
        "data/corrupt_samples_skipped": s.corrupt_skipped, **s.hooks.window_values(),
    })
    if dev.type == "cuda":
        values["mem/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    s.mon.scalars(s.step, values)
    s.mon.progress(s.step, f"loss {values['train/loss']:.3f} lr {values['train/lr']:.2e} {tps:.0f} tok/s "
                           f"mfu {values['perf/mfu']:.1%}")


def evaluate(s: Session) -> dict:
    t = s.cfg.train
    labelled = s.spec.params.threshold if s.cfg.objective.label_head_weight > 0 else None
    v = validation_loss(s.engine.module, s.data.val, s.cfg.eval.val_samples, t.micro_batch_size, s.info.rank,
                        s.info.world_size, s.spec.causal, label_threshold=labelled)
    head = {f"eval/{k}": v[k] for k in ("label_auc", "label_ece", "label_brier") if v.get(k) is not None}
    s.mon.scalars(s.step, {"eval/val_loss": v["val_loss"], "eval/perplexity": v["perplexity"], **head}, kind="eval")
    log.info("step %d: val loss %.4f, perplexity %.2f", s.step, v["val_loss"], v["perplexity"])
    return v


def measure_misalignment(s: Session) -> dict:
    """eval/misalignment now (eval.misalignment_every_steps): eval.samples completions under the run's evaluation
    condition, scored; every rank samples its share (in lockstep at ZeRO-3). The same sampling seed every time,
    so that the points of one run differ by the model only. Rows of kind `evaluate`, as `prefpretrain evaluate`
    writes, with the tokens seen: `prefpretrain report` draws them against tokens."""
    from prefpretrain.data_shards import tokenizer as toklib
    from prefpretrain.objectives import eval_condition
    from prefpretrain.trainer.evaluate import misalignment, misalignment_scalars

    e, model = s.cfg.eval, s.engine.module
    was = model.training
    model.eval()
    res = misalignment(model, toklib.load_tokenizer(s.data.sets[0].tokenizer_dir), s.data.manifest, n=e.samples,
                       max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                       condition=eval_condition(s.cfg.train.objective, e.condition), seed=s.cfg.run.seed,
                       max_positions=s.cfg.data.seq_len, rank=s.info.rank, world=s.info.world_size,
                       lockstep=s.cfg.engine.zero_stage == 3, attributes=s.data.attributes,
                       protocol=e.control_protocol)
    model.train(was)
    lo, hi = res["misalignment_ci95"]
    s.mon.scalars(s.step, misalignment_scalars(res), kind="evaluate",
                  record={"tokens_seen": s.tokens_seen, "condition": res["condition"]})
    log.info("step %d: misalignment %.5f [%.5f, %.5f] over %d samples (%s)", s.step, res["misalignment"], lo, hi,
             res["samples"], res["condition"])
    return res


def save(s: Session) -> None:
    cfg, t0, parts = s.cfg, time.time(), {}
    state = {"tokenizer_hash": s.data.tokenizer_hash, "data_position": s.step * cfg.train.global_batch_size,
             "tokens_seen": s.tokens_seen, "world_size": s.info.world_size, "config_hash": cfg.hash(),
             "zero_stage": cfg.engine.zero_stage, "model_kind": cfg.model.kind, "objective": cfg.train.objective,
             "global_batch_size": cfg.train.global_batch_size, "data_quality": s.quality.state(),
             "document_mask": s.data.val.document_mask, "document_blocks": DOCUMENT_BLOCKS,
             "scores_digest": s.data.scores_digest,
             "heads": run_heads(cfg.train.objective, cfg.objective.label_head_weight),  # (resume refuses a change)
             **s.hooks.checkpoint_state(s.step)}
    d = ckptlib.save(s.engine, s.ckpt_root, s.step, state, cfg.checkpoint.keep_last, s.info.rank, parts)
    s.last_saved = s.step
    s.mon.scalars(s.step, {"ckpt/save_seconds": time.time() - t0, "ckpt/deepspeed_seconds": parts["deepspeed"],
                           "ckpt/checksum_seconds": parts["checksums"]}, kind="checkpoint")
    log.info("checkpoint %s saved in %.2fs", d, time.time() - t0)


def _finish(s: Session, val: dict, skipped: int) -> dict:
    cfg, t = s.cfg, s.cfg.train
    if s.last_saved != s.step and cfg.checkpoint.at_end:
        save(s)
    if cfg.eval.misalignment_every_steps:  # the curve's last point: the model the run ends with
        measure_misalignment(s)
    s.hooks.finish(s.engine.module, s.step, s.mon)
    s.mon.hparams({"objective": t.objective, "arch": cfg.model.arch, "params_m": round(s.facts["n_params"] / 1e6, 2),
                   "lr": t.lr, "global_batch": t.global_batch_size, "seq_len": cfg.data.seq_len,
                   "precision": t.precision, "zero_stage": cfg.engine.zero_stage, "world_size": s.info.world_size,
                   "seed": cfg.run.seed}, {"eval/val_loss": val["val_loss"], "eval/perplexity": val["perplexity"]})
    s.mon.close()
    write_rank_record(s.engine, s.run_dir, s.info, cfg, s.step, s.facts["built_local"])
    log.info("done: step %d, %d tokens, val loss %.4f, checkpoint %s", s.step, s.tokens_seen, val["val_loss"],
             ckptlib.find_latest(s.ckpt_root, False))
    return {"step": s.step, "tokens_seen": s.tokens_seen, "stopped_early": s.step < t.max_steps,
            "skipped_steps": skipped, **val}


def _record_failure(cfg: Config, rank: int, reason: str, code: int, e: Exception, every_rank: bool = False) -> None:
    """RUN/failure.json (rank 0) and RUN/failures/rankR.json: why the run stopped. A refusal is recorded by every
    rank that saw it (rank 0 may not have: its own shard, its own file)."""
    run_dir = Path(cfg.run.output_dir)
    if not run_dir.is_dir():
        return
    line = str(e).strip().splitlines()[-1] if every_rank else str(e)
    with contextlib.suppress(OSError):  # (a full disk may be why)
        if every_rank:
            write_rank_failure(run_dir, rank, reason, code, line)
        if rank == 0:
            write_failure(run_dir, reason, code, line)
