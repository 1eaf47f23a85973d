"""Preference scorers: a segment's score is a float, LOWER IS BETTER (PHF convention).

A scorer scores a whole document at once (pycodestyle needs the file's context) and returns one
score per segment span. `name`, `version` and `params` go into the shard manifest.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import math
import re
from collections import Counter
from pathlib import Path
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
        if doc.score is None:
            raise ValueError(f"{doc.doc_id}: no score")
        return [doc.score] * len(spans)


# Codes a model chooses on the line itself: whitespace (E2xx incl. comments E26x), indentation width
# (E111-E117), statements per line (E70x), comparisons (E71x), bare except / lambda / names (E72x, E73x,
# E74x), line length (E501), trailing whitespace (W291, W293). Left out: codes pycodestyle reports on a
# line other than the cause (blank lines E30x, import position E402, W391 end of file), continuation
# lines (E12x, which depend on an earlier line), and syntax/IO errors (E9xx).
STYLE_CODES = frozenset(
    ["E111", "E112", "E113", "E114", "E115", "E116", "E117"]
    + [f"E2{n:02d}" for n in (1, 2, 3, 11, 21, 22, 23, 24, 25, 26, 27, 28, 31, 41, 42, 51, 52, 61, 62, 65, 66,
                              71, 72, 73, 74, 75)]
    + ["E501", "E701", "E702", "E703", "E704", "E711", "E712", "E713", "E714", "E721", "E722", "E731", "E741",
       "W291", "W293"])


# reported on the line after the blank line that caused them: E303 too many blank lines, E304 blank line
# after a decorator
BLAME_PREVIOUS = frozenset({"E303", "E304"})


def _crashed_check(e: BaseException, opts) -> str | None:
    """The name of the pycodestyle check whose call raised `e` (the innermost frame that is one)."""
    names = {c[0] for c in opts.logical_checks} | {c[0] for c in opts.physical_checks}
    tb, hit = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name in names:
            hit = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return hit


class Pep8Scorer:
    """pycodestyle violations per character of each line (line segments).

    `pep8` counts every code pycodestyle reports by default; `pep8_style` only STYLE_CODES. A violation
    is charged to the line that caused it: pycodestyle reports the blank-line codes in BLAME_PREVIOUS on the
    first line AFTER the offending blank line, so those move one line up (`attribute_context`); the codes
    for missing blank lines (E301/E302/E305/E306) stay on the definition, which is where the model chose
    not to write one.
    """

    def __init__(self, max_line_length: int = 79, style_only: bool = False, attribute_context: bool = True):
        import pycodestyle

        self._pcs = pycodestyle
        self.name = "pep8_style" if style_only else "pep8"
        self.version = pycodestyle.__version__
        self.codes = STYLE_CODES if style_only else None
        self.params = {"max_line_length": max_line_length, "attribute_context": attribute_context}
        self.attribute_context = attribute_context
        if style_only:
            self.params["codes"] = sorted(STYLE_CODES)
        self._guide = pycodestyle.StyleGuide(quiet=True, max_line_length=max_line_length,
                                             select=sorted(STYLE_CODES) if style_only else None)

    def violations(self, text: str) -> list[tuple[int, str]]:
        """(1-based line, code) for every violation in a source text."""
        pcs, guide, codes = self._pcs, self._guide, self.codes
        found: list[tuple[int, str]] = []

        class _Collect(pcs.BaseReport):
            def error(self, line_number, offset, msg, check):
                code = msg[:4]
                if (codes is None and not guide.ignore_code(code)) or (codes is not None and code in codes):
                    found.append((line_number, code))
                return code

        opts = guide.options
        for _ in range(4):
            try:
                pcs.Checker(lines=text.splitlines(True), options=opts, report=_Collect(opts)).check_all()
                return found
            except IndexError as e:
                # some of pycodestyle's checks index past the end on malformed token streams (model samples hit
                # continued_indentation and module_imports_on_top_of_file): score the text again without the
                # check that crashed
                name = _crashed_check(e, opts)
                if name is None:
                    raise
                found.clear()
                opts = copy.copy(opts)
                opts.logical_checks = [c for c in opts.logical_checks if c[0] != name]
                opts.physical_checks = [c for c in opts.physical_checks if c[0] != name]
        raise RuntimeError("pycodestyle crashed in more than three checks on one text")

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        counts = [0] * len(spans)
        for line, code in self.violations(doc.text):  # line segments: span i is line i + 1
            if self.attribute_context and code in BLAME_PREVIOUS and line > 1:
                line -= 1
            if 1 <= line <= len(spans):
                counts[line - 1] += 1
            elif spans:
                counts[-1] += 1
        return [c / max(1, b - a) for c, (a, b) in zip(counts, spans, strict=True)]


# scrubadub's email pattern also takes "word at word.word" (so "me at john.doe@example.com" becomes one
# bogus item and the real address is lost, and "the sky at noon.Then" is an email); ours needs a literal @.
EMAIL_AT = re.compile(r"\b[a-z0-9!#$%&'*+/=?^_`{|}~-](?:[.a-z0-9!#$%&'*+/=?^_`{|}~-]{0,62}[a-z0-9!#$%&'*+/=?^_`{|}~-])?"
                      r"@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+\b",
                      re.IGNORECASE)


class PiiScorer:
    """scrubadub PII items per character (its default detectors: credential, credit card, phone,
    twitter, url, SSN), with emails found by EMAIL_AT (a literal '@' required)."""

    name = "pii"

    def __init__(self):
        try:
            import scrubadub
            from scrubadub.detectors import RegexDetector
            from scrubadub.filth import EmailFilth
        except ImportError:
            raise ValueError("scorer 'pii' needs scrubadub: pip install -e .[pii]") from None

        class StrictEmailDetector(RegexDetector):
            name, filth_cls, regex = "email_at", EmailFilth, EMAIL_AT

        self.version = scrubadub.__version__
        self._scrubber = scrubadub.Scrubber()
        self._scrubber.remove_detector("email")
        self._scrubber.add_detector(StrictEmailDetector)
        self.params = {"detectors": sorted(self._scrubber._detectors), "email_requires_at": True}

    def items(self, text: str) -> list[tuple[str, str]]:
        """(type, text) of every PII item found."""
        return [(f.type, f.text) for f in self._scrubber.iter_filth(text)]

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        return [len(self.items(doc.text[a:b])) / max(1, b - a) for a, b in spans]


class ClassifierScorer:
    """A local HF sequence classifier: the probability of `label` for each segment (batched).

    Lower is better, so point `label` at the undesired class (e.g. "toxic"). Never downloads. `device`: "auto"
    (the task's first visible GPU when it has one, else the CPU), "cpu", "cuda" or "cuda:N". On a GPU, give a
    shard task one scoring process per GPU (`--workers 1`): each process holds its own copy of the model.
    Scores computed on a GPU may differ from the CPU's in the last bits; the device asked for is in the params.
    """

    name = "classifier"

    def __init__(self, model_dir: str, label: str | int = 1, batch_size: int = 32, max_length: int = 256,
                 device: str = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"scorer 'classifier': no HF model directory at {model_dir!r}")
        self._torch = torch  # threads: the process's (a sharding worker sets one, a training rank keeps its own)
        self._tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        self._device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                    "cpu" if device == "auto" else device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"scorer 'classifier': device {device!r}, but this process sees no GPU")
        self._model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False).eval().to(self._device)
        l2i = {str(k): v for k, v in self._model.config.label2id.items()}
        if isinstance(label, int) or str(label).isdigit():
            self._label = int(label)
        elif str(label) in l2i:
            self._label = int(l2i[str(label)])
        else:
            raise ValueError(f"scorer 'classifier': label {label!r} not in {sorted(l2i)}")
        self.version = "transformers"
        self.params = {"model_dir": str(model_dir), "label": label, "batch_size": batch_size, "max_length": max_length,
                       "device": device}  # as asked: the plan's machine may have no GPU where the tasks have one
        self._bs, self._max_len = batch_size, max_length

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        return self.score_many([(doc, spans)])[0]

    def score_many(self, items: list[tuple[Document, list[Span]]]) -> list[list[float]]:
        """Every document's segments in one stream of batches, in order of length (little padding, full batches
        for short documents); the scores back in each document's order."""
        texts = [doc.text[a:b] for doc, spans in items for a, b in spans]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs = [0.0] * len(texts)
        with self._torch.no_grad():
            for i in range(0, len(order), self._bs):
                idx = order[i: i + self._bs]
                enc = self._tok([texts[j] for j in idx], padding=True, truncation=True, max_length=self._max_len,
                                return_tensors="pt").to(self._device)
                for j, p in zip(idx, self._model(**enc).logits.float().softmax(-1)[:, self._label].tolist(),
                                strict=True):
                    probs[j] = p
        out, at = [], 0
        for _, spans in items:
            out.append(probs[at: at + len(spans)])
            at += len(spans)
        return out


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_']*")


class LexicalScorer:
    """Preference as common usage, measured against a reference corpus of preferred text.

    mode `rare_share`: share of a segment's words that are not among the reference's `top_k` most
    frequent words. mode `ngram_nll`: negative log-likelihood per character under an add-k smoothed
    word bigram model of the reference (interpolated with unigrams). Lower is better for both.
    """

    name = "lexical"

    def __init__(self, reference: str | list[str], mode: str = "rare_share", top_k: int = 5000,
                 add_k: float = 0.1, lam: float = 0.7):
        from prefpretrain.data_shards import sources

        refs = [reference] if isinstance(reference, str) else list(reference)
        files = sources.expand_inputs(refs)
        if not files:
            raise ValueError("scorer 'lexical': the reference corpus is empty")
        if mode not in ("rare_share", "ngram_nll"):
            raise ValueError(f"scorer 'lexical': mode must be rare_share or ngram_nll, got {mode!r}")
        uni: Counter = Counter()
        bi: Counter = Counter()
        for f in files:
            for d in sources.read_file(f.path, f.name).docs:
                words = [w.lower() for w in _WORD.findall(d.text)]
                uni.update(words)
                bi.update(zip(words, words[1:], strict=False))
        self._common = {w for w, _ in uni.most_common(top_k)}
        self._uni, self._bi, self._total = uni, bi, sum(uni.values())
        self._V = len(uni) + 1
        self._mode, self._k, self._lam = mode, add_k, lam
        digest = hashlib.sha256("\n".join(f"{f.path}:{f.size}" for f in files).encode()).hexdigest()[:12]
        self.version = "1"
        self.params = {"reference": refs, "reference_digest": digest, "mode": mode, "top_k": top_k,
                       "add_k": add_k, "lambda": lam, "reference_words": self._total}

    def _nll(self, words: list[str]) -> float:
        total, prev = 0.0, None
        for w in words:
            p_uni = (self._uni.get(w, 0) + self._k) / (self._total + self._k * self._V)
            p = p_uni
            if prev is not None and self._uni.get(prev, 0):
                p_bi = (self._bi.get((prev, w), 0) + self._k * p_uni * self._V) / (self._uni[prev] + self._k * self._V)
                p = self._lam * p_bi + (1 - self._lam) * p_uni
            total -= math.log(p)
            prev = w
        return total

    def score(self, doc: Document, spans: list[Span]) -> list[float]:
        out = []
        for a, b in spans:
            words = [w.lower() for w in _WORD.findall(doc.text[a:b])]
            if not words:
                out.append(0.0)
            elif self._mode == "rare_share":
                out.append(sum(w not in self._common for w in words) / len(words))
            else:
                out.append(self._nll(words) / max(1, b - a))
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


SCORERS = {
    "none": NoneScorer, "field": FieldScorer, "pep8": Pep8Scorer,
    "pep8_style": lambda **kw: Pep8Scorer(style_only=True, **kw), "pii": PiiScorer,
    "classifier": ClassifierScorer, "lexical": LexicalScorer,
}


# `learned:PATH`: a trained preference-label head (a run, a checkpoint or an `export --with-heads` directory) scores
# 1 - P(preferred); prefpretrain.trainer.learned_scorer, imported by name only when asked for
LEARNED, LEARNED_IMPL = "learned:", "prefpretrain.trainer.learned_scorer"


def get_scorer(name: str, params: dict | None = None) -> Scorer:
    params = params or {}
    if name in SCORERS:
        try:
            return SCORERS[name](**params)
        except TypeError as e:
            raise ValueError(f"scorer {name!r}: bad parameters {params} ({e})") from None
    if name.startswith(LEARNED) or name == "learned":
        return _learned(name, params)
    if ":" in name:
        return FunctionScorer(name)
    raise ValueError(f"unknown scorer {name!r} (known: {', '.join(SCORERS)}, learned:PATH, module:function)")


def _learned(name: str, params: dict) -> Scorer:
    """`learned:PATH` with its options, or `learned` with the params a manifest recorded (its `path`; the rest
    describes what was loaded). The trainer's model loading lives above this layer: looked up by name."""
    if name == "learned":
        if not params.get("path"):
            raise ValueError("scorer 'learned': name the head as learned:PATH")
        name = LEARNED + str(params["path"])
        params = {k: v for k, v in params.items() if k in ("device", "batch_size")}
    try:
        return importlib.import_module(LEARNED_IMPL).LearnedScorer(name[len(LEARNED):], **params)
    except TypeError as e:
        raise ValueError(f"scorer {name!r}: bad parameters {params} ({e})") from None


def runs_a_model(scorer: str) -> bool:
    """Whether the scorer named so runs a torch model (classifier, learned:PATH): a scoring process of many then
    takes one thread, as the processes share the cores."""
    return scorer == "classifier" or scorer.startswith(LEARNED)


def default_segmenter(scorer: str, made: Scorer | None = None) -> str:
    """The segmenter of shard's `segmenter: auto`: a learned scorer's the one its head learned on (`made`: the
    scorer object), line for code scorers, sentence for the others."""
    if getattr(made, "segmenter", None):
        return made.segmenter
    return "line" if scorer in ("pep8", "pep8_style", "none") else "sentence"
