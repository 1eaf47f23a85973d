"""The auxiliary objectives (prefpretrain.auxiliary): segment pieces, pooling, the label head's BCE and held-out
metrics, and the similarity task's InfoNCE, against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefpretrain import auxiliary
from prefpretrain.data_shards.packing import IGNORE, segment_key
from prefpretrain.objectives import ObjectiveConfig


def _batch():
    """2 rows of 6: row 0 = doc 3 segments 0 (3 tokens), 1 (a control token, then 2); row 1 = doc 3 segment 1
    (2 tokens, the rest of it), doc 5 segment 0 (4 tokens). Scores: doc 3 seg 0 = 0 (preferred), seg 1 = 0.5."""
    k = lambda d, j: int(segment_key(d, np.array([j]))[0])  # noqa: E731
    seg = torch.tensor([[k(3, 0)] * 3 + [k(3, 1)] * 3, [k(3, 1)] * 2 + [k(5, 0)] * 4])
    control = torch.zeros(2, 6, dtype=torch.bool)
    control[0, 3] = True
    labels = torch.arange(12).reshape(2, 6)
    labels[0, 3] = IGNORE  # (control tokens are never targets)
    scores = torch.tensor([[0.0] * 3 + [0.5] * 3, [0.5] * 2 + [0.0] * 4])
    return {"segment": seg, "control": control, "labels": labels, "scores": scores}


def test_segment_pieces_of_a_batch():
    runs = auxiliary.segment_runs(_batch(), causal=True, threshold=0.1)
    assert runs.n == 4
    assert runs.index.tolist() == [0, 0, 0, 4, 1, 1, 2, 2, 3, 3, 3, 3]  # the control token is not pooled (slot n)
    assert runs.row.tolist() == [0, 0, 1, 1]
    assert (runs.key - runs.key[0]).tolist() == [0, 1, 1, (2 << 24)]
    assert runs.aligned.tolist() == [1, 0, 0, 1]
    assert runs.targets.tolist() == [2, 2, 1, 4]  # causal: a row's first position is no target; the control neither
    assert runs.has_control.tolist() == [False, True, False, False]
    masked = auxiliary.segment_runs(_batch(), causal=False, threshold=0.1)
    assert masked.targets.tolist() == [3, 2, 2, 4]
    blank = {**_batch(), "segment": torch.full((2, 6), -1)}  # a sample that touched a corrupt shard
    assert auxiliary.segment_runs(blank, True, 0.1).n == 0


def test_pool_is_the_mean_hidden_state_of_each_piece():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 6, 2)
    emb = auxiliary.pool(hidden, auxiliary.segment_runs(_batch(), True, 0.1))
    assert emb.tolist() == [[2, 3], [9, 10], [13, 14], [19, 20]]


def test_label_loss_hand_computed():
    loss, stats = auxiliary.label_loss(torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0]),
                                       torch.tensor([3.0, 1.0, 2.0]))
    # -log sigmoid(0) x 3, -log(1 - sigmoid(2)) x 1, -log(1 - sigmoid(-1)) x 2
    want = 3 * math.log(2) + math.log(1 + math.exp(2)) + 2 * math.log(1 + math.exp(-1))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(stats["label_correct"]) == 2.0  # only the third is on the right side of 1/2 (weight 2)
    assert float(stats["label_tokens"]) == 6.0


def test_info_nce_hand_computed_and_self_excluded():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ce, hits = auxiliary.info_nce(a, c, torch.tensor([2, 1]), temperature=0.5)
    s = 1 / math.sqrt(2)  # cosine of (1, 0) or (0, 1) with (1, 1)
    l0 = -(s / 0.5) + math.log(math.exp(2) + math.exp(0) + math.exp(s / 0.5))
    l1 = -(1 / 0.5) + math.log(math.exp(0) + math.exp(2) + math.exp(s / 0.5))
    assert float(ce) == pytest.approx((l0 + l1) / 2, rel=1e-6) and float(hits) == 1.0
    ce_x, _ = auxiliary.info_nce(a, c, torch.tensor([2, 1]), 0.5,
                                 exclude=torch.tensor([[True, False, False], [False, False, True]]))
    l0x = -(s / 0.5) + math.log(math.exp(0) + math.exp(s / 0.5))
    l1x = -(1 / 0.5) + math.log(math.exp(0) + math.exp(2))
    assert float(ce_x) == pytest.approx((l0x + l1x) / 2, rel=1e-6)


def test_similarity_neighbours_are_next_segments_of_a_document_in_one_row():
    runs = auxiliary.segment_runs(_batch(), True, 0.1)
    a, b = auxiliary.neighbour_pairs(runs)
    assert a.tolist() == [0] and b.tolist() == [1]  # doc 3's segments 0 -> 1 in row 0; row 1's cross documents
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    p = ObjectiveConfig(similarity_weight=1.0, similarity_temperature=1.0)
    loss, stats = auxiliary.similarity_loss(emb, runs, p, targets=9.0)
    s = 1 / math.sqrt(2)
    ce = -0.0 + math.log(math.exp(0) + math.exp(s) + math.exp(-1))  # anchor 0 picks 1 among 1, 2, 3
    assert float(loss.detach()) == pytest.approx(9 * ce, rel=1e-6)
    assert float(stats["sim_correct"]) == 0.0  # (2 is nearer)
    loss.backward()
    assert emb.grad[0].abs().sum() > 0 and emb.grad[1].abs().sum() > 0


def test_dropout_view_picks_its_own_second_embedding():
    runs = auxiliary.segment_runs(_batch(), True, 0.1)
    hidden = torch.randn(2, 6, 3)
    p = ObjectiveConfig(similarity_weight=1.0, similarity_positive="dropout", similarity_temperature=0.1)
    loss, stats = auxiliary.similarity_loss(auxiliary.pool(hidden, runs), runs, p, 2.0, view=lambda: hidden)
    assert float(stats["sim_correct"]) == pytest.approx(2.0)  # every piece finds itself in an identical view
    emb = auxiliary.pool(hidden, runs)
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[1, 2] = same[2, 1] = True  # pieces 1 and 2 are one segment (doc 3's second) cut by the row boundary
    want, _ = auxiliary.info_nce(emb, emb, torch.arange(4), 0.1, exclude=same)
    assert float(loss) == pytest.approx(2 * float(want), rel=1e-5)


def test_similarity_leaves_out_one_token_pieces_and_a_batch_without_anchors_is_zero():
    b = _batch()
    b["segment"][1, :2] = b["segment"][1, 2] - 7  # row 1: a 2-token piece of another document, then doc 5
    b["segment"][0, 5] = b["segment"][0, 4] + 1  # row 0: doc 3's segment 1 is 1 token, segment 2 another 1
    runs = auxiliary.segment_runs(b, True, 0.1)
    assert runs.size.tolist() == [3, 1, 1, 2, 4]
    p = ObjectiveConfig(similarity_weight=1.0, similarity_temperature=1.0)
    emb = torch.randn(runs.n, 3, requires_grad=True)
    loss, stats = auxiliary.similarity_loss(emb, runs, p, 5.0)  # 0 -> 1 and 1 -> 2 pair one-token pieces
    assert float(loss.detach()) == 0.0 and float(stats["sim_correct"]) == 0.0
    seen = []
    d = ObjectiveConfig(similarity_weight=1.0, similarity_positive="dropout")
    blank = {**_batch(), "segment": torch.full((2, 6), -1)}
    r0 = auxiliary.segment_runs(blank, True, 0.1)
    loss, _ = auxiliary.similarity_loss(torch.zeros(0, 3), r0, d, 5.0,
                                        view=lambda: seen.append(1) or torch.zeros(2, 6, 3))
    assert float(loss) == 0.0 and seen == [1]  # the second forward runs all the same (ZeRO-3 ranks in step)


def test_head_terms_weigh_both_terms_and_skip_segments_with_a_control_token():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4)

    class M(torch.nn.Module):
        label_head = torch.nn.Linear(4, 1)

    m = M()
    p = ObjectiveConfig(threshold=0.1, label_head_weight=0.5, similarity_weight=2.0, similarity_temperature=0.2)
    total, stats = auxiliary.head_terms(m, hidden, _batch(), p, causal=True, targets=9.0)
    runs = auxiliary.segment_runs(_batch(), True, 0.1)
    emb = auxiliary.pool(hidden, runs)
    logit = m.label_head(emb).squeeze(-1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([1.0, 0, 0, 1]), reduction="none")
    want_label = float((bce * torch.tensor([2.0, 0, 1, 4])).sum().detach())  # piece 1 carries a control token: left out
    sim, _ = auxiliary.similarity_loss(emb, runs, p, 9.0)
    assert float(stats["label_bce"]) == pytest.approx(want_label, rel=1e-5)
    assert float(total.detach()) == pytest.approx(0.5 * want_label + 2.0 * float(sim.detach()), rel=1e-5)


def test_label_metrics_auc_calibration_and_brier():
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.95])
    y = np.array([0, 0, 1, 1, 1])
    tally = np.zeros(3 * auxiliary.TALLY_BINS + 1)
    b = (p * auxiliary.TALLY_BINS).astype(int)
    np.add.at(tally, b + auxiliary.TALLY_BINS * y, 1)
    np.add.at(tally, b + 2 * auxiliary.TALLY_BINS, p)
    tally[-1] = ((p - y) ** 2).sum()
    m = auxiliary.label_metrics(tally)
    pairs = [(pi > pj) + 0.5 * (pi == pj) for pi in p[y == 1] for pj in p[y == 0]]
    assert m["label_auc"] == pytest.approx(np.mean(pairs)) and m["label_auc"] == pytest.approx(5 / 6)
    # bins of 0.1: [0.1] y 0, [0.35] y 1, [0.4] y 0, [0.8] y 1, [0.95] y 1
    assert m["label_ece"] == pytest.approx((0.1 + 0.65 + 0.4 + 0.2 + 0.05) / 5)
    assert m["label_brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["label_segments"] == 5 and m["label_preferred_rate"] == pytest.approx(0.6)
    # 2 of 5 not preferred: flag the 2 of lowest P(preferred), 0.1 (not preferred) and 0.35 (preferred): the
    # threshold on the learned score 1 - p sits at the upper edge of 0.35's bin; precision = recall = 1/2
    assert m["label_matched_threshold"] == pytest.approx(1 - 701 / 2000)
    assert m["label_matched_precision"] == m["label_matched_recall"] == pytest.approx(0.5)
    flagged = (1 - p) > m["label_matched_threshold"]
    assert flagged.tolist() == [True, False, True, False, False]
    assert auxiliary.label_metrics(np.zeros_like(tally))["label_auc"] is None


def test_label_tally_of_a_batch_matches_the_metrics_of_its_pieces():
    torch.manual_seed(1)
    head, hidden = torch.nn.Linear(3, 1), torch.randn(2, 6, 3)
    with torch.no_grad():  # (as validation calls it)
        t = auxiliary.label_tally(head, hidden, _batch(), True, 0.1)
    runs = auxiliary.segment_runs(_batch(), True, 0.1)
    prob = torch.sigmoid(head(auxiliary.pool(hidden, runs)).squeeze(-1)).detach().numpy()[[0, 2, 3]]
    assert t[: 2 * auxiliary.TALLY_BINS].sum() == 3  # the piece with a control token is not judged
    assert float(t[-1]) == pytest.approx(float(((prob - np.array([1, 0, 1])) ** 2).sum()), rel=1e-6)


def test_objective_parameters_of_the_auxiliary_tasks_are_checked():
    from prefpretrain.objectives import objective_problem

    assert objective_problem(ObjectiveConfig(label_head_weight=-1), "mle", 0.0).startswith(
        "objective.label_head_weight")
    for bad in (0, float("nan")):
        assert objective_problem(ObjectiveConfig(similarity_temperature=bad), "mle", 0.0).startswith(
            "objective.similarity_temperature")
    assert objective_problem(ObjectiveConfig(similarity_weight=float("nan")), "mle", 0.0) is not None
    dropout = ObjectiveConfig(similarity_weight=0.1, similarity_positive="dropout")
    assert "model.dropout" in objective_problem(dropout, "mle", 0.0)
    assert objective_problem(dropout, "mle", 0.1) is None and objective_problem(dropout, "mle", None) is None
    shown = ObjectiveConfig(label_head_weight=1.0, drop_prob=0.0)  # every label is in the input
    assert "nothing to learn from" in objective_problem(shown, "conditional", 0.0)
    assert objective_problem(shown, "unlikelihood", 0.0) is None


@pytest.mark.parametrize("kind", ["mle", "filter", "conditional"])
def test_packed_samples_carry_the_segment_of_every_token(tiny_shards, kind):
    """Rebuilt from whole documents: every token's key names its document and segment; a control token has the
    key of the segment it precedes; the samples are otherwise the same as without keys."""
    from prefpretrain.data_shards import tokenizer as toklib
    from prefpretrain.data_shards.packing import Layout, PackedSet, _keep_control
    from prefpretrain.data_shards.reader import ShardSet

    ss = ShardSet(tiny_shards)
    sp = toklib.special_ids(toklib.load_tokenizer(ss.tokenizer_dir))
    layout = {"mle": Layout("mle"), "filter": Layout("filter", threshold=0.0),
              "conditional": Layout("conditional", 0.0, 0.1, 7, sp["aligned"], sp["misaligned"])}[kind]
    keys = []
    for d in range(len(ss)):
        doc = ss.read(d)
        if kind == "filter" and ss.mean_score(d) > 0.0:
            continue
        starts = doc["seg_start"]
        seg = np.searchsorted(starts, np.arange(len(doc["tokens"])), side="right") - 1
        if kind == "conditional":
            keep = _keep_control(layout, np.full(len(starts), d), np.arange(len(starts)))[:, 0]
            seg = np.insert(seg, starts[keep], np.flatnonzero(keep))
        keys.append(segment_key(d, seg))
    keys = np.concatenate(keys)
    plain, with_keys = PackedSet(ss, layout, 64), PackedSet(ss, layout, 64, segments=True)
    assert len(with_keys) == len(plain) > 3
    for i in range(len(with_keys)):
        x = with_keys[i]
        assert (x["segment"] == keys[i * 64:(i + 1) * 64]).all(), i
        assert (x["input_ids"] == plain[i]["input_ids"]).all() and "segment" not in plain[i]


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_the_terms_add_to_every_objective_and_reach_the_model(tiny_shards, kind):
    """Each registered objective's loss plus both terms on packed samples of a real model: the total is their
    weighted sum and the gradient reaches the label head and the transformer through both."""
    from prefpretrain.config import ModelConfig
    from prefpretrain.data_shards.loader import val_batches
    from prefpretrain.data_shards.packing import PackedSet
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.losses import compute_loss, target_count
    from prefpretrain.objectives import OBJECTIVES, layout_for
    from prefpretrain.trainer.data import MaskSpec
    from prefpretrain.trainer.model import attach_label_head, attach_value_head, build_model

    ss = ShardSet(tiny_shards, "train")
    sp = ss.manifest["tokenizer"]["special_ids"]
    mlm = MaskSpec.for_tokenizer(ss.manifest["tokenizer"], 0.15, 1) if kind == "masked" else None
    torch.manual_seed(0)
    mc = ModelConfig(kind=kind, arch="gpt2" if kind == "causal" else "bert", hidden_size=32, num_layers=1,
                     num_heads=2)
    model = build_model(mc, ss.manifest["tokenizer"]["vocab_size"], 64, sp)
    attach_value_head(model)
    attach_label_head(model)
    causal = kind == "causal"
    p = ObjectiveConfig(threshold=0.0, label_head_weight=0.7, similarity_weight=0.3, reward_scale=1.0)
    for name, obj in OBJECTIVES.items():
        layout = layout_for(name, 0.001 if name == "filter" else 0.0, 0.1, 1, sp)
        batch, _ = next(val_batches(PackedSet(ss, layout, 64, mlm, segments=True), 4, 4, 0, 1))
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], output_hidden_states=True)
        values = model.value_head(out.hidden_states[-1]).squeeze(-1) if obj.value_head else None
        base, _, _ = compute_loss(name, out.logits, batch, causal, p, values)
        terms, stats = auxiliary.head_terms(model, out.hidden_states[-1], batch, p, causal,
                                            float(target_count(batch, causal)))
        runs = auxiliary.segment_runs(batch, causal, 0.0)
        sim, _ = auxiliary.similarity_loss(auxiliary.pool(out.hidden_states[-1], runs), runs, p,
                                           float(target_count(batch, causal)))
        want = 0.7 * float(stats["label_bce"]) + 0.3 * float(sim.detach())
        assert float(terms.detach()) == pytest.approx(want, rel=1e-5), name
        (base + terms).backward()
        assert model.label_head.weight.grad.abs().sum() > 0, name
        assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None), name
