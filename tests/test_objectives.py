"""The six objectives on hand-computed tensors, the adversarial term, labels that blame the right line,
the sampler's control-token protocol, the evaluation statistics, and a short 2-rank training of each."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prefpretrain.config import AdversarialConfig, load_config
from prefpretrain.data_shards.packing import IGNORE
from prefpretrain.data_shards.scorers import Pep8Scorer
from prefpretrain.data_shards.segment import line_spans
from prefpretrain.data_shards.sources import Document
from prefpretrain.losses import compute_loss
from prefpretrain.objectives import ObjectiveConfig, exp_weights, layout_for, reward_scale_for
from prefpretrain.trainer.evaluate import bootstrap_ci, expected_max, interval_covers, summarize_scores
from tests.conftest import launch_tiny, read_metrics
from tests.ranks import cli_forked

SP = {"aligned": 2, "misaligned": 3}


def _batch(probs_of_target: list[float], scores: list[float]) -> tuple[torch.Tensor, dict]:
    """A masked-LM style batch (no shift) with vocabulary 2 where p(target = token 0) is given per position."""
    p = torch.tensor(probs_of_target, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1).unsqueeze(0)  # (1, T, 2)
    labels = torch.zeros(1, len(p), dtype=torch.long)
    return logits, {"labels": labels, "scores": torch.tensor([scores], dtype=torch.float32)}


def test_mle_filter_conditional_are_summed_nll():
    logits, b = _batch([0.5, 0.25], [0.0, 1.0])
    for obj in ("mle", "filter", "conditional"):
        loss, n, _ = compute_loss(obj, logits, b, causal=False)
        assert n == 2 and float(loss) == pytest.approx(math.log(2) + math.log(4))


def test_unlikelihood_on_a_known_distribution_and_threshold_zero_means_zero():
    logits, b = _batch([0.8, 0.8, 0.8], [0.0, 1e-6, 0.5])
    p = ObjectiveConfig(threshold=0.0, ul_alpha=0.5)
    loss, n, st = compute_loss("unlikelihood", logits, b, causal=False, p=p)
    # score 0 <= threshold 0 is aligned (NLL); 1e-6 and 0.5 are misaligned: alpha * -log(1 - 0.8)
    assert n == 3 and st["misaligned_tokens"] == 2
    assert float(loss) == pytest.approx(-math.log(0.8) + 2 * 0.5 * -math.log(0.2), rel=1e-6)
    # a higher threshold makes the 1e-6 token aligned
    p2 = ObjectiveConfig(threshold=1e-3, ul_alpha=0.5)
    loss2, _, st2 = compute_loss("unlikelihood", logits, b, causal=False, p=p2)
    assert st2["misaligned_tokens"] == 1
    assert float(loss2) == pytest.approx(-2 * math.log(0.8) + 0.5 * -math.log(0.2), rel=1e-6)


def test_unlikelihood_gradient_pushes_misaligned_probability_down():
    logits, b = _batch([0.6], [1.0])
    logits = logits.clone().requires_grad_(True)
    loss, _, _ = compute_loss("unlikelihood", logits, b, causal=False, p=ObjectiveConfig(ul_alpha=1.0))
    loss.backward()
    assert logits.grad[0, 0, 0] > 0 > logits.grad[0, 0, 1]  # gradient descent lowers the target's logit


def test_rwr_weights_vary_with_the_score():
    logits, b = _batch([0.5, 0.5, 0.5], [0.0, 0.03, 0.06])
    p = ObjectiveConfig(beta=1.0, reward_scale=1 / 0.03)
    loss, _, st = compute_loss("rwr", logits, b, causal=False, p=p)
    w = [1.0, math.exp(-1), math.exp(-2)]
    assert float(st["weight"]) == pytest.approx(sum(w), rel=1e-5)
    assert float(loss) == pytest.approx(math.log(2) * sum(w), rel=1e-5)
    # PHF's RWR slip: unscaled PEP8 scores with beta 10 weight everything ~1, i.e. MLE
    _, _, flat = compute_loss("rwr", logits, b, causal=False, p=ObjectiveConfig(beta=10.0, reward_scale=1.0))
    assert float(flat["weight"]) == pytest.approx(3.0, abs=0.01)


def test_weights_are_clamped():
    assert float(exp_weights(torch.tensor(100.0), 1.0, 1000.0)) == pytest.approx(1000.0)
    assert float(exp_weights(torch.tensor(-1.0), 2.0, 1000.0)) == pytest.approx(math.exp(-0.5))


def test_awr_hand_computed_and_no_gradient_through_the_weights():
    logits, b = _batch([0.5, 0.25], [0.0, 0.1])
    values = torch.tensor([[0.2, -0.5]], requires_grad=True)
    p = ObjectiveConfig(beta=2.0, awr_alpha=0.25, reward_scale=10.0)
    loss, n, st = compute_loss("awr", logits, b, causal=False, p=p, values=values)
    r = np.array([0.0, -1.0])
    v = np.array([0.2, -0.5])
    w = np.exp((r - v) / 2.0)
    nll = np.array([math.log(2), math.log(4)])
    expect = 0.25 * (nll * w).sum() + 0.75 * ((v - r) ** 2).sum()
    assert n == 2 and float(loss.detach()) == pytest.approx(expect, rel=1e-5)
    assert float(st["weight"]) == pytest.approx(w.sum(), rel=1e-5)
    loss.backward()  # the value head learns from the MSE alone
    assert values.grad.numpy()[0] == pytest.approx(0.75 * 2 * (v - r), rel=1e-5)
    with pytest.raises(ValueError, match="value head"):
        compute_loss("awr", logits, b, causal=False, p=p)


def test_causal_shift_lines_scores_up_with_targets():
    """Causal: the logits at t predict token t+1, whose score is scores[t+1]."""
    T, V = 4, 3
    logits = torch.zeros(1, T, V)
    b = {"labels": torch.tensor([[0, 1, 2, IGNORE]]), "scores": torch.tensor([[9.0, 0.0, 1.0, 9.0]])}
    loss, n, st = compute_loss("unlikelihood", logits, b, causal=True, p=ObjectiveConfig(ul_alpha=1.0))
    assert n == 2 and st["misaligned_tokens"] == 1  # targets 1 (score 0) and 2 (score 1); IGNORE dropped
    assert float(loss) == pytest.approx(math.log(3) - math.log(1 - 1 / 3), rel=1e-6)


def test_auto_reward_scale_makes_a_typical_bad_segment_minus_one():
    summary = {"segments": 100, "mean_per_segment": 0.002, "zero_fraction": 0.9}
    assert reward_scale_for(0.0, summary) == pytest.approx(1 / 0.02)
    assert reward_scale_for(5.0, summary) == 5.0
    assert reward_scale_for(0.0, {"segments": 10, "mean_per_segment": 0.0, "zero_fraction": 1.0}) == 1.0


def test_layouts_per_objective():
    assert layout_for("filter", 0.0, 0.1, 0, {**SP}).kind == "filter"
    assert layout_for("conditional", 0.0, 0.1, 0, {**SP}).drop_prob == 0.1
    for obj in ("unlikelihood", "rwr", "awr", "mle"):
        lay = layout_for(obj, 0.0, 0.1, 0, {**SP})
        assert lay.kind == "mle" and lay.drop_prob == 0.0
    with pytest.raises(ValueError, match="unknown objective"):
        layout_for("dpo", 0.0, 0.1, 0, {**SP})


def test_objective_config_is_checked():
    with pytest.raises(ValueError, match="train.objective"):
        load_config("configs/tiny.yaml", ["train.objective=ppo"])
    with pytest.raises(ValueError, match="objective.beta"):
        load_config("configs/tiny.yaml", ["objective.beta=0"])
    with pytest.raises(ValueError, match="objective.awr_alpha"):
        load_config("configs/tiny.yaml", ["objective.awr_alpha=1.5"])
    with pytest.raises(ValueError, match="adversarial.epsilon"):
        load_config("configs/tiny.yaml", ["adversarial.steps=1", "adversarial.epsilon=0"])
    assert load_config("configs/tiny.yaml").adversarial.steps == 0  # off by default


# ---------------------------------------------------------------- adversarial term


def test_adversarial_perturbation_stays_in_the_ball_and_reaches_the_parameters():
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefpretrain.trainer.adversarial import adversarial_term

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    ids = torch.randint(0, 50, (2, 12))
    clean = model(input_ids=ids).logits
    mask = torch.ones(2, 11, dtype=torch.bool)
    cfg = AdversarialConfig(steps=3, epsilon=0.05, step_size=0.02, init_std=0.001, weight=2.0)
    term, st = adversarial_term(model, {"input_ids": ids}, clean, mask, cfg, causal=True,
                                generator=torch.Generator().manual_seed(1))
    assert float(term.detach()) > 0 and st["adv_kl"] > 0
    assert st["adv_delta_norm"] <= 0.05 + 1e-6
    assert all(p.grad is None for p in model.parameters())  # the ascent steps touched no parameter gradient
    term.backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    # ascent increases the KL over the random start
    cfg0 = AdversarialConfig(steps=0, epsilon=0.05, step_size=0.02, init_std=0.001, weight=2.0)
    t0, _ = adversarial_term(model, {"input_ids": ids}, clean, mask, cfg0, causal=True,
                             generator=torch.Generator().manual_seed(1))
    assert float(term.detach()) > float(t0.detach())


# ---------------------------------------------------------------- labels that blame the right line


def _line_scores(text: str, **kw) -> list[float]:
    return Pep8Scorer(**kw).score(Document("t.py", "t.py", text), line_spans(text))


def test_too_many_blank_lines_are_blamed_on_the_blank_line():
    text = "import os\n\n\n\ndef f():\n    pass\n"  # E303 reported on the def (line 5)
    s = _line_scores(text)
    assert s[3] > 0 and s[4] == 0.0  # charged to the last blank line, not to `def f():`
    raw = _line_scores(text, attribute_context=False)
    assert raw[4] > 0 and raw[3] == 0.0


def test_blank_line_after_decorator_is_blamed_on_it_and_missing_blank_lines_on_the_def():
    s = _line_scores("import functools\n\n\n@functools.cache\n\ndef f():\n    pass\n")
    assert s[4] > 0 and s[5] == 0.0  # E304: the blank line between decorator and def
    s = _line_scores("import os\ndef f():\n    pass\n")
    assert s[0] == 0.0 and s[1] > 0  # E302: the def written without blank lines before it


def test_style_scorer_ignores_contextual_codes():
    text = "import os\ndef f( a ):\n    return a\n"
    full, style = _line_scores(text), _line_scores(text, style_only=True)
    assert full[1] > style[1] > 0  # E302 counted by pep8 only; E201/E202 by both


def test_pep8_scorer_survives_pycodestyle_crash():
    # a model sample (shrunk) on which pycodestyle's continued_indentation raises IndexError
    text = ('    def __getitem__(self, _init__(self):\n        """class__\n'
            '        """    """Return a process should be used by an __init__(self):\n')
    v = Pep8Scorer().violations(text)
    assert (1, "E113") in v and any(c == "E901" for _, c in v)
    assert _line_scores(text)[0] > 0
    # module_imports_on_top_of_file reads line[1] of a one-letter string prefix ("b", "r", ...) at the top
    assert Pep8Scorer().violations("b\nimport os  \n") == [(2, "W291")]


def test_top_p_nucleus_matches_a_full_sort_and_draws_follow_it():
    from prefpretrain.trainer.sampling import draw, top_p_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 500, generator=g) * 3
    logits[:, :5] = float("-inf")  # banned tokens
    for top_p in (0.5, 0.9, 0.99):
        got = top_p_probs(logits, top_p)
        # reference: sort the whole row, keep tokens while the mass before them is <= top_p
        p = torch.softmax(logits, -1)
        srt, idx = torch.sort(p, descending=True, dim=-1)
        keep = (srt.cumsum(-1) - srt) <= top_p
        ref = torch.zeros_like(p).scatter(-1, idx, srt * keep)
        assert torch.allclose(got, ref)
        assert (got[:, :5] == 0).all() and ((got > 0).sum(-1) < 500).all()
    # three tokens with probabilities 0.5 / 0.3 / 0.2, top-p 0.7: the nucleus is the first two, drawn 5 : 3
    row = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(20000, 3)
    x = draw(top_p_probs(row, 0.7), torch.Generator().manual_seed(1))
    freq = torch.bincount(x, minlength=3).float() / len(x)
    assert freq[2] == 0 and abs(float(freq[0]) - 0.625) < 0.015


# ---------------------------------------------------------------- evaluation statistics


def test_expected_max_and_bootstrap():
    x = np.array([0.0, 1.0, 2.0, 5.0, 3.0])
    for k in (1, 2, 3, 5):
        brute = np.mean([max(c) for c in itertools.combinations(x, k)])
        assert expected_max(x, k) == pytest.approx(brute)
    lo, hi = bootstrap_ci(np.random.default_rng(0).normal(1.0, 1.0, 400))
    assert lo < 1.0 < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)
    s = summarize_scores([0.0, 0.0, 0.2, 0.4], texts=["x = 1\n", "def (:\n", "y = 2\n", "if x:\n"], k=2)
    assert s["misalignment"] == pytest.approx(0.15) and s["misalignment_zero_fraction"] == 0.5
    assert s["parse_fraction"] == 0.5 and s["misalignment_parsed"] == pytest.approx(0.1)
    assert s["interval_covers"].startswith("sampling noise only")


def test_intervals_over_several_training_seeds_cover_their_variation():
    """Two seeds whose models differ (means 1 and 2, 500 samples each): resampling the pooled samples gives a
    narrow interval (it ignores that a third seed could land anywhere); the two-level bootstrap resamples the
    seeds first and is as wide as their difference. One seed: both are the same bootstrap."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(1.0, 0.5, 500), rng.normal(2.0, 0.5, 500)])
    seeds = np.repeat([1, 2], 500)
    flat = bootstrap_ci(x)
    two = bootstrap_ci(x, groups=seeds)
    assert flat[1] - flat[0] < 0.1  # about 4 x 0.5 x 1.5 / sqrt(1000)
    assert two[0] < 1.1 and two[1] > 1.9  # a draw of seed 1 twice, or seed 2 twice, is as likely as one each
    assert bootstrap_ci(x[:500], groups=seeds[:500]) == bootstrap_ci(x[:500])
    assert interval_covers(2).startswith("seed-to-seed variation (2 training seeds)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from phf_experiment import Pooled, bootstrap_ci_of, pooled, ratio_ci

    res = [{"seed": sd, "auto": {"by_scorer": {"pep8": {"sample_scores": list(x[seeds == sd])}}}} for sd in (1, 2)]
    p = pooled(res, "auto", "pep8")
    assert isinstance(p, Pooled) and list(np.unique(p.seeds)) == [1, 2]
    assert bootstrap_ci_of(p)["ci95"] == list(two) and "2 training seeds" in bootstrap_ci_of(p)["interval_covers"]
    r = ratio_ci(p, p)
    assert r[0] == pytest.approx(1.0) and r[1] < 0.8 and r[2] > 1.2  # seed-level spread in the ratio, too
    # the samples that parse alone (code), when the evaluations recorded which parse
    assert pooled(res, "auto", "pep8", parsed=True) is None and ratio_ci(None, p) is None
    for r_ in res:
        r_["auto"]["by_scorer"]["pep8"]["sample_parses"] = [int(i % 4 == 0) for i in range(500)]
    q = pooled(res, "auto", "pep8", parsed=True)
    assert len(q) == 250 and list(np.unique(q.seeds)) == [1, 2]
    assert np.array_equal(q[:125], x[:500][::4])


# ---------------------------------------------------------------- each objective trains on 2 ranks


@pytest.mark.dist
@pytest.mark.parametrize("objective", ["filter", "unlikelihood", "rwr", "awr"])
def test_each_objective_trains_on_two_ranks(tiny_shards, tmp_path, objective):
    """(mle and conditional train in test_train_dist.py / test_engine.py.)"""
    run = tmp_path / objective
    threshold = 0.001 if objective == "filter" else 0.0
    launch_tiny(tiny_shards, run, **{"train.objective": objective, "train.max_steps": 12, "train.log_every": 1,
                                     "train.lr": "1.0e-2", "eval.samples": 0, "checkpoint.every_steps": 0,
                                     "eval.every_steps": 0, "objective.threshold": threshold})
    m = read_metrics(run)
    nll = [r["nll"] for r in m]
    assert len(nll) == 12 and all(math.isfinite(x) for x in nll)
    assert sum(nll[-3:]) / 3 < sum(nll[:3]) / 3 - 0.3  # it learns the language model
    if objective == "filter":  # trained on the documents with a mean score <= 0.001 only (of up to 0.008 here)
        import json

        from prefpretrain.data_shards.reader import ShardSet

        ss = ShardSet(tiny_shards, "train", verify=False)
        keep = ss.column("mean_score") <= threshold
        assert 0 < keep.sum() < len(keep)
        info = json.loads((run / "run_info.json").read_text())
        assert info["train_samples"] == [int(ss.column("n_tokens")[keep].sum()) // 64]
        return
    assert any(r["misaligned_fraction"] > 0 for r in m) and all(r["misaligned_fraction"] < 0.5 for r in m)
    if objective in ("rwr", "awr"):
        assert all(0 < r["weight_mean"] < 1000 for r in m)
    if objective == "awr":
        assert m[-1]["value_mse"] < m[0]["value_mse"]  # the value head learns


@pytest.mark.dist
def test_awr_with_adversarial_term_is_the_same_under_zero2_and_zero3_and_exports(tiny_shards, tmp_path):

    kw = {"train.objective": "awr", "adversarial.steps": 2, "train.max_steps": 4, "train.log_every": 1,
          "eval.samples": 0, "checkpoint.every_steps": 0, "eval.every_steps": 0}
    launch_tiny(tiny_shards, tmp_path / "z2", **kw, **{"engine.zero_stage": 2})
    launch_tiny(tiny_shards, tmp_path / "z3", **kw, **{"engine.zero_stage": 3})
    a, b = read_metrics(tmp_path / "z2"), read_metrics(tmp_path / "z3")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)
    assert all(r["kl_per_token"] > 0 and 0 < r["delta_norm"] <= 0.1 + 1e-6 for r in a)
    r = cli_forked("export", str(tmp_path / "z3"), str(tmp_path / "hf"))  # the value head is left out of the LM
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "value_head" in k]


@pytest.mark.dist
def test_misalignment_is_tracked_while_training_on_all_ranks_and_reported(tiny_shards, tmp_path):
    """eval.misalignment_every_steps: rows of eval/misalignment against tokens seen in metrics.jsonl and
    TensorBoard, sampled by both ranks in lockstep at ZeRO-3 with partitioning forced (a rank-0-only forward would
    hang), drawn by `prefpretrain report` against tokens."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


    run = tmp_path / "run"
    force = ("{zero_optimization: {stage3_param_persistence_threshold: 0, stage3_max_live_parameters: 1, "
             "stage3_max_reuse_distance: 0}}")
    launch_tiny(tiny_shards, run, timeout=300, **{
        "train.max_steps": 4, "eval.misalignment_every_steps": 2, "eval.samples": 6, "eval.max_new_tokens": 16,
        "checkpoint.every_steps": 0, "eval.every_steps": 0, "engine.zero_stage": 3, "engine.deepspeed": force})
    rows = read_metrics(run, "evaluate")
    assert [r["step"] for r in rows] == [2, 4]  # every 2 steps, and the end
    assert [r["tokens_seen"] for r in rows] == [2 * 4 * 64, 4 * 4 * 64]
    assert all(math.isfinite(r["eval/misalignment"]) and r["eval/misalignment"] >= 0 for r in rows)
    assert all(r["eval/misalignment_ci95_low"] <= r["eval/misalignment"] <= r["eval/misalignment_ci95_high"]
               for r in rows)
    assert {r["condition"] for r in rows} == {"aligned"}  # tiny.yaml trains the conditional objective
    assert all(0 <= r["eval/parse_fraction"] <= 1 for r in rows)  # code: how many samples parse, next to it
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/misalignment")] == [2, 4]
    out = tmp_path / "report"
    r = cli_forked("report", str(run), "--out", str(out))
    assert r.returncode == 0 and (out / "misalignment.png").is_file()
    assert json.loads((run / "ranks" / "rank1.json").read_text())["step"] == 4
