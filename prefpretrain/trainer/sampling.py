"""Sampling with a KV cache: temperature, top-p, banned tokens, and a conditional model's control tokens (one per
attribute conditioned on, prefpretrain.conditioning) placed by one of three protocols (PROTOCOLS): `newline`
re-inserts them after every token that ends a line (PHF's protocol for line-segmented code), `prefix` puts them at
the start only, `segment` re-inserts them wherever a segment of the shard set's segmenter ends in the sampled text:
after a line for `line`, also after a sentence-final token for `sentence` (so a sentence that starts mid-line is
conditioned too, as it was in training), nowhere for `document`. Control tokens are never training targets, so a
model never places them itself: they are inserted."""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from prefpretrain import conditioning, distributed
from prefpretrain.conditioning import Attribute

SAMPLE_BATCH = 64  # samples drawn together (one KV cache)
PROTOCOLS = ("newline", "prefix", "segment")


def newline_token_ids(tok) -> set[int]:
    """Token ids whose text ends with a newline (the tokenizer never puts text after one)."""
    out = set()
    for i in tok.get_vocab().values():
        if tok.decode([i], skip_special_tokens=False).endswith("\n"):
            out.add(i)
    return out


SENTENCE_END = ".!?"
CLOSERS = "\"')]}\u201d\u2019\u00bb"  # may follow the full stop inside the sentence: ." ') etc.


def sentence_end_token_ids(tok) -> set[int]:
    """Token ids whose text ends a sentence (`.`, `!` or `?`, maybe followed by closing quotes or brackets): the
    byte-level pre-tokenizer puts the space after a sentence into the next token (" The"), which is where the
    sentence segmenter starts the next segment. A heuristic: "3.14" or "e.g." end a token that way too."""
    out = set()
    for i in tok.get_vocab().values():
        text = tok.decode([i], skip_special_tokens=False).rstrip(CLOSERS)
        if text and text[-1] in SENTENCE_END:
            out.add(i)
    return out


def top_p_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Each row's next-token probabilities restricted to its nucleus — the most likely tokens while the mass
    before a token is <= top_p — and zero elsewhere (not renormalised). The cut is found on a sorted copy of
    the probabilities and applied as a threshold, so tokens tied with the last one kept are kept too. On the
    CPU the sort is numpy's (SIMD: ~20x faster than torch.sort here, which was half the sampling time); on a
    GPU it is torch's, on the device: no copy of the vocabulary to the host per token."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p >= 1.0:
        return probs
    tau = _nucleus_floor_numpy(probs, top_p) if probs.device.type == "cpu" else nucleus_floor(probs, top_p)
    return torch.where(probs >= tau[:, None], probs, 0.0)


def _nucleus_floor_numpy(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    srt = np.sort(probs.numpy(), axis=-1)[:, ::-1]
    mass_before = np.cumsum(srt, axis=-1) - srt
    n_keep = np.maximum((mass_before <= top_p).sum(-1), 1)
    return torch.from_numpy(np.ascontiguousarray(srt[np.arange(len(srt)), n_keep - 1]))


def nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest probability each row's nucleus keeps (torch, on the probabilities' device)."""
    srt = torch.sort(probs, dim=-1, descending=True).values
    mass_before = srt.cumsum(dim=-1) - srt
    n_keep = (mass_before <= top_p).sum(dim=-1).clamp_min(1)
    return srt.gather(1, (n_keep - 1)[:, None]).squeeze(1)


def draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from unnormalised probabilities (inverse CDF: one uniform per row; `gen` lives on the
    probabilities' device)."""
    c = probs.cumsum(dim=-1)
    u = torch.rand(len(c), 1, generator=gen, dtype=c.dtype, device=c.device) * c[:, -1:]
    return torch.searchsorted(c, u, right=True).squeeze(1).clamp_max(c.shape[-1] - 1)


def my_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """The sample indices of the batches this rank draws: batch k = [k B, (k+1) B) goes to rank k mod world."""
    starts = range(0, n, batch_size)
    return [range(a, min(n, a + batch_size)) for k, a in enumerate(starts) if k % world == rank]


def _batch_generator(seed: int, k: int, dev: torch.device) -> torch.Generator:
    """Batch k's own generator: the samples do not depend on how many ranks share the batches."""
    return torch.Generator(device=dev).manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))


@torch.no_grad()
def sample(model, n: int, max_new_tokens: int, *, bos_id: int, eos_id: int, banned: list[int],
           control_ids: tuple[int, ...] = (), newline_ids: set[int] = frozenset(), temperature: float = 0.7,
           top_p: float = 0.9, seed: int = 0, batch_size: int = SAMPLE_BATCH, max_positions: int | None = None,
           prompt_ids: list[int] = (), rank: int = 0, world: int = 1, lockstep: bool = False) -> list[list[int]]:
    """Token ids of this rank's samples (generated part only, control tokens included where forced), in index
    order; `my_batches` says which they are (all n with one rank). `control_ids` (one per attribute conditioned on)
    are placed at the start and after every token of `newline_ids`.

    Everything per token stays on the model's device; the host reads the tokens once per batch. `lockstep`
    (ZeRO-3, where every forward needs every rank): each rank runs as many batches and forwards as the others
    (a rank out of batches repeats its first one and drops it) and a batch stops when every rank's is done."""
    model.eval()
    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    nl = torch.zeros(vocab, dtype=torch.bool, device=dev)
    nl[list(newline_ids)] = True
    ban = torch.tensor(sorted(set(banned)), dtype=torch.long, device=dev)
    prompt = [bos_id, *control_ids]
    for t in prompt_ids:
        prompt.append(t)
        if t in newline_ids:
            prompt.extend(control_ids)
    steps = max_new_tokens if max_positions is None else min(max_new_tokens, max_positions - len(prompt))
    mine = my_batches(n, batch_size, rank, world)
    rounds = len(my_batches(n, batch_size, 0, world)) if lockstep else len(mine)  # rank 0 has the most
    out: list[list[int]] = []
    for i in tqdm(range(rounds), desc="sample", unit="batch", disable=not sys.stderr.isatty() or rounds < 2):
        real = i < len(mine)
        rows = mine[i] if real else mine[0] if mine else range(min(n, batch_size))
        k = i * world + rank
        gen = _batch_generator(seed, k, dev)
        toks = _sample_batch(model, torch.tensor([prompt] * len(rows), device=dev), steps, gen, ban, nl, eos_id,
                             tuple(control_ids), temperature, top_p, lockstep, real)
        if real:
            out.extend(toks)
    return out


def _sample_batch(model, ids: torch.Tensor, steps: int, gen: torch.Generator, ban: torch.Tensor, nl: torch.Tensor,
                  eos_id: int, control_ids: tuple[int, ...], temperature: float, top_p: float, lockstep: bool,
                  real: bool) -> list[list[int]]:
    b, dev = len(ids), ids.device
    tokens = torch.empty(b, max(0, steps), dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    k = len(control_ids)
    ctrl = torch.tensor(control_ids or (0,), dtype=torch.long, device=dev)
    pending = torch.zeros(b, dtype=torch.long, device=dev)  # control tokens still to place before sampling again
    check_every = 1 if dev.type == "cpu" else 8  # how often the host asks whether all rows are done
    cache, x, used = None, ids, 0
    name = _cache_argument(model)
    for t in range(steps):
        res = model(input_ids=x, **{name: cache}, use_cache=True, logits_to_keep=1)
        cache = getattr(res, name)
        logits = res.logits[:, -1, :].float()
        logits[:, ban] = float("-inf")
        nxt = draw(top_p_probs(logits / max(temperature, 1e-5), top_p), gen)
        if k:
            forced = pending > 0
            nxt = torch.where(forced, ctrl[(k - pending).clamp(0, k - 1)], nxt)
            pending = torch.where(forced, pending - 1, nl[nxt].long() * k)
        tokens[:, t] = nxt
        used = t + 1
        done |= nxt == eos_id
        if (t + 1) % check_every == 0 or t + 1 == steps:
            left = (~done).sum() if real else torch.zeros((), dtype=torch.long, device=dev)
            if (_all_ranks_left(left) if lockstep else int(left)) == 0:
                break
        x = nxt.view(b, 1)
    rows = tokens[:, :used].tolist()  # the one copy to the host
    return [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]


def _cache_argument(model) -> str:
    """The KV cache's argument and output name: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    fwd = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in fwd else "past_key_values"


def _all_ranks_left(left: torch.Tensor) -> int:
    return int(distributed.all_sum(left.reshape(1))[0])


def control_args(tok, sp: dict[str, int], attributes: tuple[Attribute, ...], condition: str,
                 protocol: str = "newline", segmenter: str = "line") -> dict:
    """`sample`'s banned tokens, control tokens and the tokens after which they are inserted, for a condition
    (prefpretrain.conditioning) under a protocol and the shard set's segmenter (the one place that decides them).
    Special tokens are never sampled."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"control protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    controls = conditioning.control_ids(attributes, condition)
    after: set[int] = set()
    if controls and (protocol == "newline" or protocol == "segment" and segmenter != "document"):
        after = newline_token_ids(tok)
    if controls and protocol == "segment" and segmenter == "sentence":
        after |= sentence_end_token_ids(tok)
    return {"banned": [sp["pad"], sp["mask"], *conditioning.all_control_ids(attributes)], "control_ids": controls,
            "newline_ids": after}


def sample_texts(model, tok, sp: dict[str, int], n: int, max_new_tokens: int, *, attributes: tuple[Attribute, ...],
                 condition: str, temperature: float, top_p: float, seed: int, max_positions: int | None,
                 prompt_ids: list[int] = (), rank: int = 0, world: int = 1, lockstep: bool = False,
                 protocol: str = "newline", segmenter: str = "line") -> list[str]:
    """This rank's decoded samples (all n with one rank; see `sample`) under `control_args`; control tokens and
    EOS are stripped from the text."""
    seqs = sample(model, n, max_new_tokens, bos_id=sp["eos"], eos_id=sp["eos"],
                  **control_args(tok, sp, attributes, condition, protocol, segmenter),
                  temperature=temperature, top_p=top_p, seed=seed, max_positions=max_positions, prompt_ids=prompt_ids,
                  rank=rank, world=world, lockstep=lockstep)
    strip = {*conditioning.all_control_ids(attributes), sp["eos"]}
    return [tok.decode([t for t in s if t not in strip]) for s in seqs]
