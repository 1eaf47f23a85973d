"""Score columns: `prefpretrain rescore` adds a column beside the tars without touching them; runs select it."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from prefpretrain.config import ConfigError
from prefpretrain.data_shards.packing import Layout, PackedSet, layout_lengths
from prefpretrain.data_shards.reader import TAR_SCORES, ShardError, ShardSet
from prefpretrain.data_shards.rescore import rescore
from tests.conftest import ROOT, launch_tiny, run_cli
from tests.ranks import cli_forked


@pytest.fixture
def shards(tiny_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out, ignore=shutil.ignore_patterns("packing_cache"))
    return out


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.name.endswith((".tar", ".idx.npy"))}


def test_rescoring_with_the_stored_scorer_gives_the_stored_scores_and_leaves_the_tars(shards, stdlib_files):
    before = _digests(shards)
    stored = json.loads((shards / "manifest.json").read_text())["scorer"]
    rescore(shards, "pep8", "again", stored["params"], workers=1)
    rescore(shards, "pii", workers=1)
    assert _digests(shards) == before  # tokens, stored scores and indexes untouched
    for split in ("train", "val"):
        tar, again, pii = (ShardSet(shards, split, column=c) for c in (TAR_SCORES, "again", "pii"))
        assert len(tar) > 0 and (tar.column("mean_score") == again.column("mean_score")).all()
        for i in range(len(tar)):
            a, b = tar.read(i), again.read(i)
            assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["seg_score"], b["seg_score"])
            n = len(a["tokens"])
            ta, tb = tar.read_tokens(i, n // 3, n - 1)[1], again.read_tokens(i, n // 3, n - 1)[1]
            assert np.allclose(ta, tb, rtol=1e-3)  # (the tars hold float16 per token)
            starts, sc = pii.read_segments(i)
            assert np.array_equal(starts, a["seg_start"]) and np.array_equal(sc, pii.read(i)["seg_score"])
    tr_pii = ShardSet(shards, "train", column="pii")
    assert not np.array_equal(tr_pii.column("mean_score"), ShardSet(shards, "train").column("mean_score"))
    m = json.loads((shards / "manifest.json").read_text())
    assert set(m["columns"]) == {"again", "pii"} and m["columns"]["pii"]["scorer"]["name"] == "pii"
    # the same `shard` command run again over the finished set rewrites its manifest: the columns stay
    from prefpretrain.data_shards.build import ShardOptions, build_shards

    build_shards(ShardOptions(inputs=stdlib_files, output=str(shards), scorer="pep8", vocab_size=512,
                              val_fraction=0.2, workers=1, progress=False))
    assert json.loads((shards / "manifest.json").read_text())["columns"] == m["columns"]


def test_samples_carry_the_selected_column(shards):
    rescore(shards, "pii", workers=1)
    ss = ShardSet(shards, "train", column="pii")
    sp = ss.manifest["tokenizer"]["special_ids"]
    cond = Layout("conditional", 0.0, 0.0, 1, sp["aligned"], sp["misaligned"])
    ps = PackedSet(ss, cond, 64)
    ids = np.concatenate([ps.get(i)["input_ids"] for i in range(len(ps))])
    want = sum(int((ss.read_segments(d)[1] > 0).sum()) for d in range(len(ss)))
    covered = ps.n_samples * 64 / ps.total_tokens  # the last partial sample is not packed
    assert (ids == sp["misaligned"]).sum() == pytest.approx(want * covered, abs=3) and want > 0
    # filtering follows the column's document means; the cached packing index of the stored column is not reused
    filt = Layout("filter", 0.0)
    stored = PackedSet(ShardSet(shards, "train"), filt, 64)
    by_pii = PackedSet(ss, filt, 64)
    assert by_pii.total_tokens == int(layout_lengths(ss, filt).sum()) != stored.total_tokens


@pytest.mark.cli
def test_a_damaged_or_unknown_column_and_what_cannot_be_rescored_are_one_line(shards):
    rescore(shards, "pii", workers=1)
    f = next(shards.glob("train-*.tar.score-pii.*.npy"))
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    ss = ShardSet(shards, "train", column="pii")  # (each file is checked when first read)
    with pytest.raises(ShardError, match="sha256 mismatch .damaged score column"):
        ss.column("mean_score")
    f.unlink()
    with pytest.raises(ShardError, match=f"score column 'pii': file for {f.name.split('.tar')[0]}.tar missing"):
        ShardSet(shards, "train", column="pii")
    with pytest.raises(ShardError, match=r"no score column 'toxicity' \(it has pep8, pii;"):
        ShardSet(shards, "train", column="toxicity")
    rescore(shards, "pii", workers=1)  # replaced: readable again, the damaged column's files gone
    assert ShardSet(shards, "train", column="pii").column("mean_score").any() and not f.exists()
    assert len(list(shards.glob("*.tar.score-pii.*.npy"))) == 2  # (one train, one val part)
    r = run_cli("rescore", str(shards), "--scorer", "field")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "prefpretrain rescore: error: --scorer field: cannot rescore, its scores came with the input records, "
        "which the shards do not keep"]
    r = run_cli("train", "configs/tiny.yaml", f"data.shards=[{shards}]", "objective.attributes=[toxicity]")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"prefpretrain: config error: objective.attributes[0].column: 'toxicity' is not a score column of "
        f"'{shards}' (it has pep8, pii; `prefpretrain rescore {shards} --scorer NAME` adds one)"]


def test_attribute_config_is_checked():
    from prefpretrain.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["objective.attributes=[{column: pii, threshold: 0.5}]"])
    assert cfg.objective.column == "pii" and cfg.objective.threshold == 0.5
    assert load_config(ROOT / "configs" / "tiny.yaml").objective.column is None
    for over, says in ((["objective.attributes=[pii, pep8]", "train.objective=awr"],
                        "2 attributes; conditioning on several at once is the conditional objective's"),
                       (["objective.attributes=[{column: pii, threshold: 0.5}]", "objective.threshold=0.2"],
                        "set the threshold there"),
                       (["objective.attributes=[pii]", "continual.from=/x"], "a continual update reads the stored")):
        with pytest.raises(ConfigError, match=says):
            load_config(ROOT / "configs" / "tiny.yaml", over)


@pytest.mark.dist
def test_a_run_trains_evaluates_and_exports_on_a_rescored_column(shards, tmp_path):
    r = run_cli("rescore", str(shards), "--scorer", "pii", "--workers", "2")  # (two spawned scoring processes)
    assert r.returncode == 0 and "wrote column 'pii' (pii)" in r.stdout, r.stderr[-2000:]
    run = tmp_path / "run"
    launch_tiny(shards, run, 2, **{"train.max_steps": 2, "train.objective": "conditional", "eval.every_steps": 0,
                                   "checkpoint.every_steps": 0, "objective.attributes": "[{column: pii}]"})
    r = cli_forked("evaluate", str(run), "--samples", "2", "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["scorer"] == "pii"  # the column's scorer judges it
    assert cli_forked("export", str(run), str(tmp_path / "hf")).returncode == 0
    info = json.loads((tmp_path / "hf" / "prefpretrain.json").read_text())
    assert info["score_column"] == "pii" and info["scorer"]["name"] == "pii"
    # the column rescored since the checkpoint with other scores (same ones: the same files' checksums, fine):
    # resuming on other scores is refused
    rescore(shards, "none", "pii", workers=1)
    r = launch_tiny(shards, run, 2, expect=2, **{"train.max_steps": 3, "train.objective": "conditional",
                                                 "eval.every_steps": 0, "checkpoint.every_steps": 0,
                                                 "objective.attributes": "[{column: pii}]"})
    assert "the score column" in r.stderr and "has changed since" in r.stderr
