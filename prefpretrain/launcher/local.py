"""Start ranks on this machine with torchrun (c10d rendezvous); argv lists only, never a shell."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from prefpretrain.launcher.dist import free_port

log = logging.getLogger(__name__)


def torchrun_argv(config: str, overrides: list[str], nproc_per_node: int, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--max-restarts", str(max_restarts),
        "-m", "prefpretrain", "train", config, *overrides,
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: ranks x threads must not exceed the cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    from prefpretrain.trainer.engine import extensions_cache

    env["TORCH_EXTENSIONS_DIR"] = extensions_cache()
    return env


def launch_local(config: str, overrides: list[str], nproc_per_node: int, max_restarts: int = 0) -> int:
    argv = torchrun_argv(config, overrides, nproc_per_node, max_restarts)
    log.info("launch: %s", " ".join(argv))
    return subprocess.run(argv, env=child_env()).returncode
