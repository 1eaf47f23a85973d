"""Inputs -> documents. Files, directories, globs, `@stdlib`, fsspec URLs (`s3://…`); .py/.txt/.md/.rst/.jsonl,
optionally .gz/.zst; Parquet and Arrow tables, `datasets.save_to_disk` directories (formats.py).

Bad input never crashes a run and is never silent: every skipped file or record is counted by
reason (and, for JSONL, logged with file:line).
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

from prefpretrain.data_shards import formats, storage
from prefpretrain.data_shards.formats import (  # noqa: F401 - re-exported: the types of this module's results
    MAX_DOC_CHARS,
    TABLE_SUFFIXES,
    Document,
    FileResult,
)
from prefpretrain.errors import describe

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".py", ".txt", ".jsonl", ".md", ".rst"}
# Folders of the CPython stdlib that are not the code people write: tests, codec tables
# (`encodings/`, 81 % of the stdlib lines that break style-only rules) and data blobs.
STDLIB_EXCLUDE = {
    "test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "__pycache__",
}


class InputFile(NamedTuple):
    path: str  # absolute path or URL
    name: str  # display name and document-id prefix (the path as given, or the URL)
    size: int  # bytes
    version: str  # modification time (ns) or the object's ETag: part of the shard set's fingerprint


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_wanted(path: Path) -> bool:
    name = path.name
    for suf in (".gz", ".zst"):
        name = name.removesuffix(suf)
    return Path(name).suffix in TEXT_SUFFIXES or name.endswith(TABLE_SUFFIXES)


def _saved_dataset(d: Path) -> list[Path] | None:
    """The Arrow files of a `datasets.save_to_disk` directory, in its own order (None: not one)."""
    state = d / "state.json"
    if not (state.is_file() and (d / "dataset_info.json").is_file()):
        return None
    try:
        files = [d / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"input {str(d)!r}: state.json is not a datasets.save_to_disk state") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"input {str(d)!r}: save_to_disk data file {missing[0]} is missing")
    return files


def _local_files(spec: str) -> list[tuple[Path, str]]:
    """(path, display name) of the files one local input names."""
    found = []
    matches = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [spec]
    if not matches:
        raise FileNotFoundError(f"input {spec!r} matches nothing")
    for m in matches:
        p = Path(m)
        saved = _saved_dataset(p) if p.is_dir() else None
        if saved is not None:
            found += [(q, str(q)) for q in saved]
        elif p.is_dir():
            saved = {sd.parent: files for sd in sorted(p.rglob("state.json"))
                     if (files := _saved_dataset(sd.parent)) is not None}
            found += [(q, str(q)) for q in sorted(p.rglob("*"))
                      if q.is_file() and _is_wanted(q) and q.parent not in saved]
            found += [(q, str(q)) for files in saved.values() for q in files]
        elif p.is_file():
            found.append((p, str(p)))
        else:
            raise FileNotFoundError(f"input {m!r} does not exist")
    return found


def expand_inputs(inputs: list[str]) -> list[InputFile]:
    """Resolve inputs (paths, directories, globs, @stdlib, URLs) into a sorted, de-duplicated list of files."""
    out: dict[str, InputFile] = {}
    for spec in inputs:
        if spec == "@stdlib":
            root = stdlib_root()
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDE)
                for fn in filenames:
                    if fn.endswith(".py"):
                        p = Path(dirpath) / fn
                        out[str(p)] = _local(p, "stdlib/" + str(p.relative_to(root)))
        elif storage.is_url(spec):
            for url, (size, version) in storage.list_files(spec).items():
                if _is_wanted(Path(url.split("://", 1)[1])):
                    out[url] = InputFile(url, url, size, version)
        else:
            for p, name in _local_files(spec):
                out[str(p.resolve())] = _local(p.resolve(), name)
    return sorted(out.values(), key=lambda f: f.name)


def _local(p: Path, name: str) -> InputFile:
    st = p.stat()
    return InputFile(str(p), name, st.st_size, str(st.st_mtime_ns))


def _open(path: str):
    return storage.open_url(path) if storage.is_url(path) else open(path, "rb")  # noqa: SIM115 - callers close it


def _read_bytes(path: str) -> bytes:
    with _open(path) as raw:
        if path.endswith(".gz"):
            with gzip.open(raw, "rb") as f:
                return f.read()
        if path.endswith(".zst"):
            import zstandard  # optional dependency

            return zstandard.ZstdDecompressor().stream_reader(raw).read()
        return raw.read()


def work_items(files: list[InputFile], target_bytes: float) -> list[list]:
    """The plan's units of work: [path, name, bytes, piece or None] — a file, or, for a file larger than
    `target_bytes`, each piece of about that size (so one huge file is many tasks' work): a run of row groups of
    a Parquet file ([first group, end group, its first row]) or a byte range of an uncompressed JSONL file
    (["bytes", start, end]: the lines that start in it; found by arithmetic, no reading)."""
    items = []
    for f in files:
        pieces = None
        if f.name.endswith(".parquet") and f.size > target_bytes:
            try:
                with _open(f.path) as fh:
                    pieces = [[list(p[:3]), p[3]] for p in formats.row_group_pieces(fh, target_bytes)]
            except Exception:  # noqa: BLE001 - unreadable: the task reading it whole counts it
                pieces = None
        elif f.name.endswith(".jsonl") and f.size > target_bytes:
            n = math.ceil(f.size / target_bytes)
            cuts = [round(k * f.size / n) for k in range(n + 1)]
            pieces = [[["bytes", a, b], b - a] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        if pieces and len(pieces) > 1:
            total = sum(p[1] for p in pieces) or 1
            items += [[f.path, f.name, max(1, round(f.size * p[1] / total)), p[0]] for p in pieces]
        else:
            items.append([f.path, f.name, f.size, None])
    return items


def _unreadable(res: FileResult, name: str, e: Exception) -> FileResult:
    res.skipped["unreadable"] += 1
    res.problems.append(f"{name}: unreadable ({describe(e)})")
    return res


def read_file(path: str, name: str, text_field: str = "text", score_field: str | None = None,
              piece: list | None = None) -> FileResult:
    """Read one input file into documents, counting what had to be skipped and why. `piece`: one piece of it
    (work_items): a run of row groups of a Parquet file, or a byte range of a JSONL file."""
    res = FileResult()
    if name.endswith(formats.TABLE_SUFFIXES) or piece is not None:
        try:
            with _open(path) as f:
                if piece is not None and piece[0] == "bytes":
                    formats.read_jsonl_range(f, name, piece[1], piece[2], text_field, score_field, res)
                else:
                    formats.read_table(f, name, text_field, score_field, res, piece)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, ...: a damaged table is unreadable
            return _unreadable(res, name, e)
        return res
    try:
        data = _read_bytes(path)
    except Exception as e:  # noqa: BLE001 - OSError, EOFError, zlib.error, zstandard.ZstdError, ...: all unreadable
        return _unreadable(res, name, e)
    if not data.strip():
        res.skipped["empty"] += 1
        return res
    if b"\x00" in data[:8192]:
        res.skipped["binary"] += 1
        res.problems.append(f"{name}: binary content")
        return res
    if (name[:-3] if name.endswith(".gz") else name.removesuffix(".zst")).endswith(".jsonl"):
        formats.read_jsonl(data, name, text_field, score_field, res)  # (a line that is not UTF-8: skipped alone)
        return res
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        res.skipped["invalid_utf8"] += 1
        res.problems.append(f"{name}: invalid UTF-8 at byte {e.start}")
        return res
    if score_field is not None:
        res.skipped["missing_score"] += 1
        res.problems.append(f"{name}: not JSONL, so no score field {score_field!r}")
    elif len(text) > MAX_DOC_CHARS:
        res.skipped["too_large"] += 1
        res.problems.append(f"{name}: {len(text)} chars > {MAX_DOC_CHARS}")
    else:
        res.docs.append(Document(source=name, doc_id=name, text=text))
    return res
