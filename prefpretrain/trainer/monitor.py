"""Rank-0 telemetry: the run's loggers (TensorBoard, W&B, MLflow: prefpretrain.trainer.loggers), metrics.jsonl,
and log lines / a progress bar."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from prefpretrain.config import MonitorConfig
from prefpretrain.errors import describe
from prefpretrain.rundir import METRICS
from prefpretrain.trainer.loggers import open_loggers

log = logging.getLogger(__name__)


class Monitor:
    """What rank 0 records while training: each scalar to every logger in `monitor.loggers` (`mon`, a
    MonitorConfig) and to metrics.jsonl; the config once; hparams and final metrics at the end."""

    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, start_step: int = 0, config: dict | None = None,
                 config_text: str = "", mon: MonitorConfig | None = None):
        self.enabled = enabled
        self.loggers, self.bar = [], None
        if not enabled:
            return
        self.loggers = open_loggers(mon or MonitorConfig(), run_dir)
        if config_text:
            self._each("config", config or {}, config_text, start_step)
        self.metrics = open(run_dir / METRICS, "a")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train", record: dict | None = None) -> None:
        """Write values to every logger (tags as given, e.g. 'train/loss') and one JSON line (with `record`'s
        fields, which are not scalars of their own, e.g. tokens_seen)."""
        if not self.enabled:
            return
        self._each("scalars", step, values)
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **(record or {})}
        rec.update({tag.split("/", 1)[-1] if kind == "train" else tag: v for tag, v in values.items()})
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()

    def progress(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            log.info("step %d | %s", step, text)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's main settings and final metrics (TensorBoard's HPARAMS tab, W&B's config and summary,
        MLflow's tags)."""
        if not self.enabled:
            return
        self._each("hparams", hparams, metrics)

    def close(self, status: str = "FINISHED") -> None:
        """`status`: FINISHED, FAILED (the run stopped on an error) or KILLED (pre-empted; a resume continues)."""
        if not self.enabled or self.metrics.closed:
            return
        if self.bar is not None:
            self.bar.close()
        self._each("close", status)
        self.metrics.close()

    def _each(self, method: str, *args) -> None:
        """Call every logger; one that fails (a tracking server gone mid-run) is dropped with a warning, not
        allowed to stop the training of every rank (metrics.jsonl and the other loggers keep the record)."""
        for lg in list(self.loggers):
            try:
                getattr(lg, method)(*args)
            except Exception as e:  # noqa: BLE001 - any backend's error: the run goes on without that logger
                log.warning("logger %s failed (%s); it logs nothing more in this process", type(lg).__name__,
                            describe(e))
                self.loggers.remove(lg)
