"""Documents -> segments, the units a scorer scores and a control token precedes.

A segment is a character span [start, end). Spans tile the document. Boundaries are placed so that
a byte-level BPE token never starts inside one segment and ends in the next in the usual cases:
lines end with their newline (the tokenizer also splits after every newline), and a sentence
owns the whitespace before it (" The" is one token).
"""
from __future__ import annotations

import re

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*(?=\s+)")


def line_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    while start < len(text):
        nl = text.find("\n", start)
        end = len(text) if nl < 0 else nl + 1
        spans.append((start, end))
        start = end
    return spans


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """A light offline sentence splitter: ends at . ! ? (plus closing quotes) before whitespace,
    and at blank lines. Each sentence after the first begins with the whitespace before it."""
    cuts = {0}
    for m in _SENT_END.finditer(text):
        cuts.add(m.end())
    for m in re.finditer(r"\n\s*\n", text):
        cuts.add(m.start())
    cuts = sorted(c for c in cuts if c < len(text))
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [len(text)], strict=False) if b > a]


def document_spans(text: str) -> list[tuple[int, int]]:
    return [(0, len(text))] if text else []


SEGMENTERS = {"line": line_spans, "sentence": sentence_spans, "document": document_spans}


def get_segmenter(name: str):
    try:
        return SEGMENTERS[name]
    except KeyError:
        raise ValueError(f"unknown segmenter {name!r} (known: {', '.join(SEGMENTERS)})") from None
