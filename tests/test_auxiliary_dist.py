"""The label head and the similarity task on 2 ranks: with the objectives, at every ZeRO stage, causal and masked,
checkpointed and resumed at another world size, and judged by `evaluate`."""
from __future__ import annotations

import math

import pytest

from tests.conftest import crash_after, launch_tiny, read_metrics

pytestmark = pytest.mark.dist

HEADS = {"objective.label_head_weight": 1.0, "objective.similarity_weight": 0.5, "train.log_every": 1,
         "eval.samples": 0, "train.lr": "1.0e-2"}
FORCE_PARTITIONING = ("{zero_optimization: {stage3_param_persistence_threshold: 0, stage3_max_live_parameters: 1, "
                      "stage3_max_reuse_distance: 0}}")


def _mean(xs):
    return sum(xs) / len(xs)


def test_heads_train_with_conditional_the_same_under_zero2_and_zero3(tiny_shards, tmp_path):
    """ZeRO-3 with partitioning forced: the heads' parameters are gathered when they are called outside the
    model's forward (on every rank: a rank that pads the validation split calls the head too, or the other
    waits on its gather), and the losses are those of ZeRO-2."""
    kw = {**HEADS, "train.objective": "conditional", "train.max_steps": 12, "checkpoint.every_steps": 0,
          "eval.every_steps": 6, "eval.val_samples": 9}  # 5 validation batches of 2 on 2 ranks: one pads
    launch_tiny(tiny_shards, tmp_path / "z2", **kw, **{"engine.zero_stage": 2})
    launch_tiny(tiny_shards, tmp_path / "z3", **kw, **{"engine.zero_stage": 3, "engine.deepspeed": FORCE_PARTITIONING})
    a, b = read_metrics(tmp_path / "z2"), read_metrics(tmp_path / "z3")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)
    assert all(math.isfinite(r[k]) for r in a for k in ("label_bce", "similarity_loss", "nll"))
    assert _mean([r["label_bce"] for r in a[-3:]]) < _mean([r["label_bce"] for r in a[:3]])  # the head learns
    assert _mean([r["similarity_loss"] for r in a[-3:]]) < _mean([r["similarity_loss"] for r in a[:3]])
    # conditional: segments behind a control token are left out, so the head trains on the ~10 % of segments
    # whose control was dropped and on the pieces of segments whose control is in the row before
    assert all(0.03 < r["label_token_fraction"] < 0.5 and 0 <= r["label_accuracy"] <= 1 for r in a)
    assert _mean([r["label_accuracy"] for r in a[-3:]]) > 0.5
    ev = read_metrics(tmp_path / "z3", "eval")
    assert [r["step"] for r in ev] == [6, 12] and all(0 <= r["eval/label_auc"] <= 1 for r in ev)
    assert all(0 <= r["eval/label_ece"] <= 1 and 0 <= r["eval/label_brier"] <= 1 for r in ev)


def test_heads_on_a_masked_model_with_filter_at_zero0_and_dropout_views(tiny_shards, tmp_path):
    from prefpretrain.trainer.evaluate import evaluate_run

    run = tmp_path / "bert"
    launch_tiny(tiny_shards, run, **HEADS, **{
        "model.kind": "masked", "model.arch": "bert", "model.dropout": 0.1, "train.objective": "filter",
        "objective.threshold": 0.001, "objective.similarity_positive": "dropout", "engine.zero_stage": 0,
        "train.max_steps": 10, "checkpoint.every_steps": 10, "eval.every_steps": 0})
    m = read_metrics(run)
    assert all(math.isfinite(r["label_bce"]) and math.isfinite(r["similarity_loss"]) for r in m)
    # a dropout view of a segment is nearer to it than the batch's other segments are, and more so with training
    assert _mean([r["similarity_accuracy"] for r in m[-3:]]) > 0.5
    res = evaluate_run(run, samples=0, out=tmp_path / "eval.json")
    assert res["label_segments"] > 0 and 0 <= res["label_auc"] <= 1 and math.isfinite(res["val_loss"])


def test_heads_with_awr_resume_at_another_world_size_exactly(tiny_shards, tmp_path):
    """The value and label heads are checkpointed with the model, through the universal conversion."""
    kw = {**HEADS, "train.objective": "awr", "engine.zero_stage": 1, "train.precision": "fp32",
          "train.max_steps": 6, "checkpoint.every_steps": 3, "eval.every_steps": 0, "checkpoint.keep_last": 5}
    ref = tmp_path / "ref"
    launch_tiny(tiny_shards, ref, 2, **kw)
    again = tmp_path / "again"
    crash_after(ref, again, 3)
    r = launch_tiny(tiny_shards, again, 1, **kw)
    assert "at step 3" in r.stderr
    want = {k: [m[k] for m in read_metrics(ref)] for k in ("loss", "label_bce", "similarity_loss", "value_mse")}
    got = read_metrics(again)
    for k, v in want.items():
        assert [m[k] for m in got] == pytest.approx(v, abs=1e-5), k
    # turning a head off (or on) at a resume is one line, not DeepSpeed's missing keys
    r = launch_tiny(tiny_shards, again, 1, expect=2, **{**kw, "objective.label_head_weight": 0.0})
    assert "trained with heads ['label_head', 'value_head'], this config has ['value_head']" in r.stderr
