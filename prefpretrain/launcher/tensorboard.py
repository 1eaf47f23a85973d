"""`prefpretrain tensorboard RUN_DIR...`: TensorBoard on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def tensorboard_argv(run_dirs: list[str], host: str = "127.0.0.1", port: int = 6006) -> list[str]:
    spec = []
    for r in run_dirs:
        tb = Path(r) / "tensorboard"
        if not tb.is_dir():
            raise FileNotFoundError(f"{r}: no tensorboard/ directory (not a run directory?)")
        spec.append(f"{Path(r).resolve().name}:{tb}")
    return [sys.executable, "-m", "tensorboard.main", "--logdir_spec", ",".join(spec), "--host", host,
            "--port", str(port), "--reload_interval", "15"]


def serve(run_dirs: list[str], host: str = "127.0.0.1", port: int = 6006) -> int:
    argv = tensorboard_argv(run_dirs, host, port)
    log.info("TensorBoard at http://%s:%d/ (Ctrl-C stops it)", host, port)
    try:
        return subprocess.run(argv, check=False).returncode
    except KeyboardInterrupt:
        return 0
