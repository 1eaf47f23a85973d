"""Facts about this host that a launcher needs without importing torch: whether torch can use a GPU here, a
free port, the CPUs this process may use, where DeepSpeed caches the ops it builds, and where this process
sits in the job (its placement, read from the launcher's environment: the CLI checks a config against the
world size before torch is imported, so a refusal is one line in under a second).

`prefpretrain launch` and the other preflight steps start in a fraction of a second because of it; the ranks
ask the same functions (prefpretrain.distributed decides devices through `use_cuda`).
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun (also accelerate / by hand: RANK + WORLD_SIZE) | srun | single


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this job step on this node, from SLURM_TASKS_PER_NODE ('2(x3),1') and SLURM_NODEID."""
    spec, node = env.get("SLURM_TASKS_PER_NODE", ""), int(env.get("SLURM_NODEID", "0"))
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node] if node < len(counts) else int(env.get("SLURM_NTASKS_PER_NODE", "1"))


def placement(env: Mapping[str, str]) -> Placement:
    """torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), srun with one task per rank (SLURM_PROCID,
    SLURM_NTASKS > 1, SLURM_LOCALID), else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return Placement(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         int(env.get("LOCAL_WORLD_SIZE", "1")), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return Placement(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                         _slurm_tasks_on_node(env), "srun")
    return Placement(0, 1, 0, 1, "single")


def device_index(p: Placement, n_visible: int, visible: str | None = None) -> int:
    """The CUDA ordinal this rank uses among the `n_visible` devices it sees (CUDA_VISIBLE_DEVICES applied).

    One visible device: index 0 (srun --gpus-per-task=1 or --gpu-bind, or CUDA_VISIBLE_DEVICES=N per rank).
    torchrun: the ranks of a node share the visible devices, LOCAL_RANK picks one. srun with every device
    visible to every task: SLURM_LOCALID picks one. Anything else is a binding that wastes or shares GPUs."""
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if n_visible < 1:
        raise RuntimeError(f"engine.device: cuda, but this process sees no GPU{where}")
    if n_visible == 1:
        return 0
    if p.launcher == "srun" and n_visible != p.local_world_size:
        raise RuntimeError(f"srun task {p.rank} sees {n_visible} GPUs{where} and its node runs {p.local_world_size} "
                           f"tasks: bind one GPU per task (--gpus-per-task=1) or show every task all of them")
    if p.local_rank >= n_visible:
        raise RuntimeError(f"local rank {p.local_rank} but this process sees only {n_visible} GPUs{where}: "
                           f"one rank per GPU (--nproc-per-node {n_visible})")
    return p.local_rank


def threads_for(p: Placement, affinity: int, env: Mapping[str, str]) -> int:
    """CPU threads per rank: this process's CPUs (its affinity) shared by the ranks that share them. Under srun
    each task owns its CPUs (SLURM_CPUS_PER_TASK bounds them); under torchrun the node's ranks share the agent's."""
    if p.launcher == "srun":
        per_task = int(env.get("SLURM_CPUS_PER_TASK", "0")) or max(1, affinity // p.local_world_size)
        return max(1, min(affinity, per_task))
    return max(1, affinity // max(1, p.local_world_size))
