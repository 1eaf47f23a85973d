"""The training loop: one process per rank, under torchrun, srun, or alone.

`train(cfg)` = set up (data, model, engine, resume) -> the loop below -> final eval + checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from prefpretrain import distributed
from prefpretrain.config import Config, ConfigError, InputError
from prefpretrain.data_shards.loader import MixtureDataset, train_loader
from prefpretrain.data_shards.packing import MaskSpec, PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.logs import setup_logging
from prefpretrain.trainer import checkpoint as ckptlib
from prefpretrain.trainer.engine import build_engine, local_param_elements, partitioned_build
from prefpretrain.trainer.evaluate import validation_loss
from prefpretrain.trainer.flops import flops_per_token, mfu, peak_flops
from prefpretrain.trainer.model import apply_freeze, attach_value_head, build_model, count_params
from prefpretrain.trainer.monitor import Monitor
from prefpretrain.trainer.objectives import (
    ObjectiveParams,
    layout_for,
    needs_value_head,
    reward_scale_for,
    target_count,
)
from prefpretrain.trainer.profiler import StepProfiler
from prefpretrain.trainer.resume import resume_point
from prefpretrain.trainer.runinfo import check_agreement, write_run_files
from prefpretrain.trainer.step import StepSpec, Window, micro_step, window_scalars

log = logging.getLogger(__name__)


EXIT_DIVERGED = 3  # exit code of `train` when it stops for non-finite steps; the last good checkpoint is intact
EXIT_PREEMPTED = 4  # exit code after SIGTERM / SIGUSR1: a checkpoint of the current step was written


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Preempted(RuntimeError):
    """SIGTERM or SIGUSR1 arrived; the run saved a checkpoint and stopped."""


_STOP = {"signal": None}


def _on_signal(signum, _frame) -> None:
    if signum == signal.SIGINT and _STOP["signal"] is not None:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    _STOP["signal"] = signum  # acted on at the next step boundary, by every rank at once


def open_data(cfg: Config):
    """Train shard sets, their shared tokenizer facts, and the validation set of the first one."""
    sets = [ShardSet(s.path, "train", verify=cfg.data.verify_checksums) for s in cfg.data.shards]
    hashes = {s.tokenizer_hash for s in sets}
    if len(hashes) > 1:
        raise ConfigError(f"data.shards: shard sets use different tokenizers ({', '.join(sorted(hashes))})")
    val = ShardSet(cfg.data.shards[0].path, "val", verify=cfg.data.verify_checksums)
    return sets, val, sets[0].manifest


def mask_spec(cfg: Config, manifest: dict) -> MaskSpec | None:
    """Masking for masked LMs (None for causal ones)."""
    if cfg.model.kind != "masked":
        return None
    sp = manifest["tokenizer"]["special_ids"]
    return MaskSpec(mask_id=sp["mask"], vocab_size=manifest["tokenizer"]["vocab_size"],
                    special_ids=tuple(sorted(set(sp.values()))), prob=cfg.model.mlm_probability, seed=cfg.run.seed)


def check_data(cfg: Config, step: int, targets: float, corrupt: float, seen: int) -> None:
    """A step with no target token (every sample corrupt, or empty) is an error, not a loss of 0; so is more
    than data.max_corrupt_fraction of corrupt samples (data.on_corrupt=skip; the shards are named in the log),
    judged once 10 / fraction samples were seen (counted over the whole run, resumes included), so that one
    early corrupt sample does not stop a run that tolerates a few."""
    if targets == 0:
        raise InputError(f"step {step + 1}: the global batch holds no target token ({int(corrupt)} of {seen} samples "
                         f"so far touched corrupt shards): nothing to train on")
    f = cfg.data.max_corrupt_fraction
    if corrupt > f * seen and seen >= (10 / f if f > 0 else 0):
        raise InputError(f"data.max_corrupt_fraction: {int(corrupt)} of the {seen} samples of this run touched "
                         f"corrupt shards ({corrupt / seen:.1%} > {cfg.data.max_corrupt_fraction:.1%}); the shards "
                         f"are named in the log. Re-shard them, or raise data.max_corrupt_fraction")


def objective_params(cfg: Config, manifest: dict) -> ObjectiveParams:
    o = cfg.objective
    return ObjectiveParams(threshold=o.threshold, ul_alpha=o.ul_alpha, beta=o.beta, awr_alpha=o.awr_alpha,
                           max_weight=o.max_weight,
                           reward_scale=reward_scale_for(o.reward_scale, manifest["splits"]["train"]["score_stats"]))


def train(cfg: Config) -> dict:
    # SIGTERM, SLURM's SIGUSR1 and Ctrl-C's SIGINT: checkpoint at the next step boundary, failure.json, exit 4
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _on_signal)
    # `prefpretrain launch` starts torchrun (and so the ranks) with SIGUSR1 blocked: one that is pending from
    # start-up is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})
    info = distributed.setup(cfg.engine.backend, cfg.engine.device, cfg.engine.timeout_s)
    setup_logging(info.rank)
    ok = False
    try:
        res = _train(cfg, info)
        ok = True
        return res
    except InputError as e:  # a damaged or unsafe file, refused: the launcher reports it and exits 2
        run_dir = Path(cfg.run.output_dir)
        if run_dir.is_dir():  # every rank that saw it: rank 0 may not have (its own shard, its own file)
            line = str(e).strip().splitlines()[-1]
            with contextlib.suppress(OSError):  # (a full disk may be why)
                ckptlib.write_rank_failure(run_dir, info.rank, "refused", 2, line)
                if info.rank == 0:
                    ckptlib.write_failure(run_dir, "refused", 2, line)
        raise
    finally:
        distributed.teardown(ok)


def _train(cfg: Config, info) -> dict:
    rank, world, dev = info.rank, info.world_size, info.device
    run_dir = Path(cfg.run.output_dir)
    t, ga = cfg.train, cfg.grad_accum_for(world)
    G, L = t.global_batch_size, cfg.data.seq_len
    causal = cfg.model.kind == "causal"

    # ---- data
    sets, val_set, manifest = open_data(cfg)
    sp = manifest["tokenizer"]["special_ids"]
    check_agreement(world, {"config_hash": cfg.hash(), "tokenizer_hash": sets[0].tokenizer_hash,
                            "shards": [s.manifest["splits"]["train"]["shards"][0]["sha256"] for s in sets]})
    layout = layout_for(t.objective, cfg.objective.threshold, cfg.objective.drop_prob, cfg.run.seed, sp)
    mlm = mask_spec(cfg, manifest)
    packed = [PackedSet(s, layout, L, mlm, cfg.data.on_corrupt == "skip") for s in sets]
    for s, p in zip(cfg.data.shards, packed, strict=True):
        if len(p) == 0:
            raise ConfigError(f"data.shards: {s.path} yields no {L}-token sample for objective {t.objective!r}")
    ds = MixtureDataset(packed, [s.weight for s in cfg.data.shards], cfg.run.seed)
    # validation judges the model on all held-out text: filtering selects what it trains on, not what it is judged on
    val_layout = layout_for("mle", 0.0, 0.0, cfg.run.seed, sp) if layout.kind == "filter" else layout
    val_packed = PackedSet(val_set, val_layout, L, mlm)
    if len(val_packed) == 0:
        raise ConfigError(f"data.shards[0]: the validation split of {cfg.data.shards[0].path} yields no {L}-token "
                          f"sample ({len(val_set)} documents): shard with a larger --val-fraction or a lower "
                          f"data.seq_len")
    cont = None  # a continual update: replay memory, the earlier model, EWC / distillation, forgetting
    if cfg.continual.from_:
        from prefpretrain.continual.update import ContinualUpdate

        cont = ContinualUpdate.start(cfg, run_dir, rank, world, dev, layout, mlm, manifest["tokenizer"]["vocab_size"])
        ds = cont.wrap(ds)

    # ---- model and engine
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    with partitioned_build(cfg, world) if cfg.engine.zero3_init == "partitioned" else nullcontext():
        model = cont.model if cont else build_model(cfg.model, manifest["tokenizer"]["vocab_size"], L, sp,
                                                    cuda=dev.type == "cuda", precision=t.precision)
    built_local = local_param_elements(model)
    with_values = needs_value_head(t.objective)
    if with_values and not hasattr(model, "value_head"):
        attach_value_head(model)
    op = objective_params(cfg, manifest)
    spec = StepSpec(t.objective, causal, op, cfg.adversarial, with_values, cfg.run.seed, t.cross_entropy == "chunked")
    n_params, flops_token = count_params(model), flops_per_token(model, L)
    n_frozen = apply_freeze(model, cfg.model.freeze)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    peak, peak_source = peak_flops(t.precision, dev, t.peak_flops)
    write_run_files(run_dir, cfg, world, rank, {
        "n_params": n_params, "n_frozen": n_frozen, "grad_accum": ga, "tokenizer_hash": sets[0].tokenizer_hash,
        "train_samples": [len(p) for p in packed], "val_samples": len(val_packed), "layout": layout.kind,
        "peak_flops_per_rank": peak, "peak_flops_source": peak_source, "model_flops_per_token": flops_token,
        "reward_scale": op.reward_scale, "slurm": distributed.slurm_facts(),
    })
    if rank == 0:
        model.config.save_pretrained(str(run_dir / "model_config"))

    # ---- resume (at any world size: the data position is world-size independent, and ZeRO states
    # written by another number of ranks are converted to a DeepSpeed universal checkpoint)
    ckpt_root = run_dir / "checkpoints"
    step, tokens_seen = 0, 0
    ckpt, st, load_from = resume_point(cfg, ckpt_root, rank, world, sets[0].tokenizer_hash, cont)
    engine, guard = build_engine(cfg, model, world, run_dir if rank == 0 else None,
                                 load_universal=load_from is not None and load_from != ckpt)
    if ckpt is not None:
        t_load = time.time()
        ckptlib.load(engine, load_from, rank)
        t_load = time.time() - t_load
        step, tokens_seen = st["step"], st["tokens_seen"]
        log.info("resumed from %s at step %d (data position %d)", ckpt, step, st["data_position"])
    last_ckpt_step = step if ckpt is not None else -1

    mon = Monitor(run_dir, rank == 0, t.max_steps, step, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if ckpt is not None:
        mon.scalars(step, {"ckpt/load_seconds": t_load}, kind="checkpoint")
    log.info("training %s (%.2fM params, %.2fM frozen) with %s on %d rank(s), ZeRO-%d, %s, %d x %d x %d = %d "
             "samples/step; peak %.1f GFLOP/s per rank", cfg.model.arch, n_params / 1e6, n_frozen / 1e6,
             t.objective, world, cfg.engine.zero_stage, t.precision, t.micro_batch_size, world, ga, G, peak / 1e9)

    def evaluate(at: int) -> dict:
        v = validation_loss(engine.module, val_packed, cfg.eval.val_samples, t.micro_batch_size, rank, world, causal)
        mon.scalars(at, {"eval/val_loss": v["val_loss"], "eval/perplexity": v["perplexity"]}, kind="eval")
        log.info("step %d: val loss %.4f, perplexity %.2f", at, v["val_loss"], v["perplexity"])
        return v

    def save(at: int) -> None:
        state = {"tokenizer_hash": sets[0].tokenizer_hash, "data_position": at * G, "tokens_seen": tokens_seen,
                 "world_size": world, "config_hash": cfg.hash(), "zero_stage": cfg.engine.zero_stage,
                 "model_kind": cfg.model.kind, "objective": t.objective, "global_batch_size": G,
                 "data_quality": {"samples": seen_here, "corrupt": corrupt_here}}
        if cont:
            state["continual"] = cont.state(at)
        t0 = time.time()
        parts: dict = {}
        d = ckptlib.save(engine, ckpt_root, at, state, cfg.checkpoint.keep_last, rank, parts)
        mon.scalars(at, {"ckpt/save_seconds": time.time() - t0, "ckpt/deepspeed_seconds": parts["deepspeed"],
                         "ckpt/checksum_seconds": parts["checksums"]}, kind="checkpoint")
        log.info("checkpoint %s saved in %.2fs", d, time.time() - t0)

    if cfg.eval.at_start:
        evaluate(step)

    # ---- the loop
    it = iter(train_loader(ds, step, t.max_steps, t.micro_batch_size, G, rank, world, cfg.data.num_workers,
                           pin_memory=dev.type == "cuda"))
    ids_log = None
    if cfg.data.log_sample_ids:
        (run_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
        ids_log = open(run_dir / "sample_ids" / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - closed at the end
    prof = StepProfiler(t.profile_at, t.profile_steps, run_dir, rank, dev)
    w = Window()
    corrupt, bad_run, bad_total, best, evals_since_best, stopped_early = 0.0, 0, 0, float("inf"), 0, False
    # samples of the run so far (resumes included), and how many touched a corrupt shard
    seen_here, corrupt_here = (st or {}).get("data_quality", {}).get("samples", 0), \
        (st or {}).get("data_quality", {}).get("corrupt", 0.0)
    val: dict = {}
    engine.train()
    while step < t.max_steps:
        prof.before_step(step)
        guard.overflow = False
        micro_batches = [next(it) for _ in range(ga)]
        # the step's loss is the mean over ALL its target tokens (every micro batch, every rank), so
        # accumulation x micro batch x world size can be split any way without changing the gradient
        # one all-reduce carries the step's target count and whether any rank was asked to stop
        shared = distributed.all_sum([sum(target_count(b, causal) for b in micro_batches),
                                      float(_STOP["signal"] is not None),
                                      sum(int(b["corrupt"].sum()) for b in micro_batches)])
        if shared[1] > 0:
            if last_ckpt_step != step:
                save(step)
            msg = f"stopped by a signal at step {step}; checkpoint {ckptlib.find_latest(ckpt_root, False)} holds it"
            if rank == 0:
                ckptlib.write_failure(run_dir, "preempted", EXIT_PREEMPTED, msg)
            log.warning(msg)
            mon.close()
            raise Preempted(msg)
        seen_here, corrupt_here = seen_here + G, corrupt_here + shared[2]
        check_data(cfg, step, shared[0], corrupt_here, seen_here)
        scale = ga * world / shared[0]  # DeepSpeed divides by ga and averages over ranks
        for batch in micro_batches:
            micro_step(engine, batch, dev, spec, scale, w, cont)
        step += 1
        prof.after_step(step)
        w.steps += 1
        tokens_seen += G * L
        if ids_log is not None:
            ids_log.write(json.dumps({"step": step, "rank": rank,
                                      "ids": [int(j) for b in micro_batches for j in b["position"]]}) + "\n")
            ids_log.flush()

        if engine.was_step_applied() and not guard.overflow:
            bad_run = 0
        else:  # DeepSpeed (ZeRO-1/2, fp16 scaling) or our guard skipped it: a non-finite gradient
            bad_run, bad_total = bad_run + 1, bad_total + 1
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, bad_run)
            if bad_run >= t.max_bad_steps:
                msg = (f"{bad_run} consecutive steps had a non-finite loss or gradient (train.max_bad_steps="
                       f"{t.max_bad_steps}); stopping at step {step}. The last good checkpoint is "
                       f"{ckptlib.find_latest(ckpt_root, False)}; lower train.lr or check the data")
                if rank == 0:
                    ckptlib.write_failure(run_dir, "diverged", EXIT_DIVERGED, msg)
                raise TrainingDiverged(msg)

        if step % t.log_every == 0 or step == t.max_steps:
            values = window_scalars(w, world, dev)
            corrupt += values.pop("data/corrupt_samples")
            dt = time.time() - w.t0
            tps = w.steps * G * L / dt
            gn = engine.get_global_grad_norm()
            values.update({
                "train/lr": engine.get_lr()[0], "train/grad_norm": float(gn) if gn is not None else float("nan"),
                "train/skipped_steps": float(bad_total), "perf/tokens_per_s": tps, "perf/step_time_s": dt / w.steps,
                "perf/mfu": mfu(flops_token, tps, peak, world),
                "mem/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                "data/samples_seen": step * G, "data/tokens_seen": tokens_seen,
                "data/epoch": step * G / sum(map(len, packed)), "data/corrupt_samples_skipped": corrupt,
            })
            if cont:
                values.update(cont.window_values())
            if dev.type == "cuda":
                values["mem/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
            mon.scalars(step, values)
            mon.progress(step, f"loss {values['train/loss']:.3f} lr {values['train/lr']:.2e} {tps:.0f} tok/s "
                               f"mfu {values['perf/mfu']:.1%}")
            w = Window()

        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < t.max_steps:
            v = val = evaluate(step)
            if cfg.eval.early_stop_patience:
                if v["val_loss"] < best - cfg.eval.early_stop_min_delta:
                    best, evals_since_best = v["val_loss"], 0
                else:
                    evals_since_best += 1
                if evals_since_best >= cfg.eval.early_stop_patience:
                    log.info("early stop at step %d: no improvement over %.4f by more than %g in %d evaluations",
                             step, best, cfg.eval.early_stop_min_delta, evals_since_best)
                    stopped_early = True
                    break

        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < t.max_steps:
            if bad_run:  # never let a checkpoint of a diverging run replace the last good one
                log.warning("step %d: checkpoint not written while steps are being skipped", step)
            else:
                save(step)
                last_ckpt_step = step

    prof.after_step(step, last=True)  # a profile the run's end (or an early stop) cut short
    if not stopped_early:  # (an early stop has just measured it)
        val = evaluate(step)
    if last_ckpt_step != step and cfg.checkpoint.at_end:
        save(step)
    if cont:
        cont.finish(engine.module, step, mon)
    mon.hparams({"objective": t.objective, "arch": cfg.model.arch, "params_m": round(n_params / 1e6, 2),
                 "lr": t.lr, "global_batch": G, "seq_len": L, "precision": t.precision,
                 "zero_stage": cfg.engine.zero_stage, "world_size": world, "seed": cfg.run.seed},
                {"eval/val_loss": val["val_loss"], "eval/perplexity": val["perplexity"]})
    mon.close()
    if ids_log is not None:
        ids_log.close()
    _rank_record(engine, run_dir, info, cfg, step, built_local)
    log.info("done: step %d, %d tokens, val loss %.4f, checkpoint %s", step, tokens_seen, val["val_loss"],
             ckptlib.find_latest(ckpt_root, False))
    return {"step": step, "tokens_seen": tokens_seen, "stopped_early": stopped_early, "skipped_steps": bad_total,
            **val}


def _rank_record(engine, run_dir: Path, info, cfg: Config, step: int, built_local: int) -> None:
    """RUN/ranks/rankR.json: who this rank was, what it holds, and a checksum of its parameters, so anyone can
    check that the ranks trained one model together (ZeRO-3 ranks hold different partitions)."""
    import hashlib
    import socket

    h = hashlib.sha256()
    for name, p in sorted(engine.module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    rec = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
           "host": socket.gethostname(), "backend": info.backend, "device": str(info.device),
           "comm_device": str(distributed.comm_device()), "step": step,
           "zero_stage": cfg.engine.zero_stage, "local_param_elements": local_param_elements(engine.module),
           "param_elements_when_built": built_local,
           "param_checksum": h.hexdigest()[:32] if cfg.engine.zero_stage < 3 else None,
           "slurm": distributed.slurm_facts()}
    d = run_dir / "ranks"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{info.rank}.json").write_text(json.dumps(rec, indent=1))
