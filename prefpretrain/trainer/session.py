"""Setting up one rank's training: data, model, engine, resume point and monitor, as one `Session` the loop
runs. Every step here is a function of the config (and, at a resume, of the checkpoint)."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from prefpretrain import distributed
from prefpretrain.config import Config
from prefpretrain.errors import ConfigError
from prefpretrain.objectives import get_objective, resolved
from prefpretrain.rundir import CHECKPOINTS, MODEL_CONFIG
from prefpretrain.trainer import checkpoint as ckptlib
from prefpretrain.trainer.data import DataQuality, TrainData, open_data, training_data
from prefpretrain.trainer.engine import build_engine, local_param_elements, partitioned_build
from prefpretrain.trainer.flops import flops_per_token, peak_flops
from prefpretrain.trainer.hooks import HookList, TrainContext
from prefpretrain.trainer.model import apply_freeze, attach_heads, build_model, count_params, has_dropout, run_heads
from prefpretrain.trainer.monitor import Monitor
from prefpretrain.trainer.resume import resume_point
from prefpretrain.trainer.runinfo import check_agreement, write_run_files
from prefpretrain.trainer.step import StepSpec

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: Config
    info: distributed.DistInfo
    hooks: HookList
    data: TrainData
    engine: object  # the DeepSpeed engine
    guard: object  # the engine's non-finite guard (ZeRO-0)
    spec: StepSpec
    mon: Monitor
    quality: DataQuality
    step: int = 0
    tokens_seen: int = 0
    last_saved: int = -1  # the step of the newest checkpoint of this run (-1: none)
    corrupt_skipped: float = 0.0  # samples of this start that touched a corrupt shard (data.on_corrupt=skip)
    facts: dict = field(default_factory=dict)  # n_params, n_frozen, flops_per_token, peak, built_local

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / CHECKPOINTS

    @property
    def grad_accum(self) -> int:
        return self.cfg.grad_accum_for(self.info.world_size)


def _build_model(cfg: Config, info, data: TrainData, hooks: HookList):
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    dev, L = info.device, cfg.data.seq_len
    with partitioned_build(cfg, info.world_size) if cfg.engine.zero3_init == "partitioned" else nullcontext():
        model = hooks.initial_model()
        model = model if model is not None else build_model(cfg.model, data.vocab_size, L, data.special,
                                                     cuda=dev.type == "cuda", precision=cfg.train.precision)
    facts = {"built_local": local_param_elements(model)}
    o = cfg.objective
    attach_heads(model, run_heads(cfg.train.objective, o.label_head_weight))
    if o.similarity_weight > 0 and o.similarity_positive == "dropout" and not has_dropout(model):
        raise ConfigError(f"objective.similarity_positive: dropout views of this {cfg.model.arch} model are "
                          f"identical (it has no dropout: model.dropout does not reach it, or model.extra / its "
                          f"pretrained config sets 0); give it dropout or use neighbour")
    facts.update(n_params=count_params(model), flops_per_token=flops_per_token(model, L))
    facts["n_frozen"] = apply_freeze(model, cfg.model.freeze)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    facts["peak"], facts["peak_source"] = peak_flops(cfg.train.precision, dev, cfg.train.peak_flops)
    return model, facts


def start(cfg: Config, info, hooks: HookList) -> Session:
    rank, world, run_dir = info.rank, info.world_size, Path(cfg.run.output_dir)
    sets, val_set, manifest = open_data(cfg)
    # before any rank can refuse alone: ranks that read another config or other shards would wait on each other
    check_agreement(world, {"config_hash": cfg.hash(), "tokenizer_hash": sets[0].tokenizer_hash,
                            "shards": [s.manifest["splits"]["train"]["shards"][0]["sha256"] for s in sets],
                            "score_columns": [s.score_key() for s in sets]})
    data = training_data(cfg, sets, val_set, manifest)
    hooks.start(TrainContext(cfg, run_dir, rank, world, info.device, data.layout, data.mlm, data.vocab_size))
    data.ds = hooks.wrap_dataset(data.ds)
    model, facts = _build_model(cfg, info, data, hooks)
    op = resolved(cfg.objective, data.score_stats)
    t = cfg.train
    spec = StepSpec(t.objective, cfg.model.kind == "causal", op, cfg.adversarial,
                    get_objective(t.objective).value_head, cfg.run.seed, t.cross_entropy == "chunked")
    write_run_files(run_dir, cfg, world, rank, {
        "n_params": facts["n_params"], "n_frozen": facts["n_frozen"], "grad_accum": cfg.grad_accum_for(world),
        "tokenizer_hash": data.tokenizer_hash, "train_samples": [len(p) for p in data.packed],
        "val_samples": len(data.val), "layout": data.layout.kind, "peak_flops_per_rank": facts["peak"],
        "peak_flops_source": facts["peak_source"], "model_flops_per_token": facts["flops_per_token"],
        "reward_scale": op.reward_scale, "slurm": distributed.slurm_facts()})
    if rank == 0:
        model.config.save_pretrained(str(run_dir / MODEL_CONFIG))
    # resume at any world size: the data position is world-size independent, and ZeRO states written by
    # another number of ranks are converted to a DeepSpeed universal checkpoint
    ckpt, st, load_from = resume_point(cfg, run_dir / CHECKPOINTS, rank, world, data.tokenizer_hash, hooks,
                                       data.scores_digest)
    engine, guard = build_engine(cfg, model, world, run_dir if rank == 0 else None,
                                 load_universal=load_from is not None and load_from != ckpt)
    s = Session(cfg, info, hooks, data, engine, guard, spec, None, DataQuality(cfg.data.max_corrupt_fraction, st),
                facts=facts)
    t_load = _load(s, ckpt, st, load_from)
    s.mon = distributed.rank0_does("opening the loggers", lambda: Monitor(
        run_dir, True, t.max_steps, s.step, cfg.to_dict(), yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        cfg.monitor)) or Monitor(run_dir, False, t.max_steps)
    if ckpt is not None:
        s.mon.scalars(s.step, {"ckpt/load_seconds": t_load}, kind="checkpoint")
    log.info("training %s (%.2fM params, %.2fM frozen) with %s on %d rank(s), ZeRO-%d, %s, %d x %d x %d = %d "
             "samples/step; peak %.1f GFLOP/s per rank", cfg.model.arch, facts["n_params"] / 1e6,
             facts["n_frozen"] / 1e6, t.objective, world, cfg.engine.zero_stage, t.precision, t.micro_batch_size,
             world, s.grad_accum, t.global_batch_size, facts["peak"] / 1e9)
    return s


def _load(s: Session, ckpt: Path | None, st: dict | None, load_from: Path | None) -> float:
    if ckpt is None:
        return 0.0
    t0 = time.time()
    ckptlib.load(s.engine, load_from, s.info.rank)
    s.step, s.tokens_seen, s.last_saved = st["step"], st["tokens_seen"], st["step"]
    log.info("resumed from %s at step %d (data position %d)", ckpt, s.step, st["data_position"])
    return time.time() - t0
