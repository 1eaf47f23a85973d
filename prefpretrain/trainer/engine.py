"""DeepSpeed engine from the config: ZeRO stage, offload, precision, accumulation, clipping, AdamW + schedule.

The same code runs on CPU (gloo) and CUDA (nccl). On CPU the client optimizer is `torch.optim.AdamW`
(DeepSpeed's own Adam ops JIT-compile for ~45 s each); its JIT ops are cached in TORCH_EXTENSIONS_DIR.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from prefpretrain.config import Config

log = logging.getLogger(__name__)


def extensions_cache() -> str:
    """DeepSpeed JIT-builds ops (the CPU shared-memory comm op, ~45 s): cache them once per checkout."""
    default = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"
    d = os.environ.get("TORCH_EXTENSIONS_DIR") or str(default)
    os.environ["TORCH_EXTENSIONS_DIR"] = d
    return d


def deepspeed_env() -> None:
    """Environment DeepSpeed reads at import: the accelerator (it warns when it has to guess) and the op cache."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    extensions_cache()


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
        flag = torch.tensor([0.0 if not sums or bool(torch.isfinite(torch.stack(sums)).all()) else 1.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ds_config(cfg: Config, world: int, load_universal: bool = False) -> dict:
    t, e = cfg.train, cfg.engine
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage in (1, 2):
        zero["overlap_comm"] = True  # reduce gradient buckets while the backward pass goes on
    if e.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if e.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_for(world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": e.loss_scale_power},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep torch AdamW with offload (no 45 s CPUAdam build)
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


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
    deepspeed_env()
    import deepspeed

    conf = ds_config(cfg, world, load_universal)
    if run_dir is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(conf, indent=1))
    t = cfg.train
    opt = GuardedAdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    opt.check = cfg.engine.zero_stage == 0  # DeepSpeed's ZeRO optimizers check themselves
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=conf)
    return engine, opt


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
    deepspeed_env()
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    if dist.is_initialized() and not deepspeed.comm.is_initialized():  # zero.Init reads the world size from it
        deepspeed.init_distributed(dist_backend=dist.get_backend())
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
