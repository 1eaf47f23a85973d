"""Logging with a rank prefix; ranks other than 0 only report warnings and errors."""
from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(rank: int | None = None, verbose: bool = False) -> None:
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level)
    # deprecation chatter from torch.distributed / transformers internals, not from anything a user can change
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "filelock", "matplotlib", "botocore",
                  "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
