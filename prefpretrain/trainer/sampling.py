"""Sampling with a KV cache: temperature, top-p, banned tokens, and control tokens re-inserted
after every token that ends a line (PHF's protocol for conditional models on code)."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm


def newline_token_ids(tok) -> set[int]:
    """Token ids whose text ends with a newline (the tokenizer never puts text after one)."""
    out = set()
    for i in tok.get_vocab().values():
        if tok.decode([i], skip_special_tokens=False).endswith("\n"):
            out.add(i)
    return out


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = probs.cumsum(dim=-1)
    remove = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


@torch.no_grad()
def sample(model, n: int, max_new_tokens: int, *, bos_id: int, eos_id: int, banned: list[int],
           control_id: int | None = None, newline_ids: set[int] = frozenset(), temperature: float = 0.7,
           top_p: float = 0.9, seed: int = 0, batch_size: int = 16, max_positions: int | None = None,
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
            logits = _top_p_filter(logits / max(temperature, 1e-5), top_p)
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
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
