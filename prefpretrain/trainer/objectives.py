"""Objectives: small pure functions of (logits, batch) -> (loss, stats).

The layouts that change the data (filter, conditional control tokens) live in
data_shards/packing.py; here is what happens to the logits. Control tokens are inputs, never
targets (their labels are IGNORE), so validation losses stay comparable across objectives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefpretrain.data_shards.packing import IGNORE, Layout

OBJECTIVES = ("mle", "filter", "conditional")


def layout_for(objective: str, threshold: float, drop_prob: float, seed: int, special: dict[str, int]) -> Layout:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    return Layout(kind=objective, threshold=threshold,
                  drop_prob=drop_prob if objective == "conditional" else 0.0, seed=seed,
                  aligned_id=special["aligned"], misaligned_id=special["misaligned"])


def token_nll(logits: torch.Tensor, labels: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood (fp32) and the mask of tokens that count."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.clamp_min(0).reshape(-1),
                          reduction="none").view(labels.shape)
    return nll * mask, mask


def target_count(batch: dict, causal: bool = True) -> int:
    """Tokens that carry a loss in a batch (what a step's loss is averaged over)."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return int((labels != IGNORE).sum())


def mle_loss(logits: torch.Tensor, batch: dict, causal: bool = True) -> tuple[torch.Tensor, int]:
    """Summed NLL of the batch's targets, and their count."""
    nll, mask = token_nll(logits, batch["labels"], causal)
    return nll.sum(), int(mask.sum())


def compute_loss(objective: str, logits: torch.Tensor, batch: dict, causal: bool = True) -> tuple[torch.Tensor, int]:
    """(summed loss, target count). The loop divides by the step's target count over all micro batches and
    ranks, so accumulation and world size do not change the gradient. mle, filter and conditional share
    the loss; they differ in the data (packing layouts)."""
    if objective in OBJECTIVES:
        return mle_loss(logits, batch, causal)
    raise ValueError(f"unknown objective {objective!r}")


def batch_pref_stats(batch: dict, threshold: float) -> dict:
    """Preference statistics of the tokens in a batch (for TensorBoard)."""
    scores = batch["scores"].float()
    not_ctrl = ~batch["control"]
    s = scores[not_ctrl]
    return {
        "score_mean": float(s.mean()) if s.numel() else 0.0,
        "aligned_fraction": float((s <= threshold).float().mean()) if s.numel() else 0.0,
    }
