"""Sampling with a KV cache: temperature, top-p, banned tokens, and control tokens re-inserted
after every token that ends a line (PHF's protocol for conditional models on code)."""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm


def newline_token_ids(tok) -> set[int]:
    """Token ids whose text ends with a newline (the tokenizer never puts text after one)."""
    out = set()
    for i in tok.get_vocab().values():
        if tok.decode([i], skip_special_tokens=False).endswith("\n"):
            out.add(i)
    return out


def top_p_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Each row's next-token probabilities restricted to its nucleus — the most likely tokens while the mass
    before a token is <= top_p — and zero elsewhere (not renormalised). The cut is found on a sorted copy of
    the probabilities (numpy's SIMD sort: ~20x faster than torch.sort here, which was half the sampling time)
    and applied as a threshold, so tokens tied with the last one kept are kept too."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p >= 1.0:
        return probs
    srt = np.sort(probs.numpy(), axis=-1)[:, ::-1]
    mass_before = np.cumsum(srt, axis=-1) - srt
    n_keep = np.maximum((mass_before <= top_p).sum(-1), 1)
    tau = torch.from_numpy(np.ascontiguousarray(srt[np.arange(len(srt)), n_keep - 1]))
    return torch.where(probs >= tau[:, None], probs, 0.0)


def draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from unnormalised probabilities (inverse CDF: one uniform per row)."""
    c = probs.cumsum(dim=-1)
    u = torch.rand(len(c), 1, generator=gen, dtype=c.dtype) * c[:, -1:]
    return torch.searchsorted(c, u, right=True).squeeze(1).clamp_max(c.shape[-1] - 1)


@torch.no_grad()
def sample(model, n: int, max_new_tokens: int, *, bos_id: int, eos_id: int, banned: list[int],
           control_id: int | None = None, newline_ids: set[int] = frozenset(), temperature: float = 0.7,
           top_p: float = 0.9, seed: int = 0, batch_size: int = 64, max_positions: int | None = None,
           prompt_ids: list[int] = ()) -> list[list[int]]:
    """n samples of token ids (generated part only, control tokens included where forced)."""
    model.eval()
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nl = torch.zeros(model.get_input_embeddings().num_embeddings, dtype=torch.bool)
    nl[list(newline_ids)] = True
    ban = torch.tensor(sorted(set(banned)), dtype=torch.long)
    out: list[list[int]] = []
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="sample", unit="batch", disable=not sys.stderr.isatty() or len(starts) < 2):
        b = min(batch_size, n - start)
        prompt = [bos_id] + ([control_id] if control_id is not None else [])
        for t in prompt_ids:
            prompt.append(t)
            if control_id is not None and t in newline_ids:
                prompt.append(control_id)
        steps = max_new_tokens
        if max_positions is not None:
            steps = min(steps, max_positions - len(prompt))
        ids = torch.tensor([prompt] * b, device=dev)
        cache = None
        seqs = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        force = torch.zeros(b, dtype=torch.bool)  # next token is the control token, not sampled
        x = ids
        for _ in range(steps):
            res = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            cache = res.cache
            logits = res.logits[:, -1, :].float().cpu()
            logits[:, ban] = float("-inf")
            nxt = draw(top_p_probs(logits / max(temperature, 1e-5), top_p), gen)
            if control_id is not None:
                nxt = torch.where(force, torch.full_like(nxt, control_id), nxt)
            for i in range(b):
                if not done[i]:
                    seqs[i].append(int(nxt[i]))
            done |= nxt == eos_id
            force = nl[nxt] & (control_id is not None) & ~force
            if bool(done.all()):
                break
            x = nxt.view(b, 1).to(dev)
        out.extend(seqs)
    return out


def sample_texts(model, tok, sp: dict[str, int], n: int, max_new_tokens: int, *, condition: str, temperature: float,
                 top_p: float, seed: int, max_positions: int | None, prompt_ids: list[int] = ()) -> list[str]:
    """n decoded samples: special tokens never sampled; with condition aligned/misaligned that control token
    prefixes the sample and follows every newline; control tokens and EOS are stripped from the text."""
    control = {"aligned": sp["aligned"], "misaligned": sp["misaligned"]}.get(condition)
    seqs = sample(model, n, max_new_tokens, bos_id=sp["eos"], eos_id=sp["eos"],
                  banned=[sp["pad"], sp["mask"], sp["aligned"], sp["misaligned"]], control_id=control,
                  newline_ids=newline_token_ids(tok) if control is not None else set(), temperature=temperature,
                  top_p=top_p, seed=seed, max_positions=max_positions, prompt_ids=prompt_ids)
    strip = {sp["aligned"], sp["misaligned"], sp["eos"]}
    return [tok.decode([t for t in s if t not in strip]) for s in seqs]
