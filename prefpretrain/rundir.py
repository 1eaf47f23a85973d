"""The run directory, declared: every file and folder a run writes, named once.

    config.yaml          the resolved config (what `train` ran with; later commands read it back)
    run_info.json        world size, hosts, versions, git commit, model facts; earlier starts under `history`
    deepspeed_config.json  the DeepSpeed config the options implied (rank 0)
    model_config/        the HF model config (architecture; weights live in the checkpoints)
    checkpoints/         step_NNNNNNNN/ (state.json + DeepSpeed files, checksummed) and `latest`
    metrics.jsonl        one JSON record per logged step / evaluation / checkpoint
    tensorboard/         TensorBoard event files
    profile/             torch profiler traces (train.profile_at)
    sample_ids/          rankR.jsonl: global sample positions per step (data.log_sample_ids)
    ranks/               rankR.json: who each rank was and a checksum of what it holds
    failure.json         why the run stopped (refused / diverged / preempted), written by rank 0
    failures/            rankR.json: the same, from any rank that saw it
    eval.json            `prefpretrain evaluate`
    summary.json         `prefpretrain run`
    export/              `prefpretrain run`'s HF export
    forgetting.json      a continual update's report (before -> after)
    replay/ memory/      a continual update's replay memory, and the memory it leaves for the next update
    continual/           start.pt (earlier weights, Fisher), before.json
    slurm/ accelerate/   generated job scripts and launcher configs
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefpretrain.config import Config, load_config
from prefpretrain.errors import ConfigError

CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
DEEPSPEED_CONFIG = "deepspeed_config.json"
MODEL_CONFIG = "model_config"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
SAMPLE_IDS = "sample_ids"
RANKS = "ranks"
FAILURE = "failure.json"
FAILURES = "failures"
EVAL = "eval.json"
SUMMARY = "summary.json"
EXPORT = "export"
FORGETTING = "forgetting.json"
REPLAY = "replay"
MEMORY = "memory"
CONTINUAL = "continual"
SLURM = "slurm"
ACCELERATE = "accelerate"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def model_config(self) -> Path:
        return self.path / MODEL_CONFIG

    def is_run(self) -> bool:
        """Written by `train`: a config and a model config (checkpoints may still be missing)."""
        return (self.path / CONFIG).is_file() and self.model_config.is_dir()

    def config(self) -> Config:
        """The config the run trained with."""
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"{self.path}: no {CONFIG} (not a prefpretrain run directory?)")
        return load_config(self.path / CONFIG)

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None
