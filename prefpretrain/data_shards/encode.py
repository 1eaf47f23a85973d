"""Worker side of sharding: read one file, segment, score, tokenize every document.

Runs in a process pool (scoring is the slow step); everything here is a pure function of the file
and the options, which is what makes the shard bytes independent of the number of workers.
"""
from __future__ import annotations

import os

import numpy as np

from prefpretrain.data_shards import sources
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.scorers import get_scorer, runs_a_model
from prefpretrain.data_shards.segment import get_segmenter, line_spans

MAX_LINE_CHARS = 20_000  # a longer line is minified code or data, not text (reason: huge_line)

_W: dict = {}


def init_worker(tok_json: str, scorer: str, scorer_params: dict, segmenter: str, text_field: str,
                score_field: str | None) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if runs_a_model(scorer):  # one scoring process per core
        import torch

        torch.set_num_threads(1)
    _W.update(tok=Tokenizer.from_str(tok_json), scorer=get_scorer(scorer, scorer_params),
              seg=get_segmenter(segmenter), text_field=text_field, score_field=score_field)
    _W["eos"] = _W["tok"].token_to_id(toklib.EOS)


def score_segments(scorer, doc: sources.Document, spans: list[tuple[int, int]],
                   given: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the scorer's score of every span, float32, checked: one finite value each; the spans' lengths).
    `given`: the scores already computed (by a batch over many documents), checked the same way."""
    seg_scores = np.asarray(scorer.score(doc, spans) if given is None else given, dtype=np.float32)
    if len(seg_scores) != len(spans) or not np.isfinite(seg_scores).all():
        raise ValueError(f"scorer returned {len(seg_scores)} scores (finite: {np.isfinite(seg_scores).all()}) "
                         f"for {len(spans)} segments")
    return seg_scores, np.asarray([b - a for a, b in spans], dtype=np.float64)


def mean_per_char(seg_scores: np.ndarray, lens: np.ndarray) -> float:
    """A document's score: its segments' scores weighted by their characters."""
    return float((seg_scores * lens).sum() / max(1.0, lens.sum()))


def encode_document(doc: sources.Document, tok, scorer, segmenter, eos: int, spans: list,
                    given: list[float] | None = None) -> dict | None:
    """A document's tokens, per-token and per-segment scores (`spans`: its segments, by `segmenter`; `given`:
    their scores when already computed, by a batch over many documents)."""
    if not spans:
        return None
    seg_scores, lens = score_segments(scorer, doc, spans, given)
    if segmenter is line_spans:
        # the pre-tokenizer splits after every newline, so encoding line by line gives exactly the
        # tokens of the whole text, and each line's tokens are its segment (no offsets to map)
        encs = tok.encode_batch_fast([doc.text[a:b] for a, b in spans], add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(counts.sum()))
        ids = np.append(ids, eos)
        seg_of_tok = np.append(np.repeat(np.arange(len(spans)), counts), len(spans) - 1)
    else:
        enc = tok.encode(doc.text, add_special_tokens=False)
        ids = np.asarray(enc.ids + [eos], dtype=np.int64)
        starts = np.asarray([a for a, _ in spans], dtype=np.int64)
        tok_starts = np.asarray([o[0] for o in enc.offsets] + [len(doc.text)], dtype=np.int64)
        seg_of_tok = np.clip(np.searchsorted(starts, tok_starts, side="right") - 1, 0, len(spans) - 1)
    first = np.flatnonzero(np.r_[True, seg_of_tok[1:] != seg_of_tok[:-1]])  # first token of each segment
    return {
        "tokens": ids,
        "scores": seg_scores[seg_of_tok].astype(np.float16),
        "segments": np.stack([first.astype(np.int32), seg_scores[seg_of_tok[first]].view(np.int32)], axis=1),
        "meta": {"source": doc.source, "doc_id": doc.doc_id, "chars": len(doc.text)},
        "mean_score": mean_per_char(seg_scores, lens),
        "seg_scores": seg_scores,
        "seg_lens": lens,
    }


def process_file(item: tuple):
    """(name, encoded documents, skipped counts, problem lines) for one work item (path, name, piece): a file, or
    a piece of one (a run of a Parquet file's row groups, a byte range of a JSONL file)."""
    path, name, piece = item if len(item) == 3 else (*item, None)
    res = sources.read_file(path, name, _W["text_field"], _W["score_field"], piece)
    out, docs = [], []
    for doc in res.docs:
        longest = max((len(ln) for ln in doc.text.split("\n")), default=0)
        if longest > MAX_LINE_CHARS:
            res.skipped["huge_line"] += 1
            res.problems.append(f"{doc.doc_id}: a line of {longest} chars > {MAX_LINE_CHARS}")
            continue
        try:
            docs.append((doc, _W["seg"](doc.text)))
        except Exception as e:  # noqa: BLE001 - one document the segmenter fails on is skipped alone
            res.skipped["scorer_error"] += 1
            res.problems.append(f"{doc.doc_id}: segmenter failed ({type(e).__name__}: {e})")
    for (doc, spans), given in zip(docs, batch_scores(_W["scorer"], docs), strict=True):
        try:
            enc = encode_document(doc, _W["tok"], _W["scorer"], _W["seg"], _W["eos"], spans, given)
        except Exception as e:  # noqa: BLE001 - one document's scorer failure must not stop the run
            res.skipped["scorer_error"] += 1
            res.problems.append(f"{doc.doc_id}: scorer failed ({type(e).__name__}: {e})")
            continue
        if enc is None:
            res.skipped["empty"] += 1
        else:
            out.append(enc)
    return name, out, res.skipped, res.problems


def batch_scores(scorer, docs: list[tuple[sources.Document, list]], block: int = 1024) -> list:
    """The scores of many documents' segments from the scorer's `score_many` where it has one (a classifier fills
    its batches across documents, by length, instead of one short document per batch), `block` documents per
    call; None for a document left to be scored alone: the scorer has no `score_many`, or a call failed (each of
    its documents is then scored alone, so a document the scorer fails on is skipped alone)."""
    many = getattr(scorer, "score_many", None)
    out: list = [None] * len(docs)
    if many is None:
        return out
    for i in range(0, len(docs), block):
        part = [(d, s) for d, s in docs[i: i + block] if s]
        try:
            got = list(many(part))
        except Exception:  # noqa: BLE001 - scored one by one below, where the failing document is named
            continue
        if len(got) != len(part):  # (scored alone, so the document with the wrong count is named)
            continue
        got = iter(got)
        for j in range(i, min(i + block, len(docs))):
            out[j] = next(got) if docs[j][1] else None
    return out
