"""torch.profiler over a few optimizer steps of a run (`train.profile_at`, `train.profile_steps`).

Every rank writes RUN/profile/rank<R>.trace.json (a Chrome trace: open it in https://ui.perfetto.dev or
chrome://tracing) and RUN/profile/rank<R>.ops.txt (operators by self time, the table that says where a
step's time goes); rank 0 logs the top operators. The profiled steps run slower than the others, and the
log window that holds them reports lower tokens/s.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, start: int, steps: int, run_dir: Path, rank: int, device: torch.device):
        self.start, self.stop_at = start, start + steps  # steps are counted as completed optimizer steps
        self.dir, self.rank, self.device = run_dir / "profile", rank, device
        self.prof = None

    def before_step(self, step: int) -> None:
        """Call before optimizer step `step + 1` runs."""
        if self.start and step == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.start()
            self.t0 = time.perf_counter()

    def after_step(self, step: int, last: bool = False) -> None:
        """Call after optimizer step `step` is done; `last`: the loop ends here (stop early)."""
        if self.prof is None or (step < self.stop_at and not last):
            return
        prof, self.prof = self.prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        n = max(1, step - self.start)
        wall = (time.perf_counter() - self.t0) / n
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        ops = prof.key_averages()
        busy = sum(e.self_cpu_time_total for e in ops) / 1e6 / n
        table = ops.table(sort_by=key, row_limit=40, max_name_column_width=70)
        head = (f"steps {self.start + 1}..{step} (rank {self.rank}), operators by {key}\n"
                f"wall time {wall:.3f} s per step, operators' own CPU time {busy:.3f} s per step: the rest "
                f"({max(0.0, wall - busy):.3f} s) is this thread waiting (collectives, data, other threads)\n")
        (self.dir / f"rank{self.rank}.ops.txt").write_text(head + table + "\n")
        if self.rank == 0:
            log.info("profile of steps %d..%d written to %s; %stop operators:\n%s", self.start + 1, step, self.dir,
                     head.split("\n", 1)[1], "\n".join(table.splitlines()[:14]))
