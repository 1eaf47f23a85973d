"""Conditioning on several attributes at once: one control token per attribute before every segment (packing), the
run's vocabulary, config and preflight checks; and a trained model whose controls work independently."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from prefpretrain.config import ConfigError, load_config
from prefpretrain.data_shards.packing import IGNORE, Control, Layout, PackedSet, _keep_control, layout_lengths
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.rescore import rescore
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def shards(tiny_shards, tmp_path_factory):
    """tiny_shards with a `pii` column (the tests read it; they add packing caches only)."""
    out = tmp_path_factory.mktemp("attributes") / "shards"
    shutil.copytree(tiny_shards, out, ignore=shutil.ignore_patterns("packing_cache"))
    rescore(out, "pii", workers=1)
    return out


def _reference_stream(ss: ShardSet, pii: ShardSet, layout: Layout) -> dict:
    """Every document laid out whole, the naive way: before each segment its kept controls, then its tokens."""
    out = {k: [] for k in ("ids", "scores", "control")}
    for d in range(len(ss)):
        doc, other = ss.read(d), pii.read(d)
        starts = np.r_[doc["seg_start"], len(doc["tokens"])]
        kept = _keep_control(layout, np.full(len(doc["seg_start"]), d), np.arange(len(doc["seg_start"])))
        for j in range(len(doc["seg_start"])):
            for m, (c, sc) in enumerate(zip(layout.controls, (doc["seg_score"][j], other["seg_score"][j]),
                                            strict=True)):
                if kept[j, m]:
                    out["ids"].append(c.aligned_id if sc <= c.threshold else c.misaligned_id)
                    out["scores"].append(doc["seg_score"][j])
                    out["control"].append(True)
            a, b = starts[j], starts[j + 1]
            out["ids"] += doc["tokens"][a:b].tolist()
            out["scores"] += doc["scores"][a:b].tolist()
            out["control"] += [False] * (b - a)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_two_attributes_put_one_control_token_each_before_every_segment(shards, drop):
    """Every window of the packed stream equals the naive layout (controls of the two attributes in order, each
    from its own column and threshold, each dropped independently), wherever the window cuts a run of controls."""
    ss = ShardSet(shards, "train", extra_columns=("pii",))
    pii = ShardSet(shards, "train", column="pii")
    sp, vocab = ss.manifest["tokenizer"]["special_ids"], ss.manifest["tokenizer"]["vocab_size"]
    layout = Layout("conditional", 0.0, drop, 5, sp["aligned"], sp["misaligned"],
                    more=(Control(0.0, vocab, vocab + 1),))
    ref = _reference_stream(ss, pii, layout)
    nseg = int(ss.column("n_segments").sum())
    added = int(layout_lengths(ss, layout).sum() - ss.column("n_tokens").sum())
    assert added == int(ref["control"].sum())
    assert added == 2 * nseg if drop == 0 else 1.3 * nseg < added < 1.5 * nseg  # two per segment, 30 % dropped
    for L in (7, 64):  # (7: windows start and end inside runs of two control tokens)
        ps = PackedSet(ss, layout, L, document_mask=True)
        for i in range(len(ps)):
            x = ps[i]
            sl = slice(i * L, (i + 1) * L)
            assert np.array_equal(x["input_ids"], ref["ids"][sl]), (L, i)
            assert np.array_equal(x["control"], ref["control"][sl])
            assert np.allclose(x["scores"], ref["scores"][sl])
            assert np.array_equal(x["labels"] == IGNORE, x["control"])
    ids = ref["ids"]
    both = [np.isin(ids, [a, b]).sum() for a, b in ((sp["aligned"], sp["misaligned"]), (vocab, vocab + 1))]
    assert min(both) > 0 and (ids == vocab + 1).sum() > 0 and (ids == vocab).sum() > 0  # both values of the new one
    if drop:  # independent drops: segments with only the first, only the second attribute's control
        kept = _keep_control(layout, np.zeros(1000, np.int64), np.arange(1000))
        assert (kept[:, 0] & ~kept[:, 1]).any() and (~kept[:, 0] & kept[:, 1]).any()
        assert abs(kept[:, 0].mean() - 0.7) < 0.05 and abs(kept[:, 1].mean() - 0.7) < 0.05


def test_the_run_vocabulary_and_the_attribute_checks(shards):
    from prefpretrain.preflight import check_paths
    from prefpretrain.trainer.data import open_data, training_data

    over = [f"data.shards=[{shards}]", "objective.attributes=[{column: pep8}, {column: pii, threshold: 0.5}]"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    assert cfg.objective.extra_columns == ("pii",)
    check_paths(cfg)
    data = training_data(cfg, *open_data(cfg))
    vocab = data.manifest["tokenizer"]["vocab_size"]
    assert data.vocab_size == vocab + 2 and data.layout.more == (Control(0.5, vocab, vocab + 1),)
    assert [a.column for a in data.attributes] == ["pep8", "pii"]
    assert data.scores_digest is not None  # (the pii column's files are part of what a resume must find again)
    x = np.concatenate([data.packed[0][i]["input_ids"] for i in range(4)])
    assert ((x == vocab) | (x == vocab + 1)).any()
    for bad, says in ((["objective.attributes=[pep8, pii]", "train.objective=rwr"], "the conditional objective's"),
                      (["objective.attributes=[pii, pii]"], r"attributes\[1\].column: 'pii' is named twice"),
                      (["eval.condition=pii=maybe"], "eval.condition 'pii=maybe': expected one of auto")):
        with pytest.raises(ConfigError, match=says):
            load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards=[{shards}]", *bad])
    for bad, says in ((["objective.attributes=[pep8, toxicity]"], r"attributes\[1\].column: 'toxicity' is not a"),
                      (["objective.attributes=[pep8, pii]", "eval.condition=toxicity=aligned"],
                       "eval.condition 'toxicity=aligned': toxicity is not an attribute of this model")):
        with pytest.raises(ConfigError, match=says):
            check_paths(load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards=[{shards}]", *bad]))
    # the packing cache is keyed by the attributes: one attribute's index is another file
    cached = set((shards / "packing_cache").glob("train-conditional-*.npy"))
    one = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards=[{shards}]"])
    training_data(one, *open_data(one))
    assert len(set((shards / "packing_cache").glob("train-conditional-*.npy")) - cached) == 1


@pytest.mark.dist
def test_each_attribute_s_control_works_independently_after_training(tmp_path):
    """A corpus whose lines shout (caps) and start with a number (digits) independently, scored by two columns;
    a 2-rank conditional run on both. Switching one attribute's control moves its misalignment >= 2x and leaves
    the other's (held at misaligned) within 1.5x; an export carries the second attribute's tokens and `generate`
    takes any combination."""
    from prefpretrain.data_shards.build import ShardOptions, build_shards
    from tests.attribute_scorers import write_corpus
    from tests.conftest import launch_tiny, read_metrics
    from tests.ranks import cli_forked

    shards, run = tmp_path / "shards", tmp_path / "run"
    build_shards(ShardOptions(inputs=[str(write_corpus(tmp_path / "corpus"))], output=str(shards), scorer="none",
                              segmenter="line", vocab_size=300, val_fraction=0.1, workers=1, progress=False))
    for name in ("caps", "digits"):
        rescore(shards, f"tests.attribute_scorers:{name}", name, workers=1)
    launch_tiny(shards, run, 2, **{"objective.attributes": "[caps, digits]", "train.max_steps": 300,
                                   "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.lr": 1e-2,
                                   "train.warmup_steps": 20, "model.hidden_size": 64, "eval.every_steps": 0,
                                   "checkpoint.every_steps": 0, "eval.misalignment_every_steps": 150,
                                   "eval.max_new_tokens": 60})  # (several complete lines per sample)
    rows = [r for r in read_metrics(run, "evaluate") if "eval/misalignment" in r]
    assert len(rows) >= 2 and all("eval/misalignment_tests_attribute_scorers_digits" in r for r in rows)
    caps, digits = "tests.attribute_scorers:caps", "tests.attribute_scorers:digits"

    def judged(condition: str) -> dict:
        out = tmp_path / f"{condition}.json"
        r = cli_forked("evaluate", str(run), "--samples", "32", "--condition", condition, "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(out.read_text())
        assert res["condition"] == condition and list(res["by_scorer"]) == [caps, digits]
        assert res["empty_fraction"] < 0.2  # (a sample without a complete line scores 0: few, or it means little)
        return {k: v["misalignment"] for k, v in res["by_scorer"].items()}

    both = judged("caps=misaligned,digits=misaligned")
    assert both[caps] > 0.5 and both[digits] > 0.5
    for switched, other, condition in ((caps, digits, "caps=aligned,digits=misaligned"),
                                       (digits, caps, "digits=aligned,caps=misaligned")):
        res = judged(condition)
        assert both[switched] >= 2 * res[switched], (switched, both, res)
        assert 1 / 1.5 <= both[other] / res[other] <= 1.5, (other, both, res)
    assert cli_forked("export", str(run), str(tmp_path / "hf")).returncode == 0
    from prefpretrain.data_shards.tokenizer import load_tokenizer

    tok, vocab = load_tokenizer(tmp_path / "hf"), json.loads((shards / "manifest.json").read_text())["tokenizer"]
    assert [tok.token_to_id(t) for t in ("<|aligned:digits|>", "<|misaligned:digits|>")] == [
        vocab["vocab_size"], vocab["vocab_size"] + 1]
    info = json.loads((tmp_path / "hf" / "prefpretrain.json").read_text())
    assert [a["column"] for a in info["attributes"]] == ["caps", "digits"]
    r = cli_forked("generate", str(tmp_path / "hf"), "--n", "4", "--max-new-tokens", "40", "--condition",
                   "digits=misaligned,caps=aligned")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("-----")]
    assert lines and sum(ln[0].isdigit() and ln.islower() for ln in lines) >= len(lines) / 2, lines
    r = cli_forked("generate", str(tmp_path / "hf"), "--condition", "toxicity=aligned")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "toxicity is not an attribute of this model (its attributes: caps, digits)"), r.stderr
