"""DeepSpeed engine from the config: ZeRO stage, offload, precision, accumulation, clipping, AdamW + schedule.

The same code runs on CPU (gloo) and CUDA (nccl). The client optimizer is torch's fused AdamW (DeepSpeed's
FusedAdam would JIT-compile); under optimizer offload from GPUs, DeepSpeed's CPU Adam (JIT-built once, cached in
TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from prefpretrain import distributed, host
from prefpretrain.config import Config
from prefpretrain.errors import ConfigError
from prefpretrain.trainer.dsconfig import ds_config  # noqa: F401 - build_engine's, and the tests'

log = logging.getLogger(__name__)


def deepspeed_env() -> None:
    """Environment DeepSpeed reads at import: the accelerator (it warns when it has to guess) and the op cache."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if host.torch_sees_gpu() else "cpu")
    host.extensions_cache()


def import_deepspeed():
    """deepspeed, imported after `deepspeed_env`. On the CPU accelerator its comm backend JIT-builds a shared-memory
    op with gcc at the first start (~45 s on a fresh machine) that only its inference all-reduce (tensor-parallel
    inference) uses; training never calls it, so it is marked incompatible and never built. (DeepSpeed's table of
    compatible ops is one dict, computed once per process, that its op loading consults; CUDA never builds it.)"""
    deepspeed_env()
    import deepspeed
    import deepspeed.ops

    if deepspeed.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite on any rank (all ranks agree), and counts it.

    DeepSpeed's ZeRO-1/2/3 optimizers already skip such steps (a non-finite global norm; bf16 ZeRO-1/2 also
    `check_grad_overflow`; fp16 the loss scaler), so `build_engine` turns the guard off there (`check =
    False`: it costs a pass over the gradients and an all-reduce per step); it covers ZeRO-0, where DeepSpeed
    hands our optimizer the gradients as they are. `overflow` is what DeepSpeed's engine reads to count a
    skipped step.
    """

    overflow = False
    skipped = 0
    check = True

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self.check and self._any_non_finite()
        if self.overflow:
            self.skipped += 1
            return None
        return super().step(closure)

    def _any_non_finite(self) -> bool:
        # one sum per gradient: NaN and +-inf propagate into it (inf - inf = NaN), at a third of the cost of
        # isfinite(grad).all(); a finite gradient whose sum overflows fp32 (> 3e38) is diverging anyway
        sums = [p.grad.sum(dtype=torch.float32) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not sums:
            return distributed.any_true(False)
        # the flag stays on the gradients' device until the one reduction over ranks
        return distributed.any_true((~torch.isfinite(torch.stack(sums)).all()).float())


def lr_lambda(cfg: Config):
    """Multiplier of train.lr at optimizer step `step`: linear warm-up, then the chosen schedule."""
    t = cfg.train
    floor = t.min_lr / t.lr

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "constant_cooldown":
            left = t.max_steps - step
            return 1.0 if left > t.cooldown_steps else floor + (1 - floor) * max(0, left) / t.cooldown_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms or embeddings. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "emb" in name or "wte" in name or "wpe" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_engine(cfg: Config, model, world: int, run_dir: Path | None = None, load_universal: bool = False):
    """(DeepSpeed engine, the client optimizer): the optimizer fits the device (see `make_optimizer`);
    `train.compile` compiles the module through DeepSpeed (falls back with one log line where it cannot)."""
    deepspeed = import_deepspeed()
    conf = ds_config(cfg, world, load_universal)
    if run_dir is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(conf, indent=1))
    opt = make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=conf)
    except ValueError as e:  # pydantic's ValidationError: a key of engine.deepspeed DeepSpeed does not take
        if cfg.engine.deepspeed and "validation error" in str(e):
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ConfigError(f"engine.deepspeed: DeepSpeed refuses it: {' / '.join(lines[:3])}") from None
        raise
    if cfg.train.compile:
        _compile(engine)
    return engine, opt if isinstance(opt, GuardedAdamW) else _NoGuard()


class _NoGuard:
    """What the loop reads from the guard when DeepSpeed's own optimizer runs (it never skips by itself)."""

    overflow = False


def optimizer_kind(cfg: Config) -> str:
    """deepspeed_cpu_adam when ZeRO offloads optimizer states from GPUs (DeepSpeed's own offload path, which also
    copies the updated parameters back to the GPU), else torch's fused AdamW (one kernel per step, on CUDA and
    on the CPU) with the non-finite guard. Measured on host tensors (bench/cpu_adam.py, 50 M parameters, 2
    threads): DeepSpeed's CPU Adam 3.3x torch's default foreach AdamW, torch's fused one 1.1x DeepSpeed's."""
    return "deepspeed_cpu_adam" if host.use_cuda(cfg.engine.device) and cfg.engine.offload != "none" \
        else "adamw_fused"


def make_optimizer(cfg: Config, model):
    """AdamW over the decayed / not-decayed parameter groups, of the kind `optimizer_kind` names."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    kw = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": 1e-8}
    if optimizer_kind(cfg) == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    opt = GuardedAdamW(groups, fused=True, **kw)
    opt.check = cfg.engine.zero_stage == 0  # DeepSpeed's ZeRO optimizers check themselves
    return opt


def _compile(engine) -> None:
    """torch.compile of the module in place (parameter names and checkpoints unchanged)."""
    import torch._dynamo

    dev = next(engine.module.parameters()).device
    why = None
    if not torch._dynamo.is_dynamo_supported():
        why = "torch.compile is not supported on this Python / platform"
    elif dev.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's GPU code generator)
        except ImportError:
            why = "triton is not installed"
    if why:
        log.warning("train.compile: %s; training without it", why)
        return
    engine.compile()
    log.info("train.compile: the model is compiled with torch.compile (the first steps include compilation)")


def local_param_elements(module) -> int:
    """Parameter elements this rank holds (ZeRO-3 keeps a partition in `ds_tensor`)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


@contextmanager
def partitioned_build(cfg: Config, world: int):
    """For engine.zero3_init=partitioned: inside this, HF models are built inside `deepspeed.zero.Init`, each
    parameter going straight into its ZeRO-3 partition, with HF's weight init (transformers gathers one module
    at a time for it; a bare zero.Init would skip it). Afterwards transformers sees no ZeRO-3 config again.

    glibc keeps the freed full-size tensors of the build in its heap, which left the peak resident memory at
    ~0.9 of a full build (bench/zero3_build_memory.py); while building, blocks over 64 KiB are mmap'ed, so a
    freed one goes back to the system at once (peak 0.41 of a full build at 2 ranks)."""
    deepspeed = import_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    if distributed.started() and not deepspeed.comm.is_initialized():  # zero.Init reads the world size from it
        deepspeed.init_distributed(dist_backend=distributed.backend())
    hf = HfDeepSpeedConfig(ds_config(cfg, world))  # transformers holds a weak reference to it
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        del hf
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for its adaptive threshold
            libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
