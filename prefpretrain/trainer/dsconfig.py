"""The DeepSpeed config a prefpretrain config implies, with the user's `engine.deepspeed` merged in (conflicts
refused). No torch: the preflight of `launch` builds it in the launching process."""
from __future__ import annotations

from prefpretrain import host
from prefpretrain.config import Config
from prefpretrain.errors import ConfigError


def ds_config(cfg: Config, world: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config the options imply, with `engine.deepspeed` merged in last."""
    return merge_user_config(_generated(cfg, world, load_universal), cfg.engine.deepspeed)


def merge_user_config(base: dict, user: dict, where: str = "engine.deepspeed") -> dict:
    """`user` merged into `base` (mappings merged key by key); a key `base` sets to another value is refused:
    it belongs to a prefpretrain option, which must say it (one source of truth for the run)."""
    out = dict(base)
    for k, v in user.items():
        key = f"{where}.{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_user_config(out[k], v, key)
        elif k in out and out[k] != v:
            raise ConfigError(f"{key}: prefpretrain sets it to {out[k]!r} from its own options; set that option "
                              f"instead (see RUN/deepspeed_config.json for what comes from where)")
        else:
            out[k] = v
    return out


def _generated(cfg: Config, world: int, load_universal: bool) -> dict:
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
        # offload on GPUs: DeepSpeed's vectorised CPU Adam (bench/cpu_adam.py); on CPU ranks keep torch AdamW
        # (offloading to the CPU from the CPU moves nothing, and CPU Adam's build takes ~45 s)
        "zero_force_ds_cpu_optimizer": e.offload != "none" and host.use_cuda(e.device),
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
