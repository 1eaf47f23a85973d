"""Facts about this host that a launcher needs without importing torch: whether torch can use a GPU here, a
free port, the CPUs this process may use, and where DeepSpeed caches the ops it builds.

`prefpretrain launch` and the other preflight steps start in a fraction of a second because of it; the ranks
ask the same functions (prefpretrain.distributed decides devices through `use_cuda`).
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _torch_build_has_gpu() -> bool:
    """False only for a CPU-only torch build (torch/version.py: cuda and hip are None), read without importing
    torch; any other build (or a version file we cannot read) might see a GPU."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return True
    return not all(re.search(rf"^{k}(: [^=]+)? = None$", text, re.M) for k in ("cuda", "hip"))


def torch_sees_gpu() -> bool:
    """torch.cuda.is_available(); on a CPU-only torch build, known without importing torch."""
    if not _torch_build_has_gpu():
        return False
    import torch

    return torch.cuda.is_available()


def use_cuda(device: str) -> bool:
    """engine.device / --device -> whether to compute on CUDA (auto: when torch sees a GPU)."""
    return torch_sees_gpu() if device == "auto" else device == "cuda"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpus_available() -> int:
    """The CPUs this process may run on: its affinity (under SLURM the task's CPUs), not the whole machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def extensions_cache() -> str:
    """DeepSpeed JIT-builds ops (the CPU shared-memory comm op, ~45 s): cache them once per checkout."""
    default = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"
    d = os.environ.get("TORCH_EXTENSIONS_DIR") or str(default)
    os.environ["TORCH_EXTENSIONS_DIR"] = d
    return d
