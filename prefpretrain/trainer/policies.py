"""The loop's policies, one small part each: pre-emption by signal, the divergence guard, early stopping,
when to checkpoint, and the sample-id log. Each holds its own state and is tested alone."""
from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from prefpretrain.errors import TrainingDiverged

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """SIGTERM, SLURM's SIGUSR1 and Ctrl-C's SIGINT: noted, and acted on at the next step boundary by every rank
    at once (checkpoint, failure.json, exit 4). A second Ctrl-C stops at once (KeyboardInterrupt)."""

    signal: int | None = None

    @classmethod
    def install(cls) -> None:
        cls.signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, cls._on_signal)
        # `prefpretrain launch` starts torchrun (and so the ranks) with SIGUSR1 blocked: one that is pending from
        # start-up is delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))

    @classmethod
    def _on_signal(cls, signum, _frame) -> None:
        if signum == signal.SIGINT and cls.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        cls.signal = signum

    @classmethod
    def requested(cls) -> bool:
        return cls.signal is not None


class DivergenceGuard:
    """Counts steps that DeepSpeed or the engine's guard skipped for a non-finite loss or gradient; too many in a
    row stop the run (exit 3) with the last good checkpoint intact."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps, self.in_a_row, self.total = max_bad_steps, 0, 0

    @property
    def healthy(self) -> bool:
        return self.in_a_row == 0

    def after_step(self, step: int, applied: bool, last_good: Callable[[], Path | None]) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(f"{self.in_a_row} consecutive steps had a non-finite loss or gradient "
                                   f"(train.max_bad_steps={self.max_bad_steps}); stopping at step {step}. The last "
                                   f"good checkpoint is {last_good()}; lower train.lr or check the data")


class EarlyStopping:
    """Stop once `patience` evaluations in a row did not improve the best validation loss by more than
    `min_delta` (patience 0: never)."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta, self.best, self.since_best = patience, min_delta, float("inf"), 0

    def should_stop(self, step: int, val_loss: float) -> bool:
        if not self.patience:
            return False
        if val_loss < self.best - self.min_delta:
            self.best, self.since_best = val_loss, 0
        else:
            self.since_best += 1
        if self.since_best < self.patience:
            return False
        log.info("early stop at step %d: no improvement over %.4f by more than %g in %d evaluations", step,
                 self.best, self.min_delta, self.since_best)
        return True


class Every:
    """`every` steps (0: never), not at the last step (the run's end has its own rule)."""

    def __init__(self, every: int, last: int):
        self.every, self.last = every, last

    def __call__(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.last


class SampleIdLog:
    """RUN/sample_ids/rankR.jsonl (data.log_sample_ids): the global positions this rank trained on per step."""

    def __init__(self, run_dir: Path, rank: int, on: bool):
        self.rank, self.f = rank, None
        if on:
            (run_dir / "sample_ids").mkdir(parents=True, exist_ok=True)
            self.f = open(run_dir / "sample_ids" / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - closed by close()

    def write(self, step: int, batches: list[dict]) -> None:
        if self.f is not None:
            ids = [int(j) for b in batches for j in b["position"]]
            self.f.write(json.dumps({"step": step, "rank": self.rank, "ids": ids}) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
