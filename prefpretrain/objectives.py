"""The objectives: one registry entry each (`register(Objective(...))` at the end of this file), with the six of
Korbak et al. (2023) as small pure functions of the batch's token log-probabilities.

Adding an objective: write its loss function over `LossInputs`, register it with its data layout, value head,
statistics (TensorBoard tags) and evaluation condition, add any parameter to `ObjectiveConfig`, and test it in
tests/test_objectives.py. Nothing else names objectives. This module does not import torch (the config reads its
registry): losses use tensor methods; token log-probs and `compute_loss` are prefpretrain.losses'.

Scores follow the PHF convention: LOWER IS BETTER (e.g. PEP8 violations per character); every token
carries the score of its segment, and a token is "aligned" iff its score <= threshold (0 means 0).

- mle, filter, conditional: the same summed NLL; they differ in the data, which packing lays out
  (filter leaves out documents above the threshold, conditional puts a control token before every
  segment). Control tokens are inputs, never targets (their labels are IGNORE).
- unlikelihood: NLL on aligned tokens, alpha * -log(1 - p(token)) on misaligned ones.
- rwr: NLL weighted by w = min(exp(r / beta), max_weight), r = -score * reward_scale.
- awr: NLL weighted by min(exp((r - V) / beta), max_weight) with V a value head's prediction
  (no gradient through the weight), plus (1 - alpha) * (V - r)^2 to train V; NLL part scaled by alpha.

Every loss is returned SUMMED over the batch's target tokens with their count: the loop divides by a
step's target count over all micro batches and ranks, so accumulation and world size do not change
the gradient.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Literal

from prefpretrain.data_shards.packing import Control, Layout

if TYPE_CHECKING:  # tensors flow through here; torch itself is imported by prefpretrain.losses (the config is not)
    import torch


@dataclass
class AttributeConfig:
    """One preference attribute: a score column of the shard sets and the threshold that splits it."""

    FROM_STR: ClassVar[str] = "column"  # `objective.attributes: [pii]` means [{column: pii}]

    column: str = ""  # a score column of every shard set (its stored one, or one `prefpretrain rescore` added)
    threshold: float = 0.0  # score <= threshold is "aligned"


@dataclass
class ObjectiveConfig:
    """The objectives' parameters: the config's `objective:` section, and what the losses read."""

    threshold: float = 0.0  # score <= threshold is "aligned" (conditional); filter keeps docs with mean <= it
    attributes: list[AttributeConfig] = field(default_factory=list)  # the score columns the objective reads, each
    # with its threshold (the first one's replaces `threshold`); [] = the shard sets' stored column. Several: the
    # conditional objective only, one control token per attribute (prefpretrain.conditioning)
    drop_prob: float = 0.1  # conditional: probability a control token is left out (seeded)
    ul_alpha: float = 0.01  # unlikelihood: weight of -log(1 - p) on misaligned tokens (aligned ones get NLL)
    beta: float = 1.0  # rwr/awr: temperature of the weights exp(reward / beta), exp(advantage / beta)
    awr_alpha: float = 0.05  # awr: loss = alpha x weighted NLL + (1 - alpha) x value-head MSE
    max_weight: float = 1000.0  # rwr/awr: weights are clamped to this
    reward_scale: float = 0.0  # rwr/awr: reward = -score x scale; 0 = auto (1 / mean score of segments with score > 0)
    label_head_weight: float = 0.0  # the preference-label head: weight of its binary cross-entropy on P(segment is
    # preferred, i.e. scores <= threshold) next to the objective's loss; 0 = off. A trained head scores new text
    # (`--scorer learned:RUN_DIR`). Any objective, causal or masked (prefpretrain.auxiliary)
    similarity_weight: float = 0.0  # the sentence-similarity task: weight of a contrastive loss over segment
    # embeddings with in-batch negatives; 0 = off
    similarity_positive: Literal["neighbour", "dropout"] = "neighbour"  # a segment's positive: the next segment
    # of its document, or a second dropout view of itself (a second forward; needs model.dropout > 0)
    similarity_temperature: float = 0.05  # the contrastive loss's temperature (cosine similarities / it)

    @property
    def column(self) -> str | None:
        """The score column samples carry (None: the shard sets' stored one)."""
        return self.attributes[0].column if self.attributes else None

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """The columns of the attributes past the first (conditioning on several)."""
        return tuple(a.column for a in self.attributes[1:])


@dataclass(frozen=True)
class Objective:
    """One registry entry: everything the rest of prefpretrain needs to know about an objective."""

    name: str
    loss: Callable[[LossInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # (summed loss, summed statistics)
    layout: str = "mle"  # how packing lays out the data: mle | filter | conditional (data_shards.packing)
    value_head: bool = False  # a value head on the last hidden state (its output reaches the loss as `values`)
    stats: dict[str, str] = field(default_factory=dict)  # statistic -> TensorBoard tag (per target token)
    condition: str = "none"  # control token samples are drawn with when evaluating (eval.condition=auto)


OBJECTIVES: dict[str, Objective] = {}


def objective_problem(o: ObjectiveConfig, objective: str, dropout: float | None) -> str | None:
    """One line saying what is wrong with the objective's parameters (None: nothing). `dropout`: the model's
    (None: a pretrained model's own, checked once the model is built)."""
    for key, val in [("ul_alpha", o.ul_alpha), ("beta", o.beta), ("max_weight", o.max_weight),
                     ("similarity_temperature", o.similarity_temperature)]:
        if not (math.isfinite(val) and val > 0):
            return f"objective.{key}: must be positive, got {val}"
    if not 0 <= o.awr_alpha <= 1:
        return f"objective.awr_alpha: must be within [0, 1], got {o.awr_alpha}"
    for key, val in [("reward_scale", o.reward_scale), ("label_head_weight", o.label_head_weight),
                     ("similarity_weight", o.similarity_weight)]:
        if not (math.isfinite(val) and val >= 0):
            return f"objective.{key}: must be >= 0 (0 = {'auto' if key == 'reward_scale' else 'off'}), got {val}"
    if o.similarity_weight > 0 and o.similarity_positive == "dropout" and dropout == 0:
        return ("objective.similarity_positive: dropout views of a model without dropout are identical; set "
                "model.dropout > 0 or use neighbour")
    if o.label_head_weight > 0 and objective in OBJECTIVES and OBJECTIVES[objective].layout == "conditional" \
            and o.drop_prob == 0:
        return ("objective.label_head_weight: with conditional and drop_prob 0 every segment shows its label as a "
                "control token, and the head (which learns from segments without one) gets nothing to learn from")
    return None


def register(objective: Objective) -> Objective:
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is registered twice")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def layout_for(objective: str, threshold: float, drop_prob: float, seed: int, special: dict[str, int],
               more: tuple[Control, ...] = ()) -> Layout:
    """`more`: the control tokens of the attributes past the first (prefpretrain.conditioning)."""
    kind = get_objective(objective).layout
    return Layout(kind=kind, threshold=threshold, drop_prob=drop_prob if kind == "conditional" else 0.0, seed=seed,
                  aligned_id=special["aligned"], misaligned_id=special["misaligned"],
                  more=more if kind == "conditional" else ())


def eval_condition(objective: str, configured: str = "auto") -> str:
    """The control token samples are drawn with: eval.condition, or the objective's own for `auto`."""
    return get_objective(objective).condition if configured == "auto" else configured


def reward_scale_for(configured: float, score_summary: dict) -> float:
    """reward = -score x scale. 0 = auto: 1 / (mean score of segments with a score > 0), so a typical bad
    segment has reward -1 and exp(r / beta) really weights (PEP8 scores are ~1e-2: unscaled, RWR is MLE)."""
    if configured > 0:
        return configured
    n, zero = score_summary.get("segments", 0), score_summary.get("zero_fraction", 1.0)
    positive_mean = score_summary.get("mean_per_segment", 0.0) / max(1e-12, 1.0 - zero) if n else 0.0
    return 1.0 / positive_mean if positive_mean > 0 else 1.0


def resolved(params: ObjectiveConfig, train_score_stats: dict) -> ObjectiveConfig:
    """The parameters with reward_scale resolved from the training split's score statistics (auto = 0)."""
    return dataclasses.replace(params, reward_scale=reward_scale_for(params.reward_scale, train_score_stats))


def shift_to_targets(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The part of a per-position tensor that lines up with the targets (causal: predicting t+1)."""
    return x[:, :-1] if causal else x


def _targets(batch: dict, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    scores = batch["scores"][:, 1:] if causal else batch["scores"]
    return labels, scores.float()


def unlikelihood_terms(logp: torch.Tensor, misaligned: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token loss: -log p on aligned targets, alpha * -log(1 - p) on misaligned ones."""
    ul = -(-logp.exp().clamp(max=1 - 1e-6)).log1p()
    return (alpha * ul).where(misaligned, -logp) * mask


def exp_weights(x: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp(x / beta), max_weight), computed without overflow."""
    return (x / beta).clamp(max=math.log(max_weight)).exp()


@dataclass
class LossInputs:
    """What a loss function reads: token log-probs and their mask (targets only), the batch, the parameters."""

    logp: torch.Tensor  # (B, T') log p(target), 0 where there is no target
    mask: torch.Tensor  # (B, T') the positions that carry a target
    batch: dict
    causal: bool
    p: ObjectiveConfig
    values: torch.Tensor | None = None  # (B, T) the value head's output (objectives with value_head=True)

    @property
    def nll(self) -> torch.Tensor:
        return -self.logp

    @cached_property
    def scores(self) -> torch.Tensor:
        return _targets(self.batch, self.causal)[1]

    @cached_property
    def misaligned(self) -> torch.Tensor:
        return (self.scores > self.p.threshold) & self.mask

    @property
    def reward(self) -> torch.Tensor:
        return -self.scores * self.p.reward_scale


# ---------------------------------------------------------------- the six objectives of Korbak et al. (2023)

def nll_loss(x: LossInputs) -> tuple[torch.Tensor, dict]:
    """mle, filter, conditional: summed NLL (they differ in the data the layout gives them)."""
    return x.nll.sum(), {}


def unlikelihood_loss(x: LossInputs) -> tuple[torch.Tensor, dict]:
    return unlikelihood_terms(x.logp, x.misaligned, x.mask, x.p.ul_alpha).sum(), \
        {"misaligned_tokens": x.misaligned.sum().float()}


def rwr_loss(x: LossInputs) -> tuple[torch.Tensor, dict]:
    w = exp_weights(x.reward, x.p.beta, x.p.max_weight) * x.mask
    return (x.nll * w).sum(), {"misaligned_tokens": x.misaligned.sum().float(), "weight": w.detach().sum()}


def awr_loss(x: LossInputs) -> tuple[torch.Tensor, dict]:
    if x.values is None:
        raise ValueError("awr needs the value head's output")
    v, r = shift_to_targets(x.values, x.causal).float(), x.reward
    w = exp_weights(r - v.detach(), x.p.beta, x.p.max_weight) * x.mask
    value_sq = (v - r) ** 2 * x.mask
    loss = x.p.awr_alpha * (x.nll * w).sum() + (1 - x.p.awr_alpha) * value_sq.sum()
    return loss, {"misaligned_tokens": x.misaligned.sum().float(), "weight": w.detach().sum(),
                  "value_mse": value_sq.detach().sum()}


_PREF = {"misaligned_tokens": "objective/misaligned_fraction"}
_WEIGHTED = {**_PREF, "weight": "objective/weight_mean"}
register(Objective("mle", nll_loss))
register(Objective("filter", nll_loss, layout="filter"))
register(Objective("conditional", nll_loss, layout="conditional", condition="aligned"))
register(Objective("unlikelihood", unlikelihood_loss, stats=_PREF))
register(Objective("rwr", rwr_loss, stats=_WEIGHTED))
register(Objective("awr", awr_loss, value_head=True, stats={**_WEIGHTED, "value_mse": "objective/value_mse"}))
