"""`prefpretrain tensorboard RUN_DIR...`: TensorBoard on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

from prefpretrain.launcher.children import die_with_parent

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
    """TensorBoard as a child that dies with this process (Ctrl-C, SIGTERM, even SIGKILL)."""
    argv = tensorboard_argv(run_dirs, host, port)
    log.info("TensorBoard at http://%s:%d/ (Ctrl-C stops it)", host, port)
    child = subprocess.Popen(argv, preexec_fn=die_with_parent())
    stopped: list[int] = []

    def stop(signum, _frame) -> None:
        stopped.append(signum)
        child.terminate()

    old = signal.signal(signal.SIGTERM, stop)
    try:
        rc = child.wait()
        return 0 if stopped else rc
    except KeyboardInterrupt:
        child.terminate()
        child.wait(timeout=30)
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
