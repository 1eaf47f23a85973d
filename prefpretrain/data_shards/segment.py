"""Documents -> segments, the units a scorer scores and a control token precedes.

A segment is a character span [start, end). Spans tile the document. Boundaries are placed so that
a byte-level BPE token never starts inside one segment and ends in the next in the usual cases:
lines end with their newline (the tokenizer also splits after every newline), and a sentence
owns the whitespace before it (" The" is one token).
"""
from __future__ import annotations


def line_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    while start < len(text):
        nl = text.find("\n", start)
        end = len(text) if nl < 0 else nl + 1
        spans.append((start, end))
        start = end
    return spans


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences found by pysbd (rule-based, offline). Whitespace between two sentences goes to the
    second one (" The" is one token), except that a sentence keeps the newlines that end it."""
    import pysbd

    seg = _PYSBD.get("en")
    if seg is None:
        seg = _PYSBD["en"] = pysbd.Segmenter(language="en", clean=False, char_span=True)
    cuts = {0}
    for span in seg.segment(text):
        core = span.start + len(span.sent.rstrip())
        gap = text[core: span.end]
        cuts.add(core + gap.rfind("\n") + 1 if "\n" in gap else core)
    cuts = sorted(c for c in cuts if 0 <= c < len(text))
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [len(text)], strict=True) if b > a]


_PYSBD: dict = {}


def document_spans(text: str) -> list[tuple[int, int]]:
    return [(0, len(text))] if text else []


SEGMENTERS = {"line": line_spans, "sentence": sentence_spans, "document": document_spans}


def get_segmenter(name: str):
    try:
        return SEGMENTERS[name]
    except KeyError:
        raise ValueError(f"unknown segmenter {name!r} (known: {', '.join(SEGMENTERS)})") from None
