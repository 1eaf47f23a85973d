"""Adversarial training in embedding space (ALUM / SMART style, Liu et al. 2020).

For a micro batch: start from a small random perturbation delta of the input embeddings, take K
ascent steps on the symmetric KL between the model's predictions on (embeddings + delta) and on the
clean embeddings (gradients w.r.t. delta only, so no parameter gradient is touched), keep each token's
delta inside an L2 ball of radius epsilon, then add weight x KL(clean, perturbed) to the loss. One
backward pass for the whole thing, so it composes with DeepSpeed's gradient accumulation and ZeRO 0-3
(tested: ZeRO-2 and ZeRO-3 give the same losses).
Costs K + 1 extra forward passes (and K backward passes to the embeddings) per micro batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefpretrain.config import AdversarialConfig

# the statistics adversarial_term returns: name -> (TensorBoard tag, what the window's sum is divided by)
STATS = {"adv_kl": ("adversarial/kl_per_token", "targets"), "adv_delta_norm": ("adversarial/delta_norm", "micro")}


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of KL(p||q) + KL(q||p) (fp32)."""
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    kl = ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1))
    return (kl * mask).sum()


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norm = delta.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(eps / norm, max=1.0).to(delta.dtype)


def adversarial_term(model, inputs: dict, clean_logits: torch.Tensor, target_mask: torch.Tensor,
                     cfg: AdversarialConfig, causal: bool, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weight x summed symmetric KL at the found perturbation, stats). `inputs`: the model's inputs of the clean
    forward (prefpretrain.trainer.model.lm_inputs; the perturbed forwards keep its position ids, hence its
    document mask). `target_mask` marks positions whose prediction counts (for causal models, positions 0..T-2,
    aligned with the shifted targets)."""
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    emb = model.get_input_embeddings()(inputs["input_ids"])
    # drawn where the embeddings are (a generator on their device; a CPU draw of B x T x H would cross to the GPU)
    dev = generator.device if generator is not None else emb.device
    noise = torch.randn(emb.shape, generator=generator, dtype=torch.float32, device=dev).to(emb.device, emb.dtype)
    delta = _project(noise * cfg.init_std, cfg.epsilon)
    clean = clean_logits.detach()
    mask = target_mask.float()

    def predictions(x: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=x, **rest).logits
        return logits[:, :-1] if causal else logits

    ref = clean[:, :-1] if causal else clean
    for _ in range(cfg.steps):
        delta = delta.detach().requires_grad_(True)
        kl = symmetric_kl(predictions(emb.detach() + delta), ref, mask)
        (g,) = torch.autograd.grad(kl, delta)
        g = g.float()
        step = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        delta = _project(delta.detach() + cfg.step_size * step.to(delta.dtype), cfg.epsilon)
    adv = symmetric_kl(predictions(emb + delta.detach()), clean_logits[:, :-1] if causal else clean_logits, mask)
    stats = {"adv_kl": adv.detach(), "adv_delta_norm": delta.detach().float().norm(dim=-1).mean()}  # device tensors
    return cfg.weight * adv, stats
