"""Preference scorers: a segment's score is a float, LOWER IS BETTER (PHF convention).

A scorer scores a whole document at once (pycodestyle needs the file's context) and returns one
score per segment span. `name`, `version` and `params` go into the shard manifest.
"""
from __future__ import annotations

import importlib
from typing import Protocol

from prefpretrain.data_shards.sources import Document

Span = tuple[int, int]


class Scorer(Protocol):
    name: str
    version: str
    params: dict

    def score(self, doc: Document, spans: list[Span]) -> list[float]: ...


class NoneScorer:
    """Every segment scores 0 (plain pretraining data)."""

    name, version, params = "none", "1", {}

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        return [0.0] * len(spans)


class FieldScorer:
    """Scores supplied with the data: a JSONL number per document or a list per segment."""

    name, version = "field", "1"

    def __init__(self, field: str = "score"):
        self.params = {"field": field}

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        if doc.segment_scores is not None:
            if len(doc.segment_scores) != len(spans):
                raise ValueError(f"{doc.doc_id}: {len(doc.segment_scores)} scores for {len(spans)} segments")
            return list(doc.segment_scores)
        return [doc.score or 0.0] * len(spans)


class Pep8Scorer:
    """pycodestyle violations per character of each line (line segments).

    Codes pycodestyle ignores by default stay ignored. A violation is charged to the line
    pycodestyle reports it on.
    """

    name = "pep8"

    def __init__(self, max_line_length: int = 79):
        import pycodestyle

        self._pcs = pycodestyle
        self.version = pycodestyle.__version__
        self.params = {"max_line_length": max_line_length}
        self._guide = pycodestyle.StyleGuide(quiet=True, max_line_length=max_line_length)

    def violations(self, text: str) -> list[tuple[int, str]]:
        """(1-based line, code) for every violation in a source text."""
        pcs, guide = self._pcs, self._guide
        found: list[tuple[int, str]] = []

        class _Collect(pcs.BaseReport):
            def error(self, line_number, offset, msg, check):
                code = msg[:4]
                if not guide.ignore_code(code):
                    found.append((line_number, code))
                return code

        lines = text.splitlines(True)
        pcs.Checker(lines=lines, options=guide.options, report=_Collect(guide.options)).check_all()
        return found

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        counts = [0] * len(spans)
        # line segments: the i-th span is line i+1
        for line, _code in self.violations(doc.text):
            if 1 <= line <= len(spans):
                counts[line - 1] += 1
            elif spans:
                counts[-1] += 1
        return [c / max(1, b - a) for c, (a, b) in zip(counts, spans, strict=False)]


class PiiScorer:
    """scrubadub PII items per character. Emails must contain a literal '@' (scrubadub also
    flags prose like 'x at y')."""

    name = "pii"

    def __init__(self):
        try:
            import scrubadub
        except ImportError:
            raise ValueError("scorer 'pii' needs scrubadub: pip install -e .[pii]") from None
        self.version = scrubadub.__version__
        self.params = {"detectors": "scrubadub default", "email_requires_at": True}
        self._scrubber = scrubadub.Scrubber()

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        out = []
        for a, b in spans:
            seg = doc.text[a:b]
            n = 0
            for f in self._scrubber.iter_filth(seg):
                if f.type == "email" and "@" not in f.text:
                    continue
                n += 1
            out.append(n / max(1, b - a))
        return out


class FunctionScorer:
    """A user scorer `module:function`, called as function(segment_text) -> float."""

    version = "user"

    def __init__(self, spec: str):
        mod, _, fn = spec.partition(":")
        try:
            self._fn = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"scorer {spec!r}: cannot import ({e})") from None
        self.name, self.params = spec, {}

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        return [float(self._fn(doc.text[a:b])) for a, b in spans]


def get_scorer(name: str) -> Scorer:
    if name == "none":
        return NoneScorer()
    if name == "pep8":
        return Pep8Scorer()
    if name == "pii":
        return PiiScorer()
    if name == "field":
        return FieldScorer()
    if ":" in name:
        return FunctionScorer(name)
    raise ValueError(f"unknown scorer {name!r} (known: pep8, pii, field, none, module:function)")


def default_segmenter(scorer: str) -> str:
    return "line" if scorer in ("pep8", "none") else "sentence"
