"""Model FLOPs utilisation: 6 x parameters x tokens per second over the peak, per rank.

On CPU there is no datasheet number, so the peak is measured once at start by a matmul probe in the
training precision (and recorded in run_info.json); `train.peak_flops` overrides it.
"""
from __future__ import annotations

import time

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(precision: str, device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on this rank's device and threads."""
    dtype = _DTYPES[precision]
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b).sum().item()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 10 if device.type == "cuda" else 2
        for _ in range(reps):
            c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            c.sum().item()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best


def mfu(n_params: int, tokens_per_s: float, peak_per_rank: float, world: int) -> float:
    return 6 * n_params * tokens_per_s / (peak_per_rank * world) if peak_per_rank > 0 else 0.0
