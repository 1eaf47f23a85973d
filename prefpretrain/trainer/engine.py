"""DeepSpeed engine from the config: ZeRO stage, precision, accumulation, clipping, AdamW + schedule."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

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


def ds_config(cfg: Config, world: int) -> dict:
    t = cfg.train
    ga = cfg.grad_accum_for(world)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: Config):
    t = cfg.train
    floor = t.min_lr / t.lr

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "emb" in name or "wte" in name or "wpe" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config, model, world: int, run_dir: Path | None = None):
    deepspeed_env()
    import deepspeed

    conf = ds_config(cfg, world)
    if run_dir is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(conf, indent=1))
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=conf)
    return engine
