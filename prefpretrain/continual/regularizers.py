"""EWC (a diagonal-Fisher quadratic pull towards the previous weights) and distillation (KL to the previous
model on replayed samples). Both are pure functions of tensors; both are exactly zero when switched off."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefpretrain.data_shards.packing import IGNORE
from prefpretrain.losses import token_nll
from prefpretrain.trainer.model import lm_inputs


def diagonal_fisher(model, samples: list[dict], causal: bool = True) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: the mean over samples of the squared gradient of each sample's mean NLL
    (one sample per backward pass, so it is a mean of squares, not the square of a mean)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    used = 0
    for s in samples:
        one = {k: torch.as_tensor(s[k]).unsqueeze(0) for k in ("input_ids", "position_ids") if k in s}
        labels = torch.as_tensor(s["labels"]).unsqueeze(0).to(dev)
        nll, mask = token_nll(model(**lm_inputs(one, dev, model=model)).logits, labels, causal)
        if mask.sum() == 0:
            continue
        model.zero_grad(set_to_none=True)
        (nll.sum() / mask.sum()).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
        used += 1
    model.zero_grad(set_to_none=True)
    model.train(was)
    return {n: f / max(1, used) for n, f in fisher.items()}


def ewc_penalty(model, anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lam/2 * sum_i F_i (theta_i - theta*_i)^2 over the parameters that have a Fisher entry."""
    dev = next(model.parameters()).device
    if lam == 0:
        return torch.zeros((), device=dev)
    total = torch.zeros((), device=dev, dtype=torch.float32)
    for n, p in model.named_parameters():
        f = fisher.get(n)
        if f is not None and p.requires_grad:
            total = total + (f.to(dev) * (p.float() - anchor[n].to(dev)) ** 2).sum()
    return 0.5 * lam * total


def distill_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
               causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) over the target positions of the selected rows, and their count (both
    tensors: masks multiply, nothing waits for the device)."""
    if causal:
        logits, teacher_logits, labels = logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    mask = ((labels != IGNORE) & rows.view(-1, 1).to(labels.device)).float()
    s = F.log_softmax(logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return ((t.exp() * (t - s)).sum(-1) * mask).sum(), mask.sum()
