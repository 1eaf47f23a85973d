"""The run directory, declared: every file and folder a run writes, named once (no dependencies: every layer
may name them).

    config.yaml          the resolved config (what `train` ran with; later commands read it back)
    run_info.json        world size, hosts, versions, git commit, model facts; earlier starts under `history`
    deepspeed_config.json  the DeepSpeed config the options implied (rank 0)
    model_config/        the HF model config (architecture; weights live in the checkpoints)
    checkpoints/         step_NNNNNNNN/ (state.json + DeepSpeed files, checksummed) and `latest`
    metrics.jsonl        one JSON record per logged step / evaluation / checkpoint
    tensorboard/         TensorBoard event files
    wandb/ mlruns/       W&B offline runs and the MLflow file store (monitor.loggers), loggers.json their run ids
    profile/             torch profiler traces (train.profile_at)
    sample_ids/          rankR.jsonl: global sample positions per step (data.log_sample_ids)
    ranks/               rankR.json: who each rank was and a checksum of what it holds
    failure.json         why the run stopped (refused / diverged / preempted), written by rank 0
    failures/            rankR.json: the same, from any rank that saw it
    eval.json            `prefpretrain evaluate`
    summary.json         `prefpretrain run`
    export/              `prefpretrain run`'s HF export (also `evaluate --lm-eval`'s, of the newest checkpoint)
    lm_eval/             `evaluate --lm-eval`: tasks/ (the builtin tasks' data and YAMLs), cache/ (their datasets cache)
    report/              `prefpretrain run`'s report of the run (report.md, the trade-off figure, curves)
    forgetting.json      a continual update's report (before -> after)
    replay/ memory/      a continual update's replay memory, and the memory it leaves for the next update
    continual/           start.pt (earlier weights, Fisher), before.json
    slurm/ accelerate/   generated job scripts and launcher configs
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

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
REPORT = "report"
LOGGERS = "loggers.json"
LM_EVAL = "lm_eval"
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

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write (text or bytes), fsync, rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_failure(run_dir: Path, reason: str, exit_code: int, message: str) -> None:
    """RUN/failure.json: why a run stopped, for the launcher (torchrun only reports 'a child failed')."""

    atomic_write(run_dir / FAILURE, json.dumps({"reason": reason, "exit_code": exit_code, "message": message,
                                                        "time": time.time()}, indent=1))


def write_rank_failure(run_dir: Path, rank: int, reason: str, exit_code: int, message: str) -> None:
    """RUN/failures/rankR.json: a stop only this rank saw (a damaged shard it read, its own optimizer file,
    its write on a full disk); rank 0 may never get to write failure.json."""
    d = run_dir / FAILURES
    d.mkdir(exist_ok=True)
    atomic_write(d / f"rank{rank}.json", json.dumps({"reason": reason, "exit_code": exit_code,
                                                        "message": message, "time": time.time()}, indent=1))


def read_failure(run_dir: Path, since: float) -> dict | None:
    """Why a run stopped, written since `since`: failure.json (every rank agreed), else the earliest rank's."""
    found = []
    for p in [run_dir / FAILURE, *sorted((run_dir / FAILURES).glob("rank*.json"))]:
        try:
            f = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(f, dict) and f.get("time", 0) >= since:
            found.append((p.name != FAILURE, f.get("time", 0), f))  # the agreed one first, then the earliest
    return min(found, key=lambda x: x[:2])[2] if found else None
