"""Rank-0 telemetry: TensorBoard scalars, metrics.jsonl, and log lines / a progress bar."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, start_step: int = 0, config_text: str = ""):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if config_text:
            self.writer.add_text("config", "```\n" + config_text + "\n```", start_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train", record: dict | None = None) -> None:
        """Write values to TensorBoard (tags as given, e.g. 'train/loss') and one JSON line (with `record`'s
        fields, which are not scalars of their own, e.g. tokens_seen)."""
        if not self.enabled:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **(record or {})}
        rec.update({tag.split("/", 1)[-1] if kind == "train" else tag: v for tag, v in values.items()})
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        self.writer.flush()

    def progress(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            log.info("step %d | %s", step, text)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's main settings and final metrics in TensorBoard's HPARAMS tab (same event file)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        for s in hp_summary(clean, metrics):
            self.writer.file_writer.add_summary(s)
        self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.metrics.close()
