"""Token log-probabilities (plain or chunked cross-entropy) and an objective's loss over a batch of logits.

The objectives themselves (their registry, parameters and loss functions over `LossInputs`) are
prefpretrain.objectives; this module is what turns logits into their inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefpretrain.data_shards.packing import IGNORE
from prefpretrain.objectives import LossInputs, ObjectiveConfig, get_objective, shift_to_targets


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
        logits = shift_to_targets(logits, causal)
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


def compute_loss(objective: str, logits: torch.Tensor, batch: dict, causal: bool = True,
                 p: ObjectiveConfig | None = None, values: torch.Tensor | None = None,
                 chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, target count, summed statistics), all tensors on the logits' device: nothing here waits
    for the device (the loop synchronises once per log window). `values` (B, T): the value head's (awr)."""
    obj, p = get_objective(objective), p or ObjectiveConfig(reward_scale=1.0)
    logp, mask = token_logp(logits, batch["labels"], causal, chunked)
    loss, stats = obj.loss(LossInputs(logp, mask, batch, causal, p, values))
    return loss, mask.sum(), {"nll": -logp.detach().sum(), **stats}


def batch_pref_stats(batch: dict, threshold: float) -> dict:
    """Preference statistics of the tokens in a batch (for TensorBoard)."""
    scores = batch["scores"].float()
    not_ctrl = ~batch["control"]
    s = scores[not_ctrl]
    return {
        "score_mean": float(s.mean()) if s.numel() else 0.0,
        "aligned_fraction": float((s <= threshold).float().mean()) if s.numel() else 0.0,
    }
