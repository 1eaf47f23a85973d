"""data_shards: shards from real stdlib code, the reader, packing layouts, and the global order."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.order import FeistelPermutation, GlobalOrder, rank_positions
from prefpretrain.data_shards.packing import IGNORE, Layout, PackedSet, layout_lengths
from prefpretrain.data_shards.reader import ShardError, ShardSet, parse_tar_members
from prefpretrain.data_shards.scorers import Pep8Scorer
from prefpretrain.data_shards.segment import line_spans, sentence_spans
from prefpretrain.data_shards.sources import Document


def test_manifest_records_what_was_written(tiny_shards):
    m = json.loads((tiny_shards / "manifest.json").read_text())
    assert m["scorer"]["name"] == "pep8" and m["scorer"]["version"]
    assert m["tokenizer"]["hash"] == toklib.tokenizer_hash(tiny_shards / "tokenizer")
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["samples"] > 0 and s["tokens"] > 0
        for sh in s["shards"]:
            data = (tiny_shards / sh["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]
    stats = m["splits"]["train"]["score_stats"]
    assert 0 < stats["zero_fraction"] < 1 and stats["mean_per_char"] > 0


def test_stock_webdataset_and_tar_read_the_shards(tiny_shards):
    import webdataset as wds

    m = json.loads((tiny_shards / "manifest.json").read_text())
    sh = m["splits"]["train"]["shards"][0]
    url = str(tiny_shards / sh["name"])
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert len(samples) == sh["samples"]
    s0 = samples[0]
    assert s0["tokens.npy"].ndim == 1 and len(s0["scores.npy"]) == len(s0["tokens.npy"])
    assert s0["json"]["source"].endswith(".py")
    names = subprocess.run(["tar", "-tf", url], capture_output=True, text=True, check=True).stdout.split()
    assert names[:4] == ["000000-0000000.tokens.npy", "000000-0000000.scores.npy", "000000-0000000.segments.npy",
                         "000000-0000000.json"]


def test_reader_matches_webdataset_and_tokens_decode_to_source(tiny_shards):
    ss = ShardSet(tiny_shards, "train")
    tok = toklib.load_tokenizer(ss.tokenizer_dir)
    eos = toklib.special_ids(tok)["eos"]
    for i in range(len(ss)):
        d = ss.read(i)
        assert d["tokens"][-1] == eos
        meta_src = ss.manifest["splits"]["train"]["shards"][0]["name"]
        assert meta_src
        text = tok.decode(d["tokens"][:-1].tolist())
        assert len(text) > 0
        # every segment starts at a token after a newline (line segmenter)
        for st in d["seg_start"][1:]:
            assert tok.decode([int(d["tokens"][st - 1])]).endswith("\n")


def test_scores_follow_pycodestyle_per_line():
    text = "import os\nx=1\ndef f( a ):\n    return a\n"
    spans = line_spans(text)
    scores = Pep8Scorer().score(Document("t.py", "t.py", text), spans)
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(1 / 4)  # E225 on "x=1\n"
    assert scores[2] > 0 and scores[3] == 0.0


def test_sentence_spans_tile_the_text():
    text = "First one. Second, with more! And a third?\n\nNew para."
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text
    assert len(spans) == 4


def test_same_bytes_with_one_and_two_workers(tmp_path, stdlib_files):
    outs = []
    for w in (1, 2):
        o = tmp_path / f"w{w}"
        build_shards(ShardOptions(inputs=stdlib_files[:6], output=str(o), vocab_size=400, workers=w, progress=False,
                                  shard_size_mb=0.01))
        outs.append(o)
    a = sorted(p.name for p in outs[0].iterdir())
    assert a == sorted(p.name for p in outs[1].iterdir())
    assert sum(1 for n in a if n.endswith(".tar")) > 2  # the size bound split the set
    for name in a:
        if name.endswith((".tar", ".npy")):
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_bad_inputs_are_counted_not_fatal(tmp_path, stdlib_files):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "good.py").write_text(Path(stdlib_files[0]).read_text())
    (d / "empty.py").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "binary.txt").write_bytes(b"\x00\x01\x02abc" * 10)
    (d / "recs.jsonl").write_text('{"text": "x = 1\\n"}\n{broken\n{"nope": 1}\n')
    m = build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="pep8", vocab_size=300,
                                  workers=1, progress=False, val_fraction=0.0))
    assert m["skipped"] == {"binary": 1, "empty": 1, "invalid_utf8": 1, "malformed_jsonl": 1, "missing_text": 1}
    assert m["splits"]["train"]["samples"] == 2  # good.py and the one valid JSONL record
    log = (tmp_path / "out" / "skipped.log").read_text()
    assert "recs.jsonl:2: malformed JSON" in log and "latin1.txt: invalid UTF-8" in log


def test_corrupt_shard_is_named(tmp_path, tiny_shards):
    import shutil

    c = tmp_path / "copy"
    shutil.copytree(tiny_shards, c)
    name = json.loads((c / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    raw = bytearray((c / name).read_bytes())
    raw[700] ^= 0xFF
    (c / name).write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{name}: sha256 mismatch"):
        ShardSet(c).read(0)
    (c / name).write_bytes(bytes(raw[:1000]))
    with pytest.raises(ShardError, match="truncated"):
        ShardSet(c).read(0)


def test_unsafe_tar_member_names_are_rejected():
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        ti = tarfile.TarInfo("../evil.tokens.npy")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(ShardError, match="unsafe member name"):
        parse_tar_members(buf.getvalue(), "test")


def _layouts(ss):
    sp = toklib.special_ids(toklib.load_tokenizer(ss.tokenizer_dir))
    return sp, {
        "mle": Layout("mle"),
        "filter": Layout("filter", threshold=0.0),
        "conditional": Layout("conditional", 0.0, 0.1, 7, sp["aligned"], sp["misaligned"]),
    }


def test_mle_layout_is_the_documents_unchanged(tiny_shards):
    ss = ShardSet(tiny_shards)
    sp, lay = _layouts(ss)
    ps = PackedSet(ss, lay["mle"], 64)
    stream = np.concatenate([ss.read(i)["tokens"] for i in range(len(ss))])
    for i in (0, 1, len(ps) // 2, len(ps) - 1):
        x = ps[i]
        assert (x["input_ids"] == stream[i * 64:(i + 1) * 64]).all()
        assert (x["labels"] == x["input_ids"]).all()
        assert not np.isin(x["input_ids"], [sp["aligned"], sp["misaligned"]]).any()


def test_conditional_layout_inserts_the_right_control_tokens(tiny_shards):
    ss = ShardSet(tiny_shards)
    sp, lay = _layouts(ss)
    lens = layout_lengths(ss, lay["conditional"])
    nseg = ss.column("n_segments").sum()
    added = lens.sum() - ss.column("n_tokens").sum()
    assert 0.85 * nseg < added < 0.95 * nseg  # about 10 % dropped
    ps = PackedSet(ss, lay["conditional"], 64)
    x = ps[3]
    ctrl = np.isin(x["input_ids"], [sp["aligned"], sp["misaligned"]])
    assert ctrl.any() and (x["labels"][ctrl] == IGNORE).all() and (x["labels"][~ctrl] != IGNORE).all()
    assert (x["control"] == ctrl).all()
    # aligned exactly when the segment's score is <= 0 (threshold 0 means 0)
    al = x["input_ids"] == sp["aligned"]
    assert (x["scores"][al] <= 0).all() and (x["scores"][x["input_ids"] == sp["misaligned"]] > 0).all()
    # the drop decision is deterministic
    assert (PackedSet(ss, lay["conditional"], 64)[3]["input_ids"] == x["input_ids"]).all()


def test_filter_layout_keeps_only_clean_documents(tiny_shards):
    ss = ShardSet(tiny_shards)
    _, lay = _layouts(ss)
    lens = layout_lengths(ss, lay["filter"])
    keep = ss.column("mean_score") <= 0.0
    assert (lens[~keep] == 0).all() and (lens[keep] == ss.column("n_tokens")[keep]).all()


def test_feistel_is_a_bijection():
    for n in (1, 2, 7, 100, 1000, 4097):
        p = FeistelPermutation(n, key=42)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    assert [FeistelPermutation(1000, 1)(i) for i in range(10)] != [FeistelPermutation(1000, 2)(i) for i in range(10)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_union_over_ranks_is_the_same_global_sequence(world):
    G, micro, steps = 12, 1, 5
    seen = []
    for step in range(steps):
        for rank in range(world):
            for mb in rank_positions(step, micro, G, rank, world):
                seen.extend(mb)
    assert seen == list(range(steps * G))  # each position exactly once, in order


def test_mixture_proportions_and_epochs():
    order = GlobalOrder([50, 200], [0.25, 0.75], seed=3, block=100)
    sets = [order(j) for j in range(4000)]
    share = sum(1 for s, _, _ in sets if s == 0) / len(sets)
    assert abs(share - 0.25) < 0.01
    first_epoch = [i for s, i, e in sets if s == 0 and e == 0]
    assert sorted(first_epoch) == list(range(50))  # a set's epoch visits each sample once
    assert GlobalOrder([50, 200], [0.25, 0.75], seed=3, block=100)(1234) == order(1234)


def test_mlm_masking_statistics_and_determinism():
    from prefpretrain.data_shards.packing import MaskSpec, mlm_mask

    rng = np.random.default_rng(0)
    ids = rng.integers(10, 500, 200_000)
    ids[::50] = 2  # control tokens are never masked targets
    labels = np.where(ids == 2, IGNORE, ids)
    spec = MaskSpec(mask_id=4, vocab_size=500, special_ids=(0, 1, 2, 3, 4), prob=0.15, seed=1)
    inp, lab = mlm_mask(ids, labels, spec, (0, 7))
    chosen = lab != IGNORE
    assert abs(chosen.mean() - 0.15 * 0.98) < 0.005
    assert (lab[chosen] == ids[chosen]).all() and not chosen[ids == 2].any()
    frac_mask = (inp[chosen] == 4).mean()
    frac_same = (inp[chosen] == ids[chosen]).mean()
    assert abs(frac_mask - 0.8) < 0.01 and 0.095 < frac_same < 0.115  # 10 % kept (+ random hits)
    assert (inp[~chosen] == ids[~chosen]).all()
    assert (mlm_mask(ids, labels, spec, (0, 7))[0] == inp).all()
    assert (mlm_mask(ids, labels, spec, (1, 7))[0] != inp).any()  # another epoch, another mask


def test_partial_reads_pack_exactly_what_whole_documents_give(tiny_shards):
    """doc_window reads only token ranges; rebuild the conditional stream from whole documents instead."""
    from prefpretrain.data_shards.packing import _keep_control

    ss = ShardSet(tiny_shards)
    sp, lay = _layouts(ss)
    layout = lay["conditional"]
    ids, labels = [], []
    for d in range(len(ss)):
        doc = ss.read(d)
        keep = _keep_control(layout, np.full(len(doc["seg_start"]), d), np.arange(len(doc["seg_start"])))[:, 0]
        ctrl = np.where(doc["seg_score"] <= 0, sp["aligned"], sp["misaligned"])[keep]
        pos = doc["seg_start"][keep]
        ids.append(np.insert(doc["tokens"], pos, ctrl))
        labels.append(np.insert(doc["tokens"], pos, IGNORE))
    ids, labels = np.concatenate(ids), np.concatenate(labels)
    ps = PackedSet(ss, layout, 64)
    assert ps.total_tokens == len(ids)
    for i in range(len(ps)):
        x = ps[i]
        assert (x["input_ids"] == ids[i * 64:(i + 1) * 64]).all(), i
        assert (x["labels"] == labels[i * 64:(i + 1) * 64]).all(), i


def test_reader_reads_about_its_share(tiny_shards):
    """Packing reads token ranges, not whole documents: one pass over all samples reads ~ the data once."""
    ss = ShardSet(tiny_shards, verify=False)
    _, lay = _layouts(ss)
    ps = PackedSet(ss, lay["mle"], 64)
    for i in range(len(ps)):
        ps[i]
    data_bytes = sum(ss.column("n_tokens")) * (ss.tok_dtype.itemsize + 2)
    assert ss.bytes_read <= 1.05 * data_bytes


def test_packing_index_is_cached_per_layout_and_recomputed_when_damaged(tiny_shards, tmp_path, caplog):
    import shutil

    from prefpretrain.data_shards.packing import CACHE_DIR

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards, ignore=shutil.ignore_patterns(CACHE_DIR))
    ss = ShardSet(shards)
    _, lay = _layouts(ss)
    first = PackedSet(ss, lay["conditional"], 64)
    files = sorted((shards / CACHE_DIR).glob("*.npy"))
    assert len(files) == 1 and isinstance(first.cum, np.memmap)  # written part by part, then mapped
    first.cum = np.array(first.cum)  # (the test damages the file in place below; the code never does)
    again = PackedSet(ShardSet(shards), lay["conditional"], 64)  # a later start maps the cached index
    assert isinstance(again.cum, np.memmap) and np.array_equal(again.cum, first.cum)
    assert np.array_equal(again[5]["input_ids"], first[5]["input_ids"])
    PackedSet(ss, lay["mle"], 64)  # another layout, another index
    assert len(list((shards / CACHE_DIR).glob("*.npy"))) == 2
    np.save(files[0], np.arange(3, dtype=np.int64))  # damaged: wrong length
    with caplog.at_level("WARNING"):
        fixed = PackedSet(ShardSet(shards), lay["conditional"], 64)
    assert "recomputing" in caplog.text and np.array_equal(np.asarray(fixed.cum), first.cum)
    assert np.load(files[0]).shape == first.cum.shape  # and written back
    # a shard directory the run cannot write to: the index is computed in memory, nothing else changes
    ro = tmp_path / "ro"
    shutil.copytree(tiny_shards, ro, ignore=shutil.ignore_patterns(CACHE_DIR))
    (ro / CACHE_DIR).write_text("not a directory")
    mem = PackedSet(ShardSet(ro), lay["conditional"], 64)
    assert np.array_equal(mem.cum, first.cum) and not list(ro.glob(f"{CACHE_DIR}*.tmp"))
