"""How much faster DeepSpeedCPUAdam (the ZeRO optimizer-offload step) is than torch.optim.AdamW on the same CPU tensors.

    TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions .venv/bin/python bench/cpu_adam.py \
        [--params-m 50] [--width 1024] [--steps 10] [--repeats 3] [--threads N] [--out docs/results/cpu_adam.json]

fp32 parameters shaped like GPT-2 blocks (qkv, proj, mlp matrices of --width plus their 1-D biases and norms) up
to --params-m million elements, the same gradients, lr 1e-3, betas 0.9/0.95, eps 1e-8, decoupled weight decay 0.1.
Contenders: torch AdamW (foreach, the baseline), torch AdamW fused=True, DeepSpeedCPUAdam(adamw_mode=True). Each
is warmed up 2 steps, then timed over --steps steps per round, --repeats rounds in rotating order; figures are
medians with the range over rounds. Then all contenders take --steps steps from the same initial params on the
same seeded gradients and must agree with torch AdamW (max abs difference < 1e-5 of the largest param; else the
JSON says "agree": false and the exit code is 1).
The CPU Adam op's JIT build is timed on its own (cached in TORCH_EXTENSIONS_DIR; 48-105 s on 2 cores when not).
Threads: the script re-executes itself with OMP_NUM_THREADS=--threads (default: all cores in the affinity mask)
so that torch and the OpenMP loop of the C++ op both use that many. Prints ONE line of JSON on stdout (everything
else, build logs included, goes to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HP = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
NAMES = ("torch_adamw", "torch_adamw_fused", "ds_cpu_adam")
TOL = 1e-5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-m", type=float, default=50.0, help="total parameter elements, millions")
    p.add_argument("--width", type=int, default=1024, help="hidden size of the GPT-2-like blocks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds, contenders in rotating order")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", type=Path, help="also write the JSON line here")
    return p.parse_args()


def shapes(params_m: float, w: int) -> list[tuple[int, ...]]:
    """GPT-2 block tensors (qkv, attn proj, mlp in/out with biases, two layer norms) until params_m * 1e6 elements."""
    block = [(3 * w, w), (3 * w,), (w, w), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,), (w,), (w,), (w,), (w,)]
    out: list[tuple[int, ...]] = []
    total = 0
    while total < params_m * 1e6:
        s = block[len(out) % len(block)]
        out.append(s)
        total += s[0] * (s[1] if len(s) > 1 else 1)
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_opt(name, params):
    import torch
    if name == "torch_adamw":
        return torch.optim.AdamW(params, **HP, foreach=True)
    if name == "torch_adamw_fused":
        return torch.optim.AdamW(params, **HP, fused=True)
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    return DeepSpeedCPUAdam(params, **HP, adamw_mode=True)


def jit_build() -> dict:
    """Load (building if needed) the cpu_adam op; from_cache = its .so existed before and was not rebuilt."""
    from deepspeed.ops.op_builder import CPUAdamBuilder
    builder = CPUAdamBuilder()
    build_dir = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / builder.name
    before = {p: p.stat().st_mtime for p in build_dir.glob("*.so")}
    t0 = time.perf_counter()
    builder.load()
    build_s = time.perf_counter() - t0
    after = {p: p.stat().st_mtime for p in build_dir.glob("*.so")}
    return {"jit_build_s": round(build_s, 2), "jit_from_cache": bool(before) and before == after,
            "extensions_dir": os.environ["TORCH_EXTENSIONS_DIR"]}


def check(init, steps: int, available: list[str]) -> dict:
    """Each contender takes `steps` steps from `init` on the same seeded gradients; compare with torch AdamW."""
    import torch
    final = {}
    for name in available:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make_opt(name, ps)
        for k in range(steps):
            g = torch.Generator().manual_seed(1000 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        final[name] = [p.detach() for p in ps]
        del opt
    ref = final["torch_adamw"]
    p_max = max(r.abs().max().item() for r in ref)
    u_max = max((r - i).abs().max().item() for r, i in zip(ref, init, strict=True))
    out = {"check_steps": steps, "max_abs_param": p_max, "max_abs_update": u_max}
    for name in available[1:]:
        diff = max((a - r).abs().max().item() for a, r in zip(final[name], ref, strict=True))
        out[f"{name}_max_abs_diff"] = diff
        out[f"{name}_rel_to_param"] = diff / p_max
        out[f"{name}_rel_to_update"] = diff / u_max
    out["agree"] = all(out[f"{n}_rel_to_param"] < TOL for n in available[1:])
    return out


def bench(init, grads, steps: int, repeats: int) -> tuple[dict, dict]:
    """Warm up 2 steps each, then time `steps` steps per contender per round, rotating the order each round."""
    import torch
    opts, unavailable = {}, {}
    for name in NAMES:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        try:
            opts[name] = make_opt(name, ps)
            for _ in range(2):
                opts[name].step()
        except Exception as e:  # fused AdamW may be missing on this build/device
            unavailable[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            opts.pop(name, None)
    names = list(opts)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                opts[name].step()
            times[name].append((time.perf_counter() - t0) / steps)
    return times, unavailable


def summarise(times: dict[str, list[float]]) -> dict:
    out: dict = {}
    for name, ts in times.items():
        out[f"{name}_step_s"] = round(statistics.median(ts), 5)
        out[f"{name}_step_s_range"] = [round(min(ts), 5), round(max(ts), 5)]
    ds = times.get("ds_cpu_adam")
    for base in ("torch_adamw", "torch_adamw_fused"):
        if ds and base in times:
            per_round = [b / d for b, d in zip(times[base], ds, strict=True)]
            out[f"speedup_vs_{base}"] = round(statistics.median(per_round), 3)
            out[f"speedup_vs_{base}_range"] = [round(min(per_round), 3), round(max(per_round), 3)]
    return out


def main() -> None:
    args = parse_args()
    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):  # OpenMP reads it once, when torch loads libgomp
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # DeepSpeed logs and the ninja build print to stdout: keep stdout for the JSON line
    import torch

    from prefpretrain.trainer.engine import deepspeed_env

    torch.set_num_threads(args.threads)
    deepspeed_env()
    import deepspeed

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    rec: dict = {"bench": "cpu_adam", "cpu": cpu_model(), "threads": args.threads,
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "deepspeed": deepspeed.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    rec.update(jit_build())
    shp = shapes(args.params_m, args.width)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in shp]
    rec.update({"n_params": sum(t.numel() for t in init), "n_tensors": len(init), "width": args.width,
                "steps": args.steps, "repeats": args.repeats, "hparams": HP})
    times, unavailable = bench(init, [torch.randn(s, generator=g) for s in shp], args.steps, args.repeats)
    rec["unavailable"] = unavailable
    rec.update(summarise(times))
    rec.update(check(init, args.steps, list(times)))
    rec["total_s"] = round(time.perf_counter() - t_start, 1)
    rec["loadavg_1m_start_end"] = [load_start, os.getloadavg()[0]]  # > threads: other work shared the cores
    line = json.dumps(rec)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line, file=json_out, flush=True)
    if not rec["agree"]:
        sys.exit(f"contenders disagree with torch AdamW beyond {TOL} of the largest param: {line}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
