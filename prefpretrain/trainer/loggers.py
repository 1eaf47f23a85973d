"""Experiment loggers: where rank 0's scalars, hparams and config go (`monitor.loggers`).

One small interface (`Logger`), one class per backend: TensorBoard (the default, always installed), Weights &
Biases (`.[wandb]`; offline by default: files in RUN/wandb that `wandb sync` uploads later) and MLflow
(`.[mlflow]`; a local file store in RUN/mlruns by default, or a tracking server). Each receives exactly what the
Monitor hands on — the same scalar tags (`train/loss`, `eval/val_loss`, ...), the config once, the hparams and
final metrics at the end. The W&B and MLflow run ids are kept in RUN/loggers.json, so a resumed run (pre-empted,
restarted, evaluated later) continues the same W&B / MLflow run instead of starting another.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

from prefpretrain.errors import ConfigError, InputError, describe
from prefpretrain.rundir import LOGGERS as IDS  # W&B / MLflow run ids of a run directory
from prefpretrain.rundir import TENSORBOARD, atomic_write

KNOWN = {"tensorboard": None, "wandb": "wandb", "mlflow": "mlflow"}  # logger -> the module (and extra) it needs


class Logger(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def config(self, cfg: dict, text: str, step: int) -> None: ...

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...  # FINISHED, FAILED or KILLED (pre-empted)


def check_loggers(names: list[str]) -> None:
    """Known names whose packages are installed: one line otherwise (before any process starts)."""
    for n in names:
        if n not in KNOWN:
            raise ConfigError(f"monitor.loggers: unknown logger {n!r} (choose from {', '.join(KNOWN)})")
        if KNOWN[n] and importlib.util.find_spec(KNOWN[n]) is None:
            raise ConfigError(f"monitor.loggers: {n} is not installed; pip install 'prefpretrain[{n}]'")
    if len(set(names)) != len(names):
        raise ConfigError(f"monitor.loggers: a logger is listed twice in {names}")


def open_loggers(mon, run_dir: Path) -> list[Logger]:
    """The loggers `mon` (a MonitorConfig) asks for, writing for the run in `run_dir` (rank 0 only)."""
    check_loggers(mon.loggers)
    ids_path = run_dir / IDS
    try:
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    except ValueError:
        raise InputError(f"{ids_path}: not valid JSON (the W&B / MLflow run ids of this run); remove it to log to "
                         f"new runs") from None
    out: list[Logger] = []
    for n in mon.loggers:
        try:
            if n == "tensorboard":
                out.append(TensorBoardLogger(run_dir))
            elif n == "wandb":
                out.append(WandbLogger(run_dir, mon, ids.setdefault("wandb", uuid.uuid4().hex[:12])))
            else:
                store = f"{mon.mlflow_tracking_uri or 'RUN/mlruns'} {mon.mlflow_experiment}"  # (an id is per store)
                old = ids["mlflow"] if isinstance(ids.get("mlflow"), dict) else {}
                lg = MLflowLogger(run_dir, mon, old.get("run_id") if old.get("store") == store else None)
                ids["mlflow"] = {"run_id": lg.run_id, "store": store}
                out.append(lg)
            if ids:  # (as each starts: none is left without its id; TensorBoard alone needs none)
                atomic_write(ids_path, json.dumps(ids, indent=1))
        except Exception as e:  # noqa: BLE001 - a server unreachable, a store unusable, ...: one line
            for lg in out:  # (the ones already started are closed, not left running)
                lg.close("FAILED")
            raise InputError(f"monitor.loggers: {n} could not start ({describe(e, 300)})") from None
    return out


def _plain(hparams: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def config(self, cfg: dict, text: str, step: int) -> None:
        self.writer.add_text("config", "```\n" + text + "\n```", step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """In TensorBoard's HPARAMS tab (same event file)."""
        from torch.utils.tensorboard.summary import hparams as hp_summary

        for s in hp_summary(_plain(hparams), metrics):
            self.writer.file_writer.add_summary(s)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run: scalars against the training step as their x axis (`step`, so a resumed run's repeated steps are
    kept, not dropped as W&B's own step would), config, hparams in the config and final metrics in the summary.
    Console capture off (our logs stay ours). Online, a run directory is one W&B run (id in RUN/loggers.json,
    resumed by every later process). Offline, W&B cannot append to a run (`wandb sync` of two offline directories
    of one id keeps one history), so each process (a start, a resume, an evaluate) is its own run, ID-0, ID-1,
    ..., in one group named after the run directory and ID."""

    def __init__(self, run_dir: Path, mon, base_id: str):
        import wandb

        name = run_dir.resolve().name
        if mon.wandb_mode == "offline":
            n = len(list((run_dir / "wandb").glob(f"offline-run-*-{base_id}-*")))
            kw = {"id": f"{base_id}-{n}", "group": f"{name}-{base_id}", "name": f"{name}-{n}"}
        else:
            kw = {"id": base_id, "resume": "allow", "name": name}
        self.run = wandb.init(project=mon.wandb_project, dir=str(run_dir), mode=mon.wandb_mode,
                              settings=wandb.Settings(console="off", silent=True), **kw)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def config(self, cfg: dict, text: str, step: int) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        self.run.config.update({"hparams": _plain(hparams)}, allow_val_change=True)
        self.run.summary.update(metrics)

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MLflowLogger:
    """An MLflow run (id kept in RUN/loggers.json) through the tracking client: scalars as metrics (same tags) at
    their step, the config as flattened params (a fresh run only: MLflow params cannot change) and as an artifact
    config.yaml, hparams as tags and final metrics."""

    def __init__(self, run_dir: Path, mon, run_id: str | None):
        from mlflow.tracking import MlflowClient

        uri = mon.mlflow_tracking_uri
        if not uri:  # a local file store: MLflow 3 keeps it in "maintenance mode" behind this switch
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(mon.mlflow_experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(mon.mlflow_experiment)
        self.resumed = run_id is not None
        if self.resumed:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.resolve().name).info.run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def config(self, cfg: dict, text: str, step: int) -> None:
        from mlflow.entities import Param

        self.client.log_text(self.run_id, text, f"config-step{step}.yaml")
        if not self.resumed:
            flat = _flatten(cfg)
            params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(params), 100):  # (MLflow's bound per batch)
                self.client.log_batch(self.run_id, params=params[i: i + 100])

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        for k, v in _plain(hparams).items():  # (the final metrics are already scalars at their step)
            self.client.set_tag(self.run_id, f"hparams.{k}", str(v))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
