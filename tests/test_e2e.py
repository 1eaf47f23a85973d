"""The whole path on real data: shard stdlib files -> 2 ranks -> evaluate -> TensorBoard -> HF export.

Shard and launch start as a user starts them; the evaluate, export and generate steps run as forked processes
(tests/ranks.py, the same entry point without ~5 s of imports each)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, tiny_overrides
from tests.ranks import cli_forked

pytestmark = pytest.mark.dist


def test_shard_train_evaluate_export_reload(tmp_path, stdlib_files):
    shards, run, export = tmp_path / "shards", tmp_path / "run", tmp_path / "export"
    r = run_cli("shard", "--input", *stdlib_files[:8], "--output", str(shards), "--scorer", "pep8",
                "--vocab-size", "512", "--workers", "2", "--val-fraction", "0.25", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert (shards / "manifest.json").is_file() and (shards / "tokenizer" / "tokenizer.json").is_file()

    r = run_cli("launch", "configs/tiny.yaml", "--nproc-per-node", "2", *tiny_overrides(shards, run))
    assert r.returncode == 0, r.stderr[-5000:]

    r = cli_forked("evaluate", str(run), "--samples", "4", "--samples-out", str(tmp_path / "samples.jsonl"))
    assert r.returncode == 0, r.stderr[-5000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 6 and ev["val_tokens"] > 0 and ev["perplexity"] == pytest.approx(2.718281828 ** ev["val_loss"])
    assert ev["condition"] == "aligned" and ev["samples"] == 4 and ev["misalignment"] >= 0
    assert "sample_texts" not in ev and len(ev["sample_parses"]) == 4  # (the texts go to --samples-out only)
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["i"] for x in recs] == [0, 1, 2, 3] and recs[0]["text"] == ev["examples"][0]
    assert [x["scores"]["pep8"] for x in recs] == ev["sample_scores"]
    assert [int(x["parses"]) for x in recs] == ev["sample_parses"]
    # code: by line type, and at the data's mix of line types (a number, whatever the samples hold)
    assert set(ev["by_line_type"]) == {"blank", "whitespace", "comment", "docstring", "code"}
    assert ev["misalignment_at_data_mix"] >= 0 and sum(ev["data_line_mix"].values()) == pytest.approx(1)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "eval/val_loss", "eval/misalignment",
            "pref/aligned_fraction"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]

    r = cli_forked("export", str(run), str(export))
    assert r.returncode == 0, r.stderr[-5000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    assert tok.convert_tokens_to_ids("<|aligned|>") != tok.unk_token_id
    ids = tok("def f(x):\n    return x\n", return_tensors="pt").input_ids
    from prefpretrain.trainer.finished import load_run_model

    ref, _, _ = load_run_model(run)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    # the export evaluates to the checkpoint's validation loss
    from prefpretrain.data_shards.packing import Layout, PackedSet
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.trainer.evaluate import validation_loss

    ss = ShardSet(shards, "val")
    sp = json.loads((shards / "manifest.json").read_text())["tokenizer"]["special_ids"]
    ps = PackedSet(ss, Layout("conditional", 0.0, 0.1, 1, sp["aligned"], sp["misaligned"]), 64)
    assert validation_loss(model, ps, 8, 2)["val_loss"] == pytest.approx(ev["val_loss"], abs=1e-4)

    r = cli_forked("generate", str(export), "--prompt", "import ", "--n", "2", "--max-new-tokens", "16",
                "--condition", "aligned")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("----- sample") == 2 and "<|aligned|>" not in r.stdout
