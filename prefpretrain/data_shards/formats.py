"""Record formats: JSONL lines, Parquet rows, Arrow tables (`datasets.save_to_disk`'s `data-*.arrow` files).

Every record becomes one document with a stable id (`NAME#LINE` for JSONL, 1-based; `NAME#ROW` for tables,
0-based), or is counted as skipped with its reason and place, like every other bad input.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

MAX_DOC_CHARS = 2_000_000  # a larger document is skipped (reason: too_large)
TABLE_SUFFIXES = (".parquet", ".arrow")  # read by read_table (a text column by name)


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


def add_record(res: FileResult, name: str, where: str, rec, text_field: str, score_field: str | None) -> None:
    """One record (a mapping) -> a document in `res`, or one skipped count with its reason."""
    body = rec.get(text_field) if isinstance(rec, dict) else None
    if not isinstance(body, str) or not body.strip():
        res.skipped["missing_text"] += 1
        res.problems.append(f"{name}:{where}: no string field {text_field!r}")
        return
    if len(body) > MAX_DOC_CHARS:
        res.skipped["too_large"] += 1
        res.problems.append(f"{name}:{where}: {len(body)} chars > {MAX_DOC_CHARS}")
        return
    doc = Document(source=name, doc_id=f"{name}#{where}", text=body)
    if score_field is not None:
        val = rec.get(score_field)
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            doc.score = float(val)
        elif isinstance(val, list) and all(isinstance(v, (int, float)) for v in val):
            doc.segment_scores = [float(v) for v in val]
        else:
            res.skipped["missing_score"] += 1
            res.problems.append(f"{name}:{where}: no numeric field {score_field!r}")
            return
    res.docs.append(doc)


def _jsonl_line(line: str, name: str, where: str, text_field: str, score_field: str | None,
                res: FileResult) -> None:
    if not line.strip():
        return
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        res.skipped["malformed_jsonl"] += 1
        res.problems.append(f"{name}:{where}: malformed JSON")
        return
    add_record(res, name, where, rec, text_field, score_field)


def read_jsonl(data: bytes, name: str, text_field: str, score_field: str | None, res: FileResult,
               first_byte: int | None = None) -> None:
    """Every record of JSONL `data`; a line that is not UTF-8 or not JSON is skipped alone. A line's place is its
    number (1-based) or, for the lines of a byte range starting at `first_byte`, its byte offset (`@OFFSET`)."""
    at = first_byte
    for lineno, line in enumerate(io.BytesIO(data), 1):
        if at is None:
            where = str(lineno)
        else:
            where, at = f"@{at}", at + len(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            res.skipped["invalid_utf8"] += 1
            res.problems.append(f"{name}:{where}: invalid UTF-8 at byte {e.start} of the line")
            continue
        _jsonl_line(text, name, where, text_field, score_field, res)


def read_jsonl_range(f, name: str, start: int, end: int, text_field: str, score_field: str | None,
                     res: FileResult) -> None:
    """The records of the lines of a JSONL file (`f` open, binary, seekable) that start in bytes [start, end):
    the ranges of a split file read every line once. A line's place is its byte offset (`@OFFSET`: its line
    number would need the whole file before it)."""
    lo = max(0, start - 1)
    f.seek(lo)
    data = f.read(end - lo)
    if start > 0:  # the line running into the range started in an earlier one
        cut = data.find(b"\n")
        if cut < 0:
            return
        data, lo = data[cut + 1:], lo + cut + 1
    if data and not data.endswith(b"\n"):  # the last line started here: read it to its end
        data += f.readline()
    read_jsonl(data, name, text_field, score_field, res, first_byte=lo)


def _open_table(f, name: str):
    """A pyarrow Table from a Parquet file or an Arrow IPC stream/file (what save_to_disk writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if name.endswith(".parquet"):
        return pq.ParquetFile(f)
    data = f.read()
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.py_buffer(data)).read_all()


def row_group_pieces(f, target_bytes: float) -> list[tuple[int, int, int, int]]:
    """A Parquet file as consecutive runs of row groups of about `target_bytes` (compressed) each:
    [(first group, end group, its first row, bytes)]; one piece when the file has one row group."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(f).metadata
    pieces, lo, row, acc, first_row = [], 0, 0, 0, 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        acc += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        row += rg.num_rows
        if acc >= target_bytes or g == md.num_row_groups - 1:
            pieces.append((lo, g + 1, first_row, acc))
            lo, acc, first_row = g + 1, 0, row
    return pieces


def read_table(f, name: str, text_field: str, score_field: str | None, res: FileResult,
               row_groups: tuple[int, int, int] | None = None) -> None:
    """Every row of a Parquet or Arrow file (`f` an open binary file); only the columns needed are read.
    `row_groups` (Parquet): (first group, end group, the first row's number): that run of row groups only, with
    the row numbers (document ids) the whole file would give them."""
    t = _open_table(f, name)
    schema = t.schema_arrow if hasattr(t, "schema_arrow") else t.schema
    missing = [c for c in (text_field, score_field) if c is not None and c not in schema.names]
    if missing:
        res.skipped["missing_column"] += 1
        res.problems.append(f"{name}: no column {missing[0]!r} (columns: {', '.join(schema.names[:12])})")
        return
    cols = [c for c in (text_field, score_field) if c is not None]
    row = 0
    if row_groups is not None:
        groups, row = list(range(row_groups[0], row_groups[1])), row_groups[2]
        batches = t.iter_batches(columns=cols, batch_size=4096, row_groups=groups)
    else:
        batches = (t.iter_batches(columns=cols, batch_size=4096) if hasattr(t, "iter_batches")
                   else t.select(cols).to_batches(max_chunksize=4096))
    for b in batches:
        for rec in b.to_pylist():
            add_record(res, name, str(row), rec, text_field, score_field)
            row += 1
