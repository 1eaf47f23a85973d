"""What engine.zero3_init=partitioned saves: each rank's peak memory growth over the build, full vs partitioned.

    .venv/bin/python bench/zero3_build_memory.py [--layers 24 --hidden 1024] [--nproc 2]

Starts --nproc ranks (torchrun, gloo) that build a GPT-2 of the given size the way the trainer does
(`build_model`, inside `partitioned_build` for the partitioned case) and report the growth of their
peak resident memory (ru_maxrss) over the build, and the build time. Baseline: the same ranks building the
whole model (zero3_init=full).
Prints ONE line of JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark (what decides an out-of-memory kill), read as the
    trainer reads it for mem/rss_gb."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def rank_main(mode: str, layers: int, hidden: int) -> None:
    import torch
    import torch.distributed as dist

    from prefpretrain.config import load_config
    from prefpretrain.trainer.engine import deepspeed_env, local_param_elements, partitioned_build
    from prefpretrain.trainer.model import build_model, count_params

    dist.init_process_group("gloo")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        "engine.zero_stage=3", f"engine.zero3_init={mode}", f"model.num_layers={layers}",
        f"model.hidden_size={hidden}", f"model.num_heads={hidden // 64}", "train.global_batch_size=16",
        "train.micro_batch_size=1"])
    deepspeed_env()
    import deepspeed  # noqa: F401 - both cases measured with DeepSpeed already imported, as in training

    torch.manual_seed(0)
    before, t0 = peak_rss_gb(), time.time()
    special = {"eos": 0, "pad": 1, "aligned": 2, "misaligned": 3, "mask": 4}
    with partitioned_build(cfg, dist.get_world_size()) if mode == "partitioned" else nullcontext():
        model = build_model(cfg.model, 32000, 1024, special)
    rec = {"rank": dist.get_rank(), "rss_before_gb": round(before, 3), "rss_after_gb": round(peak_rss_gb(), 3),
           "build_s": round(time.time() - t0, 2), "n_params": count_params(model),
           "local_elements": local_param_elements(model)}
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rec)
    if dist.get_rank() == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rank-mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_mode:
        rank_main(a.rank_mode, a.layers, a.hidden)
        sys.stdout.flush()
        os._exit(0)  # DeepSpeed's comm threads can abort at interpreter teardown (see prefpretrain/__main__.py)
    from prefpretrain.distributed import free_port
    from prefpretrain.launcher.local import child_env

    res = {"bench": "zero3_build_memory", "layers": a.layers, "hidden": a.hidden, "ranks": a.nproc}
    for mode in ("full", "partitioned"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", __file__, "--rank-mode", mode,
               "--layers", str(a.layers), "--hidden", str(a.hidden)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=child_env(a.nproc)).stdout
        ranks = json.loads(out.strip().splitlines()[-1])
        res["n_params"] = ranks[0]["n_params"]
        growth = max(r["rss_after_gb"] - r["rss_before_gb"] for r in ranks)
        res[mode] = {"peak_rss_growth_gb_per_rank": round(growth, 3),
                     "local_elements_per_rank": max(r["local_elements"] for r in ranks),
                     "build_s": max(r["build_s"] for r in ranks)}
    part, full = res["partitioned"]["peak_rss_growth_gb_per_rank"], res["full"]["peak_rss_growth_gb_per_rank"]
    res["peak_rss_ratio"] = round(part / full, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
