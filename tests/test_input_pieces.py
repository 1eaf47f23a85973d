"""Large JSONL files are split into byte ranges (like Parquet files into runs of row groups): every line is read
once whichever the cuts, and a split file gives the records the whole file gives."""
from __future__ import annotations

import io
import json
import random

import pytest

from prefpretrain.data_shards import plan
from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.formats import FileResult, read_jsonl, read_jsonl_range
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.sources import InputFile, work_items


def _jsonl(n: int, seed: int = 0, final_newline: bool = False) -> bytes:
    """Records of random lengths with malformed, non-UTF-8 and blank lines among them."""
    rng, lines = random.Random(seed), []
    for i in range(n):
        r = rng.random()
        if r < 0.05:
            lines.append(b"{not json\n")
        elif r < 0.08:
            lines.append(b'{"text": "bad \xff byte"}\n')
        elif r < 0.1:
            lines.append(b"\n")
        else:
            lines.append(json.dumps({"text": f"def f{i}(x):\n    return x\n" * rng.randint(1, 12)}).encode() + b"\n")
    data = b"".join(lines)
    return data if final_newline else data[:-1]


@pytest.mark.parametrize("final_newline", [False, True])
def test_byte_ranges_read_every_line_once_whatever_the_cuts(final_newline):
    data = _jsonl(400, final_newline=final_newline)
    whole = FileResult()
    read_jsonl(data, "n.jsonl", "text", None, whole)
    texts = [d.text for d in whole.docs]
    for k in (1, 2, 3, 7, 50, 399, len(data) // 3):  # down to ranges shorter than a line
        cuts = [round(j * len(data) / k) for j in range(k + 1)]
        res = FileResult()
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            read_jsonl_range(io.BytesIO(data), "n.jsonl", a, b, "text", None, res)
        assert [d.text for d in res.docs] == texts, k
        assert res.skipped == whole.skipped and min(res.skipped.values()) > 0  # malformed, not UTF-8
        offsets = [int(d.doc_id.rsplit("@", 1)[1]) for d in res.docs]
        assert all(data[o - 1:o] == b"\n" for o in offsets if o) and offsets == sorted(set(offsets))


def test_large_jsonl_files_are_planned_as_byte_ranges_and_compressed_ones_whole():
    files = [InputFile("/a.jsonl", "a.jsonl", 1000, "1"), InputFile("/b.jsonl.zst", "b.jsonl.zst", 1000, "1"),
             InputFile("/c.jsonl", "c.jsonl", 90, "1")]
    items = work_items(files, 300)
    assert [it[3] for it in items if it[1] == "a.jsonl"] == [["bytes", 0, 250], ["bytes", 250, 500],
                                                             ["bytes", 500, 750], ["bytes", 750, 1000]]
    assert [it[3] for it in items if it[1] != "a.jsonl"] == [None, None]


@pytest.mark.cli
def test_a_split_jsonl_file_gives_the_whole_files_records_and_tasks_agree(tmp_path):
    (tmp_path / "big.jsonl").write_bytes(_jsonl(1200, seed=1))
    kw = dict(inputs=[str(tmp_path / "big.jsonl")], workers=1, vocab_size=400, progress=False, val_fraction=0.1)
    split = build_shards(ShardOptions(output=str(tmp_path / "split"), tasks=2, shard_size_mb=0.08, **kw))
    items = json.loads((tmp_path / "split" / plan.PLAN).read_text())["files"]
    assert len(items) >= 4 and all(it[3][0] == "bytes" for it in items) and split["files"] == 1
    whole = build_shards(ShardOptions(output=str(tmp_path / "whole"), shard_size_mb=64, **kw))
    assert split["skipped"] == whole["skipped"] and set(whole["skipped"]) == {"malformed_jsonl", "invalid_utf8"}

    def texts(d: str) -> list[str]:
        sets = [ShardSet(tmp_path / d, sp) for sp in ("train", "val")]
        return sorted(ss.read(i)["meta"]["doc_id"].split("#")[0] + str(ss.read(i)["tokens"].tolist())
                      for ss in sets for i in range(len(ss)))

    assert texts("split") == texts("whole")
