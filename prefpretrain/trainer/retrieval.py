"""Offline retrieval evaluation of a run's text embeddings (what the sentence-similarity task trains,
prefpretrain.auxiliary): pairs of texts that belong together, each text embedded alone, and how often a
query's true partner ranks first among k candidates.

Pairs:
- `val`: adjacent segments of the run's validation split (segment j -> segment j + 1 of one document; the
  shard set's own tokens), both of at least MIN_TOKENS tokens;
- a Python file or a directory of them (searched recursively): a function's docstring -> its body without
  the docstring (functions with a docstring of at least MIN_DOC_WORDS words and a body of at least
  MIN_BODY_LINES lines; `ast`, nothing is run or unpickled; files that do not parse are counted and skipped).
Pairs whose query or candidate repeats an earlier one are dropped (a duplicate would be a second true answer);
at most `limit` pairs, a seeded sample of them.

Embedding: the text's tokens (the run's tokenizer; cut to the model's positions) in one row, the last hidden
state averaged over them (auxiliary.pool's mean, one segment per row), L2-normalised. Candidates of query i:
its partner and k - 1 partners of other pairs (seeded); ties are broken at random in expectation (a constant
embedding scores the chance level exactly): accuracy@1 = [none above] / (1 + tied), reciprocal rank = its mean
over the tied places.
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prefpretrain.errors import InputError

MIN_DOC_WORDS = 5
MIN_BODY_LINES = 3
MIN_TOKENS = 4
KS = (2, 10)
BATCH = 32
VAL = "val"


def docstring_pairs(source: str) -> list[tuple[str, str]]:
    """(docstring, body) of every function in `source` with a docstring of >= MIN_DOC_WORDS words and a body
    of >= MIN_BODY_LINES non-blank lines after it (dedented source lines), in the order of the source."""
    tree = ast.parse(source)
    lines = re.split(r"\r\n|\r|\n", source)  # the lines ast numbers (str.splitlines also breaks at a form feed)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if doc is None or len(doc.split()) < MIN_DOC_WORDS or len(node.body) < 2:
            continue
        body = textwrap.dedent("\n".join(lines[node.body[1].lineno - 1: node.end_lineno]))
        if sum(1 for x in body.splitlines() if x.strip()) >= MIN_BODY_LINES:
            out.append((node.lineno, doc, body))
    return [(doc, body) for _, doc, body in sorted(out, key=lambda x: x[0])]


def python_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(p.rglob("*.py"))
    raise InputError(f"--retrieval: {path!r} is neither {VAL!r} nor a Python file or directory")


def source_pairs(path: str) -> tuple[list[tuple[str, str]], int]:
    """The docstring / body pairs of the Python files at `path`, and how many files did not parse."""
    pairs, bad = [], 0
    for f in python_files(path):
        try:
            pairs += docstring_pairs(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
            bad += 1
    return pairs, bad


def segment_pairs(ss) -> list[tuple[np.ndarray, np.ndarray]]:
    """(segment j, segment j + 1) token ids of each document of shard set `ss`, both of >= MIN_TOKENS tokens."""
    out = []
    for i in range(len(ss)):
        d = ss.read(i)
        bounds = list(d["seg_start"]) + [len(d["tokens"])]
        segs = [d["tokens"][a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        out += [(a, b) for a, b in zip(segs[:-1], segs[1:], strict=True) if min(len(a), len(b)) >= MIN_TOKENS]
    return out


def unique_pairs(pairs: list, limit: int, seed: int) -> list:
    """`pairs` without those whose query or candidate repeats an earlier one; a seeded sample of `limit`."""
    seen_q, seen_c, out = set(), set(), []
    for q, c in pairs:
        kq, kc = _key(q), _key(c)
        if kq not in seen_q and kc not in seen_c:
            seen_q.add(kq)
            seen_c.add(kc)
            out.append((q, c))
    if limit and len(out) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), limit, replace=False))
        out = [out[i] for i in keep]
    return out


def _key(x):
    return x if isinstance(x, str) else tuple(int(t) for t in x)


@torch.no_grad()
def embed(model, seqs: list, pad_id: int, max_positions: int, batch: int = BATCH) -> torch.Tensor:
    """(n, H) fp32, L2-normalised on the host: each token sequence alone, the mean last hidden state over its
    first `max_positions` tokens; batched by length on the model's device."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seqs = [np.asarray(s, dtype=np.int64)[:max_positions] for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs), model.config.hidden_size, dtype=torch.float32)
    for b in range(0, len(seqs), batch):
        idx = order[b: b + batch]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.from_numpy(seqs[i])
            mask[r, : len(seqs[i])] = 1
        hidden = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True).hidden_states[-1]
        m = mask.to(dev, torch.float32)[..., None]
        out[idx] = ((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu()
    model.train(was_training)
    return F.normalize(out, dim=-1)


def retrieval_metrics(queries: torch.Tensor, candidates: torch.Tensor, ks=KS, seed: int = 0) -> dict:
    """Per k: accuracy@1 and mean reciprocal rank of candidate i for query i among it and k - 1 other candidates
    (drawn per query with a generator seeded by `seed`; cosine similarity of normalised rows), and chance 1/k.
    A k above the number of pairs is left out."""
    q, c = queries.double().numpy(), candidates.double().numpy()
    n = len(q)
    true_sim = (q * c).sum(1)  # (no n x n matrix: each query meets its k candidates only)
    out = {}
    for k in ks:
        if k > n:
            continue
        rng = np.random.default_rng([seed, k])
        acc = rr = 0.0
        for i in range(n):
            others = rng.choice(n - 1, k - 1, replace=False)
            others += others >= i
            true, o = true_sim[i], c[others] @ q[i]
            above, tied = int((o > true).sum()), int((o == true).sum())
            acc += (above == 0) / (1 + tied)
            rr += float(np.mean(1.0 / (1 + above + np.arange(tied + 1))))
        out[f"k{k}"] = {"accuracy": acc / n, "mrr": rr / n, "chance": 1.0 / k}
    return out


def parse_sources(text: str | None) -> list[str]:
    """`--retrieval`'s comma-separated sources, checked (one line for a bad one) before anything is loaded."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    for x in items:
        if x != VAL:
            got = len(source_pairs(x)[0])  # (the files parsed twice: a bad source fails before the model loads)
            if got < 2:
                raise InputError(f"--retrieval: {x!r} gives {got} docstring -> body pair(s); at least 2 are needed")
    return items


def run_retrieval(model, sources: list[str], ss, tokenizer, max_positions: int, limit: int = 1000,
                  seed: int = 0) -> dict:
    """{source: {pairs, what, k2: {...}, k10: {...}}} for each source (`val` or Python files), `ss` the run's
    validation shard set and `tokenizer` its tokenizer."""
    pad = ss.manifest["tokenizer"]["special_ids"]["pad"]
    res = {}
    for src in sources:
        extra = {}
        if src == VAL:
            pairs, what = segment_pairs(ss), "adjacent segments of the validation split"
        else:
            texts, bad = source_pairs(src)
            what, extra = "docstring -> function body", {"files_skipped": bad}
            pairs = [(tokenizer.encode(q).ids, tokenizer.encode(c).ids) for q, c in texts]
        pairs = unique_pairs([(q, c) for q, c in pairs if len(q) and len(c)], limit, seed)
        if len(pairs) < 2:
            raise InputError(f"--retrieval: {src!r} gives {len(pairs)} pair(s) ({what}); at least 2 are needed")
        q = embed(model, [p[0] for p in pairs], pad, max_positions)
        c = embed(model, [p[1] for p in pairs], pad, max_positions)
        res[src] = {"what": what, "pairs": len(pairs), **extra, **retrieval_metrics(q, c, seed=seed)}
    return res
