"""Score columns: more scores per segment than the one `prefpretrain shard` wrote, without touching the tokens.

A shard set's tars hold the tokens and the score of its scorer (the *stored* column, named after that scorer).
`prefpretrain rescore SHARDS --scorer NAME [--name COLUMN]` adds (or replaces) a column beside them: for every
tar part `P.tar` one file `P.tar.score-COLUMN.TAG.npy` (TAG: one per rescore, so a replaced column's files stay
whole until the manifest names the new ones), float32, the mean score of each of its documents (weighted
by segment characters, as the shard step computes it) followed by the score of every segment of every document
in document order. The segments are the shard step's (their first tokens are in the tar); each document's text
is its tokens decoded, so a scorer sees what it would have seen at shard time (byte-level BPE decodes exactly).
The manifest's `columns` entry names each column's scorer and the checksum of each of its files; the reader
verifies them like the index files. A column named like the stored one replaces it for every reader.

Changing a threshold needs no rescore: thresholds are applied when samples are packed. This module names
columns (the reader's side); rescore.py writes them.
"""
from __future__ import annotations

SUFFIX = ".score-{}.{}.npy"
NOT_RESCORABLE = {"field": "its scores came with the input records, which the shards do not keep"}


def column_file(shard_name: str, column: str, tag: str) -> str:
    return shard_name + SUFFIX.format(column, tag)


def default_name(scorer_name: str) -> str:
    """A column name from a scorer's (`pkg.mod:fn` -> `pkg_mod_fn`)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in scorer_name)


def check_name(column: str) -> None:
    if not column or not all(c.isalnum() or c in "_-" for c in column):
        raise ValueError(f"--name: {column!r}; a column name is letters, digits, '_' and '-'")


def stored_column(manifest: dict) -> str:
    """The column the tars themselves hold: named after the scorer of `prefpretrain shard`."""
    return manifest["scorer"]["name"]


def columns_of(manifest: dict) -> list[str]:
    """Every column a run may select: the stored one and those `rescore` added."""
    return sorted({stored_column(manifest), *manifest.get("columns", {})})


def _entry(manifest: dict, column: str | None) -> dict | None:
    """The manifest entry of a column rescore wrote (None: the column the tars hold, nothing replacing it)."""
    return manifest.get("columns", {}).get(column or stored_column(manifest))


def scorer_of(manifest: dict, column: str | None) -> dict:
    """{name, version, params} of the scorer behind a column (None: the stored one, or the column replacing it)."""
    e = _entry(manifest, column)
    return e["scorer"] if e else manifest["scorer"]


def stats_of(manifest: dict, column: str | None, split: str) -> dict:
    """The score statistics of a split in a column (None: the stored one, or the column replacing it)."""
    e = _entry(manifest, column)
    return (e or manifest)["splits"][split]["score_stats"]
