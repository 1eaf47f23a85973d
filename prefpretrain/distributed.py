"""The one place that talks to torch.distributed: process-group start-up, the device each rank computes on,
and every collective prefpretrain issues.

Why one place. NCCL takes CUDA tensors only and gloo CPU tensors (plus a few CUDA ops); a collective that
only some ranks reach hangs until the timeout. Here every collective puts its tensor on the backend's
communication device (`cuda:LOCAL` for nccl, the CPU for gloo) and hands the result back as plain Python
numbers or objects; nothing else in `prefpretrain/` calls a torch.distributed collective (a test scans the
source). Without a process group, or with one rank, every collective returns its input.

Long work on rank 0 alone (converting a checkpoint, building a replay memory) goes through `rank0_does`: the
other ranks wait on the rendezvous store, not inside a collective, for up to `engine.timeout_s`, and fail
with rank 0's error instead of waiting out the timeout when rank 0 fails.

This module imports nothing from prefpretrain but the torch-free host.py (the lowest layer).
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# re-exported from host: the placement of a process is read from its environment without torch (the CLI checks a
# config against the world size before importing it); free_port is the ranks' rendezvous port (and the tests')
from prefpretrain import host
from prefpretrain.host import Placement, device_index, free_port, placement, threads_for  # noqa: F401

log = logging.getLogger(__name__)
T = TypeVar("T")
COMM_DEVICE_ENV = "PREFPRETRAIN_COMM_DEVICE"  # "cuda": collectives on the GPU even over gloo (the one-GPU check)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device


class _State:
    store: Any = None  # the rendezvous store (rank0_does waits on it)
    backend: str = "gloo"
    comm_device: torch.device = torch.device("cpu")
    timeout: timedelta = timedelta(seconds=1800)
    calls: int = 0  # rank0_does keys: the same sequence on every rank


def use_cuda(device: str) -> bool:
    """engine.device -> whether to compute on CUDA (auto: when torch sees a GPU)."""
    return host.use_cuda(device)


def pick_device(device: str = "auto") -> torch.device:
    """The device of a one-process tool (evaluate, export, generate): under torchrun its local rank's GPU, else
    the first visible one (inside a SLURM batch script the job's srun variables describe other processes)."""
    if not use_cuda(device):
        return torch.device("cpu")
    p = placement(os.environ)
    if p.launcher != "torchrun":
        return torch.device("cuda", 0)
    return torch.device("cuda", device_index(p, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")))


def slurm_facts() -> dict | None:
    """Where this process runs in a SLURM job (None outside one): recorded per rank and per start."""
    e = os.environ
    if "SLURM_JOB_ID" not in e:
        return None
    return {"job_id": e["SLURM_JOB_ID"], "node_name": e.get("SLURMD_NODENAME"),
            "node_id": int(e["SLURM_NODEID"]) if "SLURM_NODEID" in e else None,
            "procid": int(e["SLURM_PROCID"]) if "SLURM_PROCID" in e else None,
            "restart_count": int(e.get("SLURM_RESTART_COUNT", "0"))}


def _slurm_master() -> tuple[str, int]:
    """Under plain `srun` (one task per rank): the first node of the job hosts the store."""
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], check=True,
                           capture_output=True, text=True).stdout.split()
    # the node's NodeAddr (how SLURM itself reaches it; the node name when the two are the same)
    node = subprocess.run(["scontrol", "show", "node", "-o", nodes[0]], capture_output=True, text=True).stdout
    addr = next((kv.split("=", 1)[1] for kv in node.split() if kv.startswith("NodeAddr=")), nodes[0])
    return addr, 15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000


# ------------------------------------------------------------------ start-up and teardown

def setup(backend: str = "auto", device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Bind this rank to its device and CPU threads, start the process group (also for one rank, on an
    in-process store), and set the environment DeepSpeed reads."""
    cuda = use_cuda(device)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    p = placement(os.environ)
    if cuda:
        dev = torch.device("cuda", device_index(p, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(threads_for(p, len(os.sched_getaffinity(0)), os.environ))
    _State.timeout, _State.backend = timedelta(seconds=timeout_s), backend
    _State.comm_device = dev if cuda and (backend == "nccl" or os.environ.get(COMM_DEVICE_ENV) == "cuda") \
        else torch.device("cpu")
    if not dist.is_initialized():
        _State.store = _store(p)
        dist.init_process_group(backend, store=_State.store, rank=p.rank, world_size=p.world_size,
                                timeout=_State.timeout)
    for k, v in (("RANK", p.rank), ("WORLD_SIZE", p.world_size), ("LOCAL_RANK", p.local_rank)):
        os.environ.setdefault(k, str(v))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return DistInfo(p.rank, p.world_size, p.local_rank, p.local_world_size, backend, dev)


def _store(p: Placement):
    if p.world_size == 1 and "MASTER_ADDR" not in os.environ:
        return dist.HashStore()
    if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        addr, port = _slurm_master()
        os.environ["MASTER_ADDR"] = addr
        os.environ.setdefault("MASTER_PORT", str(port))
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    # Under torchrun the agent hosts the store; a fresh key prefix per restart attempt keeps a restarted
    # group from reading the dead group's keys (gloo connectFullMesh failures).
    # (torchrun says so in TORCHELASTIC_USE_AGENT_STORE; with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 rank 0 hosts)
    under_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE",
                                 str("TORCHELASTIC_RESTART_COUNT" in os.environ)) == "True"
    base = dist.TCPStore(host, port, p.world_size, is_master=(p.rank == 0 and not under_agent),
                         timeout=_State.timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
    return dist.PrefixStore(f"prefpretrain_attempt_{attempt}", base)


def teardown(ok: bool = True) -> None:
    """Destroy the process group explicitly (a CPU DDP run aborted at exit ~1 in 6 without this). After a
    failure there is no last barrier: the other ranks may be inside a collective this rank will never join,
    and the launcher stops them once this rank has exited."""
    if dist.is_initialized():
        try:
            if ok:
                barrier()
        finally:
            dist.destroy_process_group()
    _State.store = None


# ------------------------------------------------------------------ collectives

def started() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend() -> str:
    return dist.get_backend() if started() else _State.backend


def world() -> int:
    return dist.get_world_size() if started() else 1


def rank() -> int:
    return dist.get_rank() if started() else 0


def comm_device() -> torch.device:
    return _State.comm_device


def _reduce(values: Sequence[float] | torch.Tensor, op) -> list[float]:
    t = values.detach() if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
    t = t.to(_State.comm_device, torch.float64).reshape(-1)
    if world() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()  # the one host synchronisation


def all_sum(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Element-wise sums over ranks (float64), e.g. statistics accumulated as a device tensor."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_max(values: Sequence[float] | torch.Tensor) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX)


def any_true(flag: bool | torch.Tensor) -> bool:
    """Whether any rank's flag is set (a tensor flag stays on its device until the reduction)."""
    t = flag.reshape(1) if isinstance(flag, torch.Tensor) else torch.tensor([float(flag)])
    return all_max(t)[0] > 0


def barrier() -> None:
    if world() > 1:
        if _State.backend == "nccl":  # NCCL's barrier is an all-reduce: on this rank's GPU, not a guessed one
            dist.barrier(device_ids=[_State.comm_device.index])
        else:
            dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` of rank `src` on every rank (picklable objects of our own: paths, small dicts)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)  # torch serialises through the current CUDA device under nccl
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def rank0_does(what: str, fn: Callable[[], T]) -> T | None:
    """Rank 0 runs `fn` (long single-rank work); the others wait for it on the store for up to engine.timeout_s,
    outside any collective, and raise rank 0's error if it failed. Returns fn's result on rank 0, else None."""
    if world() == 1:
        return fn()
    _State.calls += 1
    key = f"rank0_does/{_State.calls}"
    store = _State.store
    if rank() == 0:
        try:
            result = fn()
        except BaseException as e:
            if store is not None:
                store.set(key, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        if store is not None:
            store.set(key, "ok")
        else:
            barrier()
        return result
    if store is None:  # a process group someone else started: no store of ours to wait on
        barrier()
        return None
    try:
        store.wait([key], _State.timeout)
    except Exception as e:
        raise RuntimeError(f"waited {_State.timeout.total_seconds():.0f} s (engine.timeout_s) for rank 0 "
                           f"{what}: {e}") from None
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"rank 0 failed {what}: {status.removeprefix('error: ')}")
    return None
