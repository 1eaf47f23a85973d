"""The six objectives of Korbak et al. (2023) as small pure functions of (logits, batch).

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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefpretrain.data_shards.packing import IGNORE, Layout

OBJECTIVES = ("mle", "filter", "conditional", "unlikelihood", "rwr", "awr")
_LAYOUT = {"filter": "filter", "conditional": "conditional"}  # every other objective sees the data as MLE does


@dataclass(frozen=True)
class ObjectiveParams:
    threshold: float = 0.0
    ul_alpha: float = 0.01
    beta: float = 1.0
    awr_alpha: float = 0.05
    max_weight: float = 1000.0
    reward_scale: float = 1.0  # resolved (never 0 here; see reward_scale_for)


def needs_value_head(objective: str) -> bool:
    return objective == "awr"


def layout_for(objective: str, threshold: float, drop_prob: float, seed: int, special: dict[str, int]) -> Layout:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    kind = _LAYOUT.get(objective, "mle")
    return Layout(kind=kind, threshold=threshold, drop_prob=drop_prob if kind == "conditional" else 0.0, seed=seed,
                  aligned_id=special["aligned"], misaligned_id=special["misaligned"])


def reward_scale_for(configured: float, score_summary: dict) -> float:
    """reward = -score x scale. 0 = auto: 1 / (mean score of segments with a score > 0), so a typical bad
    segment has reward -1 and exp(r / beta) really weights (PEP8 scores are ~1e-2: unscaled, RWR is MLE)."""
    if configured > 0:
        return configured
    n, zero = score_summary.get("segments", 0), score_summary.get("zero_fraction", 1.0)
    positive_mean = score_summary.get("mean_per_segment", 0.0) / max(1e-12, 1.0 - zero) if n else 0.0
    return 1.0 / positive_mean if positive_mean > 0 else 1.0


def _shift(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The part of a per-position tensor that lines up with the targets (causal: predicting t+1)."""
    return x[:, :-1] if causal else x


def _targets(batch: dict, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    scores = batch["scores"][:, 1:] if causal else batch["scores"]
    return labels, scores.float()


class _ChunkedLogp(torch.autograd.Function):
    """log p(target) per row of (N, V) logits, in fp32, without an fp32 copy of the logits: the forward keeps
    one log-sum-exp per row, the backward recomputes the softmax chunk by chunk and writes the gradient in the
    logits' own dtype (d log p_y / d z_j = 1[j = y] - p_j)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for a in range(0, logits.shape[0], chunk):
            lse[a: a + chunk] = torch.logsumexp(logits[a: a + chunk].float(), dim=-1)
        ctx.save_for_backward(logits, target, lse)
        ctx.chunk = chunk
        return logits.gather(1, target[:, None]).squeeze(1).float() - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[0], ctx.chunk):
            gi = g[a: a + ctx.chunk, None].float()
            part = logits[a: a + ctx.chunk].to(torch.float32, copy=True)  # one fp32 temporary per chunk
            part.sub_(lse[a: a + ctx.chunk, None]).exp_().mul_(-gi)
            grad[a: a + ctx.chunk] = part.scatter_add_(1, target[a: a + ctx.chunk, None], gi)
        return grad, None, None


CE_CHUNK_ELEMENTS = 1 << 26  # logits elements per chunk of the chunked cross-entropy (256 MB in fp32)


def token_logp(logits: torch.Tensor, labels: torch.Tensor, causal: bool = True,
               chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) per target position (fp32; 0 where there is no target) and the target mask.

    `chunked` (train.cross_entropy=chunked): the same values and gradients without the fp32 copy of the logits
    and their saved log-softmax (for a 32 k vocabulary and 16 k tokens, ~4 GB less at the peak)."""
    if not chunked:
        logits = _shift(logits, causal)
        if causal:
            labels = labels[:, 1:]
        mask = labels != IGNORE
        logp = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.clamp_min(0).reshape(-1),
                                reduction="none").view(labels.shape)
        return logp * mask, mask
    if causal:  # targets shifted onto the logits' own positions (no sliced copy of the logits)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    mask = labels != IGNORE
    V = logits.size(-1)
    logp = _ChunkedLogp.apply(logits.reshape(-1, V), labels.clamp_min(0).reshape(-1),
                              max(1, CE_CHUNK_ELEMENTS // V)).view(labels.shape)
    logp = logp * mask
    return (logp[:, :-1], mask[:, :-1]) if causal else (logp, mask)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (fp32) and the mask of tokens that count."""
    logp, mask = token_logp(logits, labels, causal)
    return -logp, mask


def target_count(batch: dict, causal: bool = True) -> int:
    """Tokens that carry a loss in a batch (what a step's loss is averaged over)."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return int((labels != IGNORE).sum())


def unlikelihood_terms(logp: torch.Tensor, misaligned: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token loss: -log p on aligned targets, alpha * -log(1 - p) on misaligned ones."""
    p = logp.exp()
    ul = -torch.log1p(-p.clamp(max=1 - 1e-6))
    return torch.where(misaligned, alpha * ul, -logp) * mask


def exp_weights(x: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp(x / beta), max_weight), computed without overflow."""
    return torch.exp(torch.clamp(x / beta, max=math.log(max_weight)))


def compute_loss(objective: str, logits: torch.Tensor, batch: dict, causal: bool = True,
                 p: ObjectiveParams = ObjectiveParams(), values: torch.Tensor | None = None,
                 chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, target count, summed statistics), all tensors on the logits' device: nothing here waits
    for the device (the loop synchronises once per log window). `values` (B, T): the value head's (awr)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}")
    logp, mask = token_logp(logits, batch["labels"], causal, chunked)
    n = mask.sum()
    nll = -logp
    stats = {"nll": nll.detach().sum()}
    if objective in ("mle", "filter", "conditional"):
        return nll.sum(), n, stats
    _, scores = _targets(batch, causal)
    misaligned = (scores > p.threshold) & mask
    stats["misaligned_tokens"] = misaligned.sum().float()
    if objective == "unlikelihood":
        return unlikelihood_terms(logp, misaligned, mask, p.ul_alpha).sum(), n, stats
    reward = -scores * p.reward_scale
    if objective == "rwr":
        w = exp_weights(reward, p.beta, p.max_weight) * mask
        stats["weight"] = w.detach().sum()
        return (nll * w).sum(), n, stats
    if values is None:
        raise ValueError("awr needs the value head's output")
    v = _shift(values, causal).float()
    w = exp_weights(reward - v.detach(), p.beta, p.max_weight) * mask
    value_sq = (v - reward) ** 2 * mask
    stats["weight"] = w.detach().sum()
    stats["value_mse"] = value_sq.detach().sum()
    return p.awr_alpha * (nll * w).sum() + (1 - p.awr_alpha) * value_sq.sum(), n, stats


def batch_pref_stats(batch: dict, threshold: float) -> dict:
    """Preference statistics of the tokens in a batch (for TensorBoard)."""
    scores = batch["scores"].float()
    not_ctrl = ~batch["control"]
    s = scores[not_ctrl]
    return {
        "score_mean": float(s.mean()) if s.numel() else 0.0,
        "aligned_fraction": float((s <= threshold).float().mean()) if s.numel() else 0.0,
    }
