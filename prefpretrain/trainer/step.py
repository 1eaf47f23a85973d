"""One micro step (forward, objective, optional adversarial term, backward) and the log window it fills.

The loop (loop.py) owns the order of things — data, step boundaries, checkpoints, evaluation; this file owns
what happens to one micro batch and how a window of them becomes the logged scalars.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from prefpretrain import auxiliary, distributed
from prefpretrain.data_shards.packing import IGNORE
from prefpretrain.losses import batch_pref_stats, compute_loss, target_count
from prefpretrain.objectives import ObjectiveConfig, get_objective
from prefpretrain.trainer import adversarial
from prefpretrain.trainer.model import lm_inputs

# the window's sums, in this order; objective / adversarial statistics follow, sorted by name
_BASE = ("loss", "nll", "targets", "score_mean", "aligned_fraction", "corrupt")


@dataclass
class Window:
    """What the loop accumulates between two log lines: sums over this rank's micro batches, kept as tensors on
    the training device (no host synchronisation per micro step) until `window_scalars` reduces them."""

    t0: float = field(default_factory=time.time)
    steps: int = 0
    micro: int = 0
    sums: dict = field(default_factory=dict)  # name -> 0-dim tensor (or float for host-side statistics)

    def add(self, name: str, value) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value


@dataclass(frozen=True)
class StepSpec:
    """What a micro step needs from the config."""

    objective: str
    causal: bool
    params: ObjectiveConfig  # with reward_scale resolved
    adversarial: object  # config section: steps, epsilon, step_size, init_std, weight
    with_values: bool  # AWR: the value head reads the last hidden state
    seed: int
    chunked_ce: bool = False  # train.cross_entropy=chunked


def micro_step(engine, batch: dict, dev: torch.device, spec: StepSpec, scale: float, w: Window, hooks=None) -> None:
    """Forward + loss + backward + engine.step() of one micro batch (DeepSpeed applies the optimizer at the
    accumulation boundary). `scale` turns the summed loss into this rank's share of the step's mean."""
    inputs = lm_inputs(batch, dev, model=engine.module)
    b = {k: inputs[k] if k in inputs else v.to(dev, non_blocking=True) for k, v in batch.items()}
    heads = auxiliary.active(spec.params)
    out = engine(**inputs, output_hidden_states=spec.with_values or heads)
    values = engine.module.value_head(out.hidden_states[-1]).squeeze(-1) if spec.with_values else None
    loss_sum, _, stats = compute_loss(spec.objective, out.logits, b, spec.causal, spec.params, values, spec.chunked_ce)
    if heads:  # the label head and the similarity task (their statistics: auxiliary.stat_tags)
        def view():  # the similarity task's dropout view: a second forward of the transformer (no LM head, no
            with torch.no_grad():  # logits), without gradient; its last hidden state is the full model's
                return engine.module.base_model(**inputs).last_hidden_state
        term, aux_stats = auxiliary.head_terms(engine.module, out.hidden_states[-1], batch, spec.params, spec.causal,
                                               float(target_count(batch, spec.causal)), view)
        loss_sum = loss_sum + term
        stats.update(aux_stats)
    if spec.adversarial.steps:
        mask = (b["labels"][:, 1:] if spec.causal else b["labels"]) != IGNORE
        # seeded by the samples, not the rank: the same data gets the same start at any world size
        gen = torch.Generator(device=dev).manual_seed(hash((spec.seed, int(batch["position"][0]))) % 2**63)
        term, adv_stats = adversarial.adversarial_term(engine.module, inputs, out.logits, mask,
                                                       spec.adversarial, spec.causal, gen)
        loss_sum = loss_sum + term
        stats.update(adv_stats)
    # a hook's term (e.g. a continual update's EWC and distillation), already in this rank's share of the step
    extra = hooks.extra_loss(engine.module, batch, out.logits, scale) if hooks else None
    engine.backward(loss_sum * scale if extra is None else loss_sum * scale + extra)
    engine.step()
    w.micro += 1
    w.add("loss", loss_sum.detach().float())
    w.add("targets", float(target_count(batch, spec.causal)))  # from the host copy of the labels
    for k, v in stats.items():
        w.add(k, v.detach().float() if isinstance(v, torch.Tensor) else float(v))
    ps = batch_pref_stats(batch, spec.params.threshold)  # host tensors: no device synchronisation
    w.add("score_mean", ps["score_mean"])
    w.add("aligned_fraction", ps["aligned_fraction"])
    w.add("corrupt", float(batch["corrupt"].sum()))


def stat_tags(spec: StepSpec) -> dict[str, tuple[str, str]]:
    """The window's extra statistics of this run: name -> (TensorBoard tag, divided by "targets", "micro" or the
    sum of the statistic of that name)."""
    tags = {k: (tag, "targets") for k, tag in get_objective(spec.objective).stats.items()}
    return {**tags, **auxiliary.stat_tags(spec.params), **(adversarial.STATS if spec.adversarial.steps else {})}


def window_scalars(w: Window, world: int, dev: torch.device, tags: dict[str, tuple[str, str]]) -> dict:
    """The window's loss and preference statistics over all ranks: one all-reduce and one host synchronisation
    (every rank calls it at the same step; the statistics' names follow from the config, so they agree)."""
    extra = sorted(k for k in w.sums if k not in _BASE)
    names = list(_BASE) + extra
    vec = torch.stack([torch.as_tensor(w.sums.get(k, 0.0), dtype=torch.float64, device=dev).reshape(())
                       for k in names])
    got = dict(zip(names, distributed.all_sum(vec), strict=True))
    targets = max(1.0, got["targets"])
    per_micro = w.micro * world
    out = {"train/loss": got["loss"] / targets, "train/nll": got["nll"] / targets,
           "pref/score_mean": got["score_mean"] / per_micro,
           "pref/aligned_fraction": got["aligned_fraction"] / per_micro,
           "data/corrupt_samples": got["corrupt"]}
    for k in extra:  # statistics an objective or the adversarial term declare (stat_tags)
        if k not in tags:
            raise KeyError(f"statistic {k!r} is not declared by objective or adversarial term (stat_tags)")
        tag, per = tags[k]  # divided by the micro batches, the targets, or another statistic's sum
        out[tag] = got[k] / (per_micro if per == "micro" else targets if per == "targets" else max(got[per], 1e-12))
    return out
