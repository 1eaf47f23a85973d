"""Inputs -> documents. Files, directories, globs, `@stdlib`; .py/.txt/.jsonl, optionally .gz/.zst.

Bad input never crashes a run and is never silent: every skipped file or record is counted by
reason (and, for JSONL, logged with file:line).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".py", ".txt", ".jsonl", ".md", ".rst"}
# Folders of the CPython stdlib that are not the code people write: tests, codec tables
# (`encodings/`, 81 % of the stdlib lines that break style-only rules) and data blobs.
STDLIB_EXCLUDE = {
    "test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "__pycache__",
}
MAX_DOC_CHARS = 2_000_000  # a larger document is skipped (reason: too_large)


@dataclass
class Document:
    source: str  # file path as given (relative to its input root where possible)
    doc_id: str  # stable id: source, plus #line for JSONL records
    text: str
    score: float | None = None  # document score from a JSONL field, if any
    segment_scores: list[float] | None = None  # per-segment scores from a JSONL field, if any


@dataclass
class FileResult:
    docs: list[Document] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "file:line: reason" for the log


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_wanted(path: Path) -> bool:
    name = path.name
    for suf in (".gz", ".zst"):
        name = name.removesuffix(suf)
    return Path(name).suffix in TEXT_SUFFIXES


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """Resolve inputs into a sorted, de-duplicated list of (absolute path, display name)."""
    out: dict[str, str] = {}
    for spec in inputs:
        if spec == "@stdlib":
            root = stdlib_root()
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDE)
                for fn in filenames:
                    if fn.endswith(".py"):
                        p = Path(dirpath) / fn
                        out[str(p)] = "stdlib/" + str(p.relative_to(root))
            continue
        matches = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise FileNotFoundError(f"input {spec!r} matches nothing")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                for q in sorted(p.rglob("*")):
                    if q.is_file() and _is_wanted(q):
                        out[str(q.resolve())] = str(q)
            elif p.is_file():
                out[str(p.resolve())] = str(p)
            else:
                raise FileNotFoundError(f"input {m!r} does not exist")
    return sorted(out.items(), key=lambda kv: kv[1])


def _read_bytes(path: str) -> bytes:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    if path.endswith(".zst"):
        import zstandard  # optional dependency

        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read()
    with open(path, "rb") as f:
        return f.read()


def read_file(path: str, name: str, text_field: str = "text", score_field: str | None = None) -> FileResult:
    """Read one input file into documents, counting what had to be skipped and why."""
    res = FileResult()
    try:
        data = _read_bytes(path)
    except Exception as e:  # noqa: BLE001 - OSError, EOFError, zlib.error, zstandard.ZstdError, ...: all unreadable
        res.skipped["unreadable"] += 1
        why = str(e).splitlines()[0][:200] if str(e) else ""
        res.problems.append(f"{name}: unreadable ({type(e).__name__}: {why})")
        return res
    if not data.strip():
        res.skipped["empty"] += 1
        return res
    if b"\x00" in data[:8192]:
        res.skipped["binary"] += 1
        res.problems.append(f"{name}: binary content")
        return res
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        res.skipped["invalid_utf8"] += 1
        res.problems.append(f"{name}: invalid UTF-8 at byte {e.start}")
        return res
    base = name[:-3] if name.endswith(".gz") else name.removesuffix(".zst")
    if base.endswith(".jsonl"):
        _read_jsonl(text, name, text_field, score_field, res)
    elif score_field is not None:
        res.skipped["missing_score"] += 1
        res.problems.append(f"{name}: not JSONL, so no score field {score_field!r}")
    elif len(text) > MAX_DOC_CHARS:
        res.skipped["too_large"] += 1
        res.problems.append(f"{name}: {len(text)} chars > {MAX_DOC_CHARS}")
    else:
        res.docs.append(Document(source=name, doc_id=name, text=text))
    return res


def _read_jsonl(text: str, name: str, text_field: str, score_field: str | None, res: FileResult) -> None:
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            res.skipped["malformed_jsonl"] += 1
            res.problems.append(f"{name}:{lineno}: malformed JSON")
            continue
        body = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(body, str) or not body.strip():
            res.skipped["missing_text"] += 1
            res.problems.append(f"{name}:{lineno}: no string field {text_field!r}")
            continue
        if len(body) > MAX_DOC_CHARS:
            res.skipped["too_large"] += 1
            res.problems.append(f"{name}:{lineno}: {len(body)} chars > {MAX_DOC_CHARS}")
            continue
        doc = Document(source=name, doc_id=f"{name}#{lineno}", text=body)
        if score_field is not None:
            val = rec.get(score_field)
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                doc.score = float(val)
            elif isinstance(val, list) and all(isinstance(v, (int, float)) for v in val):
                doc.segment_scores = [float(v) for v in val]
            else:
                res.skipped["missing_score"] += 1
                res.problems.append(f"{name}:{lineno}: no numeric field {score_field!r}")
                continue
        res.docs.append(doc)
