"""Checks before any process starts that need more than the config itself: the device, the DeepSpeed config
the options imply, and the paths a run reads (shard sets, a pretrained model, the earlier run of an update).

`prefpretrain.config` checks values alone; this module sits above the data, trainer and continual layers and is
called by the CLI, so that the config module imports none of them.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefpretrain.config import Config, load_config
from prefpretrain.errors import ConfigError


def cuda_wanted(device: str | None) -> bool:
    """Whether `engine.device` / `--device` means a GPU here (auto: one that torch sees)."""
    from prefpretrain.host import use_cuda

    return use_cuda(device or "auto")


def check_device(cfg: Config) -> None:
    """What the chosen device cannot do, said before any process starts."""
    check_gpu_if_asked(cfg.engine.device, "engine.device")
    cuda = cuda_wanted(cfg.engine.device)
    if not cuda and cfg.train.precision == "fp16":
        raise ConfigError("train.precision: fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    if not cuda and cfg.engine.backend == "nccl":
        raise ConfigError("engine.backend: nccl needs GPUs; use gloo (or auto) on CPU")


def check_gpu_if_asked(device: str | None, key: str = "--device") -> None:
    if device == "cuda" and not cuda_wanted("auto"):
        raise ConfigError(f"{key}: cuda asked for, but torch sees no GPU")


def check_engine(cfg: Config, world: int) -> None:
    """The DeepSpeed config the options imply, with engine.deepspeed merged (conflicts are one line, here)."""
    from prefpretrain.trainer.dsconfig import ds_config
    from prefpretrain.trainer.loggers import check_loggers

    cfg.grad_accum_for(world)
    check_device(cfg)
    check_loggers(cfg.monitor.loggers)
    ds_config(cfg, world)


def check_paths(cfg: Config) -> None:
    """Paths the run needs must exist (called once the shards were built)."""
    if not cfg.data.shards:
        raise ConfigError("data.shards: no shard set given")
    from prefpretrain.data_shards import remote, storage
    from prefpretrain.data_shards.writer import FORMAT_VERSION, MANIFEST, READABLE_FORMATS

    remote.configure(cfg.data.cache_dir or None, cfg.data.cache_max_gb)
    for i, s in enumerate(cfg.data.shards):
        try:
            local = remote.mirror(s.path) if storage.is_url(s.path) else Path(s.path)
        except (storage.StorageError, OSError) as e:
            raise ConfigError(f"data.shards[{i}].path: {e}") from None
        mf = local / MANIFEST
        if not mf.is_file():
            raise ConfigError(f"data.shards[{i}].path: no {MANIFEST} in {s.path!r} (run `prefpretrain shard`)")
        try:
            fmt = json.loads(mf.read_text()).get("format_version")
        except json.JSONDecodeError:
            raise ConfigError(f"data.shards[{i}].path: {mf} is not valid JSON") from None
        if fmt not in READABLE_FORMATS:
            raise ConfigError(f"data.shards[{i}].path: shard format {fmt} in {s.path!r}, this prefpretrain reads "
                              f"{FORMAT_VERSION}: shard again (prefpretrain shard --overwrite)")
        _check_column(cfg, i, json.loads(mf.read_text()))
    fp = cfg.model.from_pretrained
    if fp and not (Path(fp) / "config.json").is_file():
        raise ConfigError(f"model.from_pretrained: no HF model directory at {fp!r}")
    if cfg.continual.from_:
        from prefpretrain.continual.previous import check_previous

        check_previous(cfg)  # the earlier run exists, has a checkpoint, and used the same tokenizer


def validated(config: str, overrides: list[str], world: int, need_paths: bool = True) -> Config:
    cfg = load_config(config, overrides)
    check_engine(cfg, world)
    if need_paths:
        check_paths(cfg)
    return cfg


def _check_column(cfg: Config, i: int, manifest: dict) -> None:
    """The score columns the objective reads must exist in every shard set; eval.condition names attributes of the
    run."""
    from prefpretrain import conditioning
    from prefpretrain.data_shards.columns import columns_of, stored_column

    for k, a in enumerate(cfg.objective.attributes):
        if a.column not in columns_of(manifest):
            path = cfg.data.shards[i].path
            raise ConfigError(f"objective.attributes[{k}].column: {a.column!r} is not a score column of {path!r} (it "
                              f"has {', '.join(columns_of(manifest))}; `prefpretrain rescore {path} --scorer NAME` "
                              f"adds one)")
    if cfg.eval.condition != "auto":
        attrs = conditioning.run_attributes(cfg.objective, manifest["tokenizer"], stored_column(manifest))
        try:
            conditioning.control_ids(attrs, cfg.eval.condition)
        except ValueError as e:
            raise ConfigError(f"eval.{e}") from None
