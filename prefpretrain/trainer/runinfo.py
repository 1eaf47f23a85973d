"""What a run directory records about its set-up: resolved config, versions, hosts, git commit."""
from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
import time
from pathlib import Path

import yaml

from prefpretrain import distributed
from prefpretrain.rundir import CONFIG, RANKS, RUN_INFO
from prefpretrain.trainer.engine import local_param_elements


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import deepspeed
    import tokenizers
    import torch
    import transformers

    import prefpretrain

    return {"prefpretrain": prefpretrain.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def check_agreement(world: int, items: dict) -> None:
    """Every rank must see the same world size, config, tokenizer and shards: a rank that read another
    config would otherwise train alone without error."""
    if world == 1:
        return
    mine = dict(items, world_size=world)
    everyone = distributed.all_gather_object(mine)
    for r, theirs in enumerate(everyone):
        if theirs != mine:
            diff = sorted(k for k in mine if mine.get(k) != theirs.get(k))
            raise RuntimeError(f"ranks disagree on {', '.join(diff)} (rank {r}: {theirs}, here: {mine})")


def write_run_files(run_dir: Path, cfg, world: int, rank: int, extra: dict) -> None:
    hosts = distributed.all_gather_object(socket.gethostname())
    if rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info = {"world_size": world, "hosts": hosts, "versions": versions(), "git_commit": git_commit(),
            "config_hash": cfg.hash(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    info.update(extra)
    p = run_dir / RUN_INFO
    history = json.loads(p.read_text()).get("history", []) if p.is_file() else []
    if p.is_file():
        prev = json.loads(p.read_text())
        prev.pop("history", None)
        history.append(prev)
    info["history"] = history  # earlier starts of the same run (resumes), newest last
    p.write_text(json.dumps(info, indent=1))


def write_rank_record(engine, run_dir: Path, info, cfg, step: int, built_local: int) -> None:
    """RUN/ranks/rankR.json: who this rank was, what it holds, and a checksum of its parameters, so anyone can
    check that the ranks trained one model together (ZeRO-3 ranks hold different partitions)."""
    h = hashlib.sha256()
    for name, p in sorted(engine.module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    rec = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
           "host": socket.gethostname(), "backend": info.backend, "device": str(info.device),
           "comm_device": str(distributed.comm_device()), "step": step,
           "zero_stage": cfg.engine.zero_stage, "local_param_elements": local_param_elements(engine.module),
           "param_elements_when_built": built_local,
           "param_checksum": h.hexdigest()[:32] if cfg.engine.zero_stage < 3 else None,
           "slurm": distributed.slurm_facts()}
    d = run_dir / RANKS
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{info.rank}.json").write_text(json.dumps(rec, indent=1))
