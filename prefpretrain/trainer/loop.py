"""The training loop: one process per rank, under torchrun, srun, or alone."""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from prefpretrain.config import Config, ConfigError
from prefpretrain.data_shards.loader import MixtureDataset, train_loader
from prefpretrain.data_shards.packing import MaskSpec, PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.launcher import dist as distlib
from prefpretrain.logs import setup_logging
from prefpretrain.trainer import checkpoint as ckptlib
from prefpretrain.trainer.engine import build_engine
from prefpretrain.trainer.evaluate import validation_loss
from prefpretrain.trainer.model import build_model, count_params
from prefpretrain.trainer.monitor import Monitor
from prefpretrain.trainer.objectives import batch_pref_stats, compute_loss, layout_for
from prefpretrain.trainer.runinfo import check_agreement, write_run_files

log = logging.getLogger(__name__)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def open_data(cfg: Config):
    """Train shard sets, their shared tokenizer facts, and the validation set of the first one."""
    sets = [ShardSet(s.path, "train", verify=cfg.data.verify_checksums) for s in cfg.data.shards]
    hashes = {s.tokenizer_hash for s in sets}
    if len(hashes) > 1:
        raise ConfigError(f"data.shards: shard sets use different tokenizers ({', '.join(sorted(hashes))})")
    manifest = sets[0].manifest
    val = ShardSet(cfg.data.shards[0].path, "val", verify=cfg.data.verify_checksums)
    return sets, val, manifest


def mask_spec(cfg: Config, manifest: dict) -> MaskSpec | None:
    """Masking for masked LMs (None for causal ones)."""
    if cfg.model.kind != "masked":
        return None
    sp = manifest["tokenizer"]["special_ids"]
    return MaskSpec(mask_id=sp["mask"], vocab_size=manifest["tokenizer"]["vocab_size"],
                    special_ids=tuple(sorted(set(sp.values()))), prob=cfg.model.mlm_probability, seed=cfg.run.seed)


def train(cfg: Config) -> dict:
    info = distlib.setup(cfg.engine.backend, cfg.engine.device)
    rank, _world = info.rank, info.world_size
    setup_logging(rank)
    try:
        return _train(cfg, info)
    finally:
        distlib.teardown()


def _train(cfg: Config, info) -> dict:
    rank, world, dev = info.rank, info.world_size, info.device
    run_dir = Path(cfg.run.output_dir)
    ga = cfg.grad_accum_for(world)
    sets, val_set, manifest = open_data(cfg)
    sp = manifest["tokenizer"]["special_ids"]
    check_agreement(world, {"config_hash": cfg.hash(), "tokenizer_hash": sets[0].tokenizer_hash,
                            "shards": [s.manifest["splits"]["train"]["shards"][0]["sha256"] for s in sets]})
    causal = cfg.model.kind == "causal"

    layout = layout_for(cfg.train.objective, cfg.objective.threshold, cfg.objective.drop_prob, cfg.run.seed, sp)
    mlm = mask_spec(cfg, manifest)
    skip = cfg.data.on_corrupt == "skip"
    packed = [PackedSet(s, layout, cfg.data.seq_len, mlm, skip) for s in sets]
    for s, p in zip(cfg.data.shards, packed, strict=False):
        if len(p) == 0:
            raise ConfigError(f"data.shards: {s.path} yields no {cfg.data.seq_len}-token sample for objective "
                              f"{cfg.train.objective!r}")
    ds = MixtureDataset(packed, [s.weight for s in cfg.data.shards], cfg.run.seed)
    val_packed = PackedSet(val_set, layout, cfg.data.seq_len, mlm)

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    model = build_model(cfg.model, manifest["tokenizer"]["vocab_size"], cfg.data.seq_len, sp)
    n_params = count_params(model)
    write_run_files(run_dir, cfg, world, rank, {
        "n_params": n_params, "grad_accum": ga, "tokenizer_hash": sets[0].tokenizer_hash,
        "train_samples": [len(p) for p in packed], "val_samples": len(val_packed), "layout": layout.kind,
    })
    if rank == 0:
        model.config.save_pretrained(str(run_dir / "model_config"))
    engine = build_engine(cfg, model, world, run_dir if rank == 0 else None)

    ckpt_root = run_dir / "checkpoints"
    start_step, tokens_seen = 0, 0
    ckpt = None
    if cfg.run.resume == "auto":
        ckpt = ckptlib.find_latest(ckpt_root)
    elif cfg.run.resume != "never":
        ckpt = Path(cfg.run.resume)
    if ckpt is not None:
        st = ckptlib.read_state(ckpt)
        if st["world_size"] != world:
            raise ConfigError(f"run.resume: checkpoint {ckpt} was written by {st['world_size']} ranks, this run has "
                              f"{world}; resuming at another world size is not supported yet")
        if st["config_hash"] != cfg.hash():
            log.warning("resuming %s written with another config (hash %s, now %s)", ckpt, st["config_hash"],
                        cfg.hash())
        ckptlib.load(engine, ckpt, rank)
        start_step, tokens_seen = st["step"], st["tokens_seen"]
        log.info("resumed from %s at step %d (data position %d)", ckpt, start_step, st["data_position"])

    mon = Monitor(run_dir, rank == 0, cfg.train.max_steps, start_step, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log.info("training %s (%.2fM params) with %s on %d rank(s), ZeRO-%d, %s, %d x %d x %d = %d samples/step",
             cfg.model.arch, n_params / 1e6, cfg.train.objective, world, cfg.engine.zero_stage, cfg.train.precision,
             cfg.train.micro_batch_size, world, ga, cfg.train.global_batch_size)

    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    step = start_step
    last_ckpt_step = start_step if ckpt is not None else -1
    val = {}
    loader = train_loader(ds, start_step, cfg.train.max_steps, cfg.train.micro_batch_size, G, rank, world,
                          cfg.data.num_workers)
    it = iter(loader)
    window = {"loss": 0.0, "n": 0, "t": time.time(), "steps": 0, "score_mean": 0.0, "aligned_fraction": 0.0}
    corrupt = 0
    engine.train()
    while step < cfg.train.max_steps:
        for _ in range(ga):
            batch = next(it)
            logits = engine(input_ids=batch["input_ids"].to(dev)).logits
            b = {k: v.to(dev) for k, v in batch.items()}
            loss, _ = compute_loss(cfg.train.objective, logits, b, causal)
            engine.backward(loss)
            engine.step()
            window["loss"] += float(loss.detach())
            window["n"] += 1
            corrupt += int(batch["corrupt"].sum())
            ps = batch_pref_stats(batch, cfg.objective.threshold)
            window["score_mean"] += ps["score_mean"]
            window["aligned_fraction"] += ps["aligned_fraction"]
        step += 1
        tokens_seen += G * L
        window["steps"] += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            t = torch.tensor([window["loss"], window["score_mean"], window["aligned_fraction"], corrupt],
                             dtype=torch.float64)
            if world > 1:
                dist.all_reduce(t)
            t[:3] /= window["n"] * world
            dt = time.time() - window["t"]
            gn = engine.get_global_grad_norm()
            values = {
                "train/loss": float(t[0]), "train/lr": engine.get_lr()[0],
                "train/grad_norm": float(gn) if gn is not None else float("nan"),
                "perf/tokens_per_s": window["steps"] * G * L / dt, "perf/step_time_s": dt / window["steps"],
                "mem/rss_gb": _rss_gb(), "data/samples_seen": step * G, "data/tokens_seen": tokens_seen,
                "pref/score_mean": float(t[1]), "pref/aligned_fraction": float(t[2]),
                "train/skipped_steps": float(getattr(engine, "skipped_steps", 0)),
                "data/corrupt_samples_skipped": float(t[3]),
            }
            mon.scalars(step, values)
            mon.progress(step, f"loss {values['train/loss']:.3f} lr {values['train/lr']:.2e} "
                               f"{values['perf/tokens_per_s']:.0f} tok/s")
            window = {"loss": 0.0, "n": 0, "t": time.time(), "steps": 0, "score_mean": 0.0, "aligned_fraction": 0.0}

        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.max_steps:
            val = validation_loss(engine.module, val_packed, cfg.eval.val_samples, cfg.train.micro_batch_size,
                                  rank, world, causal)
            mon.scalars(step, {"eval/val_loss": val["val_loss"], "eval/perplexity": val["perplexity"]}, kind="eval")
            log.info("step %d: val loss %.4f, perplexity %.2f", step, val["val_loss"], val["perplexity"])

        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < cfg.train.max_steps:
            _save(engine, cfg, ckpt_root, step, tokens_seen, world, rank, sets[0].tokenizer_hash)
            last_ckpt_step = step

    val = validation_loss(engine.module, val_packed, cfg.eval.val_samples, cfg.train.micro_batch_size, rank, world,
                          causal)
    mon.scalars(step, {"eval/val_loss": val["val_loss"], "eval/perplexity": val["perplexity"]}, kind="eval")
    if last_ckpt_step != step:
        _save(engine, cfg, ckpt_root, step, tokens_seen, world, rank, sets[0].tokenizer_hash)
    mon.close()
    _rank_record(engine, run_dir, info, cfg, step)
    log.info("done: step %d, %d tokens, val loss %.4f, checkpoint %s", step, tokens_seen, val["val_loss"],
             ckptlib.find_latest(ckpt_root))
    return {"step": step, "tokens_seen": tokens_seen, **val}


def _rank_record(engine, run_dir: Path, info, cfg: Config, step: int) -> None:
    """RUN/ranks/rankR.json: who this rank was and a checksum of the parameters it holds, so anyone can
    check that the ranks trained one model together (ZeRO-3 ranks hold different partitions)."""
    import hashlib
    import json
    import socket

    h = hashlib.sha256()
    for name, p in sorted(engine.module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    rec = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
           "host": socket.gethostname(),
           "backend": info.backend, "device": str(info.device), "step": step, "zero_stage": cfg.engine.zero_stage,
           "param_checksum": h.hexdigest()[:32] if cfg.engine.zero_stage < 3 else None}
    d = run_dir / "ranks"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{info.rank}.json").write_text(json.dumps(rec, indent=1))


def _save(engine, cfg: Config, ckpt_root: Path, step: int, tokens_seen: int, world: int, rank: int,
          tokenizer_hash: str) -> None:
    state = {"tokenizer_hash": tokenizer_hash,
        "data_position": step * cfg.train.global_batch_size, "tokens_seen": tokens_seen, "world_size": world,
        "config_hash": cfg.hash(), "zero_stage": cfg.engine.zero_stage, "model_kind": cfg.model.kind,
        "objective": cfg.train.objective, "global_batch_size": cfg.train.global_batch_size,
    }
    t0 = time.time()
    d = ckptlib.save(engine, ckpt_root, step, state, cfg.checkpoint.keep_last, rank)
    log.info("checkpoint %s saved in %.1fs", d, time.time() - t0)
