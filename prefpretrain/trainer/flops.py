"""Model FLOPs utilisation (MFU) as the field computes it.

Model FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, with N the
parameters that take part in matrix multiplies (all but the input token and position embeddings; a tied LM
head counts once, as the output matmul), L layers, H x Q the hidden size and T the sequence length. Model
FLOPs, not hardware FLOPs: recomputation under gradient checkpointing is not counted.

Peak per rank: on CUDA the device's dense bf16/fp16 tensor-core figure from its datasheet (`DATASHEET_TFLOPS`,
matched on the device name), so the MFU is comparable with published ones; fp32 training and devices not in
the table use a matmul probe measured at start (recorded in run_info.json as `peak_flops_source`), as does
the CPU, which has no datasheet figure. `train.peak_flops` overrides both.
"""
from __future__ import annotations

import time

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# dense (no sparsity) bf16 = fp16 tensor TFLOP/s per device; the first name contained in the device's wins
DATASHEET_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800 PCIe", 756.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
    ("MI325X", 1307.0), ("MI300X", 1307.0),
    ("MI250X", 191.5), ("MI250", 181.0),  # per GCD: torch sees each of the package's two dies as a device
)


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of a named device, or None (fp32, or a device not in the table)."""
    if precision not in ("bf16", "fp16"):
        return None
    for key, tflops in DATASHEET_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def peak_flops(precision: str, device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per rank, where it came from): the config, the datasheet table, or a matmul probe."""
    if configured > 0:
        return configured, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = datasheet_peak(name, precision)
        if sheet is not None:
            return sheet, f"datasheet ({name})"
    return matmul_peak(precision, device), "matmul probe"


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
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        reps = 10 if device.type == "cuda" else 2
        for _ in range(reps):
            c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        else:
            c.sum().item()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter knows its full size


def matmul_params(model) -> int:
    """Parameters used in matrix multiplies: all but token/position/type embeddings, plus a tied LM head."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    lookups = sum(_numel(p) for name, p in model.named_parameters()
                  if any(k in name for k in ("wpe", "position_embeddings", "token_type_embeddings")))
    total = sum(_numel(p) for p in model.parameters())
    return total - lookups - (0 if tied else _numel(emb))


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L H Q T (PaLM appendix B)."""
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    return 6.0 * matmul_params(model) + 12.0 * layers * hidden * seq_len


def mfu(flops_token: float, tokens_per_s: float, peak_per_rank: float, world: int) -> float:
    return flops_token * tokens_per_s / (peak_per_rank * world) if peak_per_rank > 0 else 0.0
