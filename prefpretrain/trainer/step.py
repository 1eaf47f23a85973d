"""One micro step (forward, objective, optional adversarial term, backward) and the log window it fills.

The loop (loop.py) owns the order of things — data, step boundaries, checkpoints, evaluation; this file owns
what happens to one micro batch and how a window of them becomes the logged scalars.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from prefpretrain.data_shards.packing import IGNORE
from prefpretrain.trainer.adversarial import adversarial_term
from prefpretrain.trainer.objectives import ObjectiveParams, batch_pref_stats, compute_loss


@dataclass
class Window:
    """What the loop accumulates between two log lines (sums over this rank's micro batches)."""

    t0: float = field(default_factory=time.time)
    steps: int = 0
    micro: int = 0
    loss: float = 0.0
    nll: float = 0.0
    targets: int = 0
    score_mean: float = 0.0
    aligned_fraction: float = 0.0
    corrupt: int = 0
    extra: dict = field(default_factory=dict)  # objective / adversarial statistics, summed


@dataclass(frozen=True)
class StepSpec:
    """What a micro step needs from the config."""

    objective: str
    causal: bool
    params: ObjectiveParams
    adversarial: object  # config section: steps, epsilon, step_size, init_std, weight
    with_values: bool  # AWR: the value head reads the last hidden state
    seed: int


def micro_step(engine, batch: dict, dev: torch.device, spec: StepSpec, scale: float, w: Window, cont=None) -> None:
    """Forward + loss + backward + engine.step() of one micro batch (DeepSpeed applies the optimizer at the
    accumulation boundary). `scale` turns the summed loss into this rank's share of the step's mean."""
    b = {k: v.to(dev) for k, v in batch.items()}
    out = engine(input_ids=b["input_ids"], output_hidden_states=spec.with_values)
    values = engine.module.value_head(out.hidden_states[-1]).squeeze(-1) if spec.with_values else None
    loss_sum, n, stats = compute_loss(spec.objective, out.logits, b, spec.causal, spec.params, values)
    if spec.adversarial.steps:
        mask = (b["labels"][:, 1:] if spec.causal else b["labels"]) != IGNORE
        # seeded by the samples, not the rank: the same data gets the same start at any world size
        gen = torch.Generator().manual_seed(hash((spec.seed, int(batch["position"][0]))) % 2**63)
        term, adv_stats = adversarial_term(engine.module, b["input_ids"], out.logits, mask, spec.adversarial,
                                           spec.causal, gen)
        loss_sum = loss_sum + term
        stats.update(adv_stats)
    extra = cont.extra_loss(engine.module, batch, out.logits, scale) if cont else None  # EWC, distillation
    engine.backward(loss_sum * scale if extra is None else loss_sum * scale + extra)
    engine.step()
    w.micro += 1
    w.loss += float(loss_sum.detach())
    w.nll += stats.pop("nll")
    w.targets += n
    for k, v in stats.items():
        w.extra[k] = w.extra.get(k, 0.0) + v
    ps = batch_pref_stats(batch, spec.params.threshold)
    w.score_mean += ps["score_mean"]
    w.aligned_fraction += ps["aligned_fraction"]
    w.corrupt += int(batch["corrupt"].sum())


EXTRA_TAGS = {"weight": "objective/weight_mean", "value_mse": "objective/value_mse",
              "misaligned_tokens": "objective/misaligned_fraction", "adv_kl": "adversarial/kl_per_token",
              "adv_delta_norm": "adversarial/delta_norm"}


def window_scalars(w: Window, world: int) -> dict:
    """The window's loss and preference statistics over all ranks (one all-reduce; every rank calls it)."""
    keys = sorted(w.extra)  # the same on every rank: they follow from the config
    sums = torch.tensor([w.loss, w.targets, w.score_mean, w.aligned_fraction, w.corrupt, w.nll]
                        + [w.extra[k] for k in keys], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    targets = float(sums[1].clamp_min(1))
    extra = {k: float(v) / targets for k, v in zip(keys, sums[6:].tolist(), strict=True)}
    if "adv_delta_norm" in extra:  # a mean per micro batch, not per token
        extra["adv_delta_norm"] = float(sums[6 + keys.index("adv_delta_norm")]) / (w.micro * world)
    return {"train/loss": float(sums[0]) / targets, "train/nll": float(sums[5]) / targets,
            "pref/score_mean": float(sums[2]) / (w.micro * world),
            "pref/aligned_fraction": float(sums[3]) / (w.micro * world),
            "data/corrupt_samples": float(sums[4]), **{EXTRA_TAGS[k]: v for k, v in extra.items()}}
