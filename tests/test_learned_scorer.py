"""The preference-label head as a scorer (`--scorer learned:PATH`) and `export --with-heads`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.ranks import cli_forked

pytestmark = [pytest.mark.dist, pytest.mark.xdist_group("learned")]

LEARNED = {"objective.label_head_weight": 1.0, "train.objective": "mle", "train.max_steps": 12, "eval.samples": 0}


@pytest.fixture(scope="module")
def learned(shared_run, tmp_path_factory) -> tuple[Path, Path]:
    """(a run trained with a label head, its `export --with-heads` directory)."""
    run = shared_run(2, **LEARNED)
    out = tmp_path_factory.mktemp("learned") / "export"
    r = cli_forked("export", str(run), str(out), "--with-heads")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, out


def _docs(n_lines: int = 200):
    import inspect
    import textwrap

    from prefpretrain.data_shards.segment import line_spans
    from prefpretrain.data_shards.sources import Document

    texts = ["x=1\nimport os\ndef f( a ):\n  return a\n",
             "".join(inspect.getsource(textwrap).splitlines(True)[:n_lines])]  # several windows of 64 tokens
    return [(Document("t", str(i), t), line_spans(t)) for i, t in enumerate(texts)]


def test_export_with_heads_holds_the_heads_and_a_plain_export_none(learned, tmp_path):
    from safetensors.torch import load_file

    from prefpretrain.trainer.export import export_run

    run, out = learned
    heads = load_file(str(out / "heads.safetensors"))
    assert {k: tuple(v.shape) for k, v in heads.items()} == {"label_head.weight": (1, 32), "label_head.bias": (1,)}
    info = json.loads((out / "prefpretrain.json").read_text())["heads"]
    assert info["names"] == ["label_head"] and info["hidden_size"] == 32 and info["model_kind"] == "causal"
    lh = info["label_head"]
    assert lh["pooling"].startswith("mean of the last hidden state") and lh["threshold"] == 0.0
    assert lh["score_column"] == "pep8" and lh["segmenter"] == "line"
    assert not any(k.startswith(("label_head", "value_head")) for k in load_file(str(out / "model.safetensors")))
    plain = export_run(run, tmp_path / "plain")
    assert not (plain / "heads.safetensors").exists()
    assert "heads" not in json.loads((plain / "prefpretrain.json").read_text())
    assert not any(k.startswith(("label_head", "value_head")) for k in load_file(str(plain / "model.safetensors")))


def test_the_scorer_from_the_run_and_from_the_export_agree(learned):
    from prefpretrain.data_shards.scorers import get_scorer
    from prefpretrain.errors import InputError

    run, out = learned
    docs = _docs()
    a, b = get_scorer(f"learned:{run}"), get_scorer(f"learned:{out}", {"batch_size": 3})
    assert a.name == "learned" and a.params["aligned_at"] == 0.5 and a.params["score"] == "1 - P(preferred)"
    assert a.segmenter == b.segmenter == "line" and a.params["window"] == b.params["window"] == 64
    # pinned to the checkpoint loaded (absolute), not to "the run's newest" that later processes would resolve
    from prefpretrain.trainer.checkpoint import find_latest

    assert a.params["path"] == str(find_latest(run / "checkpoints").resolve()) and a.params["given"] == str(run)
    for bad in ({"batch_size": 0}, {"device": "gpu:x"}):
        with pytest.raises(InputError, match="batch_size|device"):
            get_scorer(f"learned:{out}", bad)
    got_a, got_b = a.score_many(docs), [b.score(d, s) for d, s in docs]
    again = get_scorer("learned", b.params)  # as evaluate makes a column's scorer from the manifest's record
    np.testing.assert_allclose(again.score(*docs[0]), got_b[0], atol=1e-6)
    for (_, spans), x, y in zip(docs, got_a, got_b, strict=True):
        assert len(x) == len(spans) and all(0.0 <= v <= 1.0 for v in x)
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_segment_scores_one_minus_the_head_on_its_mean_last_hidden_state(learned):
    """By hand, with the full model as training calls it: [EOS] + the document's tokens in windows of 64, a
    segment's tokens found by their character offsets."""
    from prefpretrain.data_shards.scorers import get_scorer
    from prefpretrain.data_shards.tokenizer import EOS, load_tokenizer
    from prefpretrain.trainer.finished import FinishedRun, load_run_model

    run, _ = learned
    (doc, spans), W = _docs()[1], 64
    tok = load_tokenizer(FinishedRun.open(run).shards("train").tokenizer_dir)
    model = load_run_model(run, heads=True)[0]
    enc = tok.encode(doc.text, add_special_tokens=False)
    seq = [tok.token_to_id(EOS), *enc.ids]
    starts = [o[0] for o in enc.offsets]
    scores = get_scorer(f"learned:{run}").score(doc, spans)
    checked = 0
    for j in (2, 5, len(spans) // 2):
        a, b = spans[j]
        pos = [i + 1 for i, s in enumerate(starts) if a <= s < b]  # positions in seq
        lo = pos[0] // W * W
        if pos[-1] >= lo + W:  # cut by a window boundary: not this hand check's case
            continue
        with torch.no_grad():
            h = model(input_ids=torch.tensor([seq[lo: lo + W]]), output_hidden_states=True).hidden_states[-1][0]
            want = 1 - torch.sigmoid(model.label_head(h[[p - lo for p in pos]].mean(0))).item()
        assert scores[j] == pytest.approx(want, abs=1e-5)
        checked += 1
    assert checked >= 2


@pytest.mark.cli
def test_rescore_adds_a_learned_column_and_a_path_without_a_head_is_refused(learned, tiny_shards, tmp_path):
    from prefpretrain.trainer.export import export_run

    run, _ = learned
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    r = run_cli("rescore", str(shards), "--scorer", f"learned:{run}", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    entry = json.loads((shards / "manifest.json").read_text())["columns"]["learned"]
    assert entry["scorer"]["name"] == "learned" and entry["scorer"]["params"]["aligned_at"] == 0.5
    for split in entry["splits"].values():
        for f in split["files"].values():
            v = np.load(shards / f["file"])
            assert len(v) == f["documents"] + f["segments"] and ((v >= 0) & (v <= 1)).all()
    plain = export_run(run, tmp_path / "plain")
    r = run_cli("rescore", str(shards), "--scorer", f"learned:{plain}", "--workers", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert "no label head" in r.stderr


def test_a_run_without_a_head_or_without_its_tokenizer_is_refused(learned, tmp_path):
    from prefpretrain.data_shards.scorers import get_scorer
    from prefpretrain.errors import InputError

    run, _ = learned
    for name, old, new, why in [("nohead", "label_head_weight: 1.0", "label_head_weight: 0.0", "no label head"),
                                ("notok", "- path: ", "- path: /nonexistent", "tokenizer cannot be found")]:
        copy = tmp_path / name
        shutil.copytree(run, copy)
        cfg = (copy / "config.yaml").read_text()
        assert old in cfg
        (copy / "config.yaml").write_text(cfg.replace(old, new, 1))
        with pytest.raises(InputError, match=why):
            get_scorer(f"learned:{copy}")
    with pytest.raises(InputError, match="no run, checkpoint or export"):
        get_scorer(f"learned:{tmp_path / 'missing'}")


@pytest.mark.cli
def test_shard_scores_with_the_learned_scorer_on_the_heads_segmenter(learned, tiny_shards, stdlib_files, tmp_path):
    _, export = learned
    out = tmp_path / "shards"
    r = run_cli("shard", "--input", *stdlib_files[:2], "--output", str(out), "--scorer", f"learned:{export}",
                "--tokenizer", str(tiny_shards / "tokenizer"), "--workers", "1", "--val-fraction", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["scorer"]["name"] == "learned" and m["segmenter"] == "line"
    st = m["splits"]["train"]["score_stats"]
    assert st["segments"] > 0 and 0.0 <= st["min"] <= st["max"] <= 1.0
