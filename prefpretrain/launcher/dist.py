"""Process-group set-up for one process, torchrun (elastic) and srun, and a clean teardown."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment, else (0, 1, 0)."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        return int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def slurm_facts() -> dict | None:
    """Where this process runs in a SLURM job (None outside one): recorded per rank and per start."""
    e = os.environ
    if "SLURM_JOB_ID" not in e:
        return None
    return {"job_id": e["SLURM_JOB_ID"], "node_name": e.get("SLURMD_NODENAME"),
            "node_id": int(e["SLURM_NODEID"]) if "SLURM_NODEID" in e else None,
            "procid": int(e["SLURM_PROCID"]) if "SLURM_PROCID" in e else None,
            "restart_count": int(e.get("SLURM_RESTART_COUNT", "0"))}


def slurm_master() -> tuple[str, int]:
    """Under plain `srun` (one task per GPU): the first node of the job hosts the store."""
    import subprocess

    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], check=True,
                           capture_output=True, text=True).stdout.split()
    # the node's NodeAddr (how SLURM itself reaches it; the node name when the two are the same)
    node = subprocess.run(["scontrol", "show", "node", "-o", nodes[0]], capture_output=True, text=True).stdout
    addr = next((kv.split("=", 1)[1] for kv in node.split() if kv.startswith("NodeAddr=")), nodes[0])
    return addr, 15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(backend: str = "auto", device: str = "auto", timeout_s: int = 600) -> DistInfo:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    rank, world, local = env_world()
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
        else:
            if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
                addr, port = slurm_master()
                os.environ["MASTER_ADDR"] = addr
                os.environ.setdefault("MASTER_PORT", str(port))
            host = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = int(os.environ.get("MASTER_PORT", "29500"))
            # Under torchrun the agent hosts the store; a fresh key prefix per restart attempt keeps
            # a restarted group from reading the dead group's keys (gloo connectFullMesh failures).
            under_agent = "TORCHELASTIC_RESTART_COUNT" in os.environ
            base = dist.TCPStore(host, port, world, is_master=(rank == 0 and not under_agent), timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
            store = dist.PrefixStore(f"prefpretrain_attempt_{attempt}", base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    # environment DeepSpeed reads
    for k, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        os.environ.setdefault(k, str(v))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return DistInfo(rank, world, local, backend, dev)


def teardown() -> None:
    """Destroy the process group explicitly (a CPU DDP run aborted at exit ~1 in 6 without this)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
