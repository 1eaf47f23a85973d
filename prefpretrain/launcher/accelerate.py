"""`prefpretrain launch --launcher accelerate`: the same ranks started by `accelerate launch`.

The trainer builds its own DeepSpeed engine (the config in RUN/deepspeed_config.json), so Accelerate is only the
process launcher here: `distributed_type: MULTI_GPU` with c10d rendezvous, which makes it run torchrun's
elastic agent underneath and set the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables. GPU only:
on CPU `accelerate launch --cpu --num_processes N` starts ONE process (it expects mpirun), so ranks would be
missing without an error (measured, see DESIGN.md) — `launch` refuses it there and torchrun is the way.
"""
from __future__ import annotations

import sys

import yaml


def accelerate_config(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None) -> dict:
    host, _, port = (rdzv_endpoint or "127.0.0.1:29500").rpartition(":")
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",  # DeepSpeed is set up by the trainer from the prefpretrain config
        "num_machines": nnodes,
        "machine_rank": node_rank,
        "num_processes": nproc_per_node * nnodes,  # Accelerate counts processes over all machines
        "main_process_ip": host,
        "main_process_port": int(port),
        "rdzv_backend": "c10d",
        "same_network": True,
        "mixed_precision": "no",  # precision is the trainer's (train.precision), not Accelerate's
        "use_cpu": False,
        "gpu_ids": "all",
    }


def config_text(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def accelerate_argv(config_file: str, config: str, overrides: list[str], max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "--max_restarts", str(max_restarts), "-m", "prefpretrain", "train", config, *overrides]
