"""Continual updates: replay per batch, the bounded uniform reservoir memory, exact resume mid-update at
another world size, the tokenizer check, EWC / distillation terms, forgetting report through the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prefpretrain.continual.memory import WINDOW, Reservoir, build_memory, reservoir_update, windows
from prefpretrain.continual.regularizers import diagonal_fisher, distill_kl, ewc_penalty
from prefpretrain.continual.replay import ReplayMixDataset, replay_per_batch
from prefpretrain.data_shards.loader import MixtureDataset, RankBatchSampler
from prefpretrain.data_shards.packing import Layout, PackedSet
from prefpretrain.data_shards.reader import ShardSet
from tests.conftest import crash_after, launch_tiny, read_metrics, run_cli, tiny_overrides
from tests.ranks import cli_forked

NEW_FILES = ["heapq.py", "queue.py", "sched.py", "string.py", "token.py", "weakref.py", "glob.py", "struct.py"]


@pytest.fixture(scope="session")
def new_shards(tmp_path_factory, tiny_shards) -> Path:
    """Other stdlib modules, tokenized with the tiny shards' tokenizer (the 'new data' of an update)."""
    from prefpretrain.data_shards.build import ShardOptions, build_shards
    from prefpretrain.data_shards.sources import stdlib_root

    root = stdlib_root()
    out = tmp_path_factory.mktemp("new") / "new"
    build_shards(ShardOptions(inputs=[str(root / f) for f in NEW_FILES if (root / f).is_file()], output=str(out),
                              scorer="pep8", tokenizer=str(tiny_shards / "tokenizer"), val_fraction=0.3, workers=1,
                              progress=False))
    return out


# ---------------------------------------------------------------- reservoir and memory (no processes)


def _items(n: int) -> np.ndarray:
    a = np.zeros(n, WINDOW)
    a["doc"] = np.arange(n)
    return a


def test_reservoir_is_uniform_chi_square():
    n, cap, runs = 50, 10, 4000
    counts = np.zeros(n)
    for seed in range(runs):  # offered in two calls and small chunks: the continued state must stay uniform
        r = reservoir_update(Reservoir.new(cap, seed), _items(17), chunk=4)
        r = reservoir_update(r, _items(n)[17:], chunk=7)
        assert len(r.slots) == cap and r.seen == n and len(set(r.slots["doc"])) == cap
        counts[r.slots["doc"]] += 1
    expected = runs * cap / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 85.35, (chi2, counts)  # chi-square, 49 degrees of freedom, p = 0.001


def test_reservoir_continues_exactly_from_its_state():
    one = reservoir_update(Reservoir.new(8, 3), _items(100))
    half = reservoir_update(Reservoir.new(8, 3), _items(100)[:40])
    half = reservoir_update(Reservoir(8, half.seen, json.loads(json.dumps(half.rng)), half.slots), _items(100)[40:])
    assert (one.slots == half.slots).all() and one.seen == half.seen == 100


def test_memory_never_exceeds_its_bound_and_holds_true_windows(tiny_shards, new_shards, tmp_path):
    L, cap = 64, 30
    m1 = build_memory(tmp_path / "m1", None, [str(tiny_shards)], cap, L, seed=1)
    m2 = build_memory(tmp_path / "m2", tmp_path / "m1", [str(new_shards)], cap, L, seed=1)
    n_old = len(windows(ShardSet(tiny_shards), 0, L))
    n_new = len(windows(ShardSet(new_shards), 0, L))
    assert n_old > cap
    for m, d, seen in ((m1, tmp_path / "m1", n_old), (m2, tmp_path / "m2", n_old + n_new)):
        ss = ShardSet(d, "train")
        assert m["splits"]["train"]["samples"] == len(ss) == cap
        assert ss.column("n_tokens").max() <= L and m["splits"]["train"]["tokens"] <= cap * L
        assert json.loads((d / "reservoir.json").read_text())["seen"] == seen
    # every memory document is exactly a window of a source document, with its scores
    mem = ShardSet(tmp_path / "m2", "train")
    sources = {str(tiny_shards): ShardSet(tiny_shards), str(new_shards): ShardSet(new_shards)}
    froms = set()
    for i in range(len(mem)):
        d = mem.read(i)
        src = sources[d["meta"]["from"]]
        froms.add(d["meta"]["from"])
        k = next(k for k in range(len(src)) if src.read(k)["meta"]["doc_id"] == d["meta"]["doc_id"])
        o = d["meta"]["offset"]
        full = src.read(k)
        assert (full["tokens"][o: o + len(d["tokens"])] == d["tokens"]).all()
        assert (full["scores"][o: o + len(d["tokens"])] == d["scores"]).all()
    assert froms == set(sources)  # both sets are represented


def test_every_batch_holds_the_replay_fraction_at_any_world_size(tiny_shards, tmp_path):
    build_memory(tmp_path / "mem", None, [str(tiny_shards)], 40, 64, seed=1)
    lay = Layout("mle")
    new = MixtureDataset([PackedSet(ShardSet(tiny_shards), lay, 64)], [1.0], seed=1)
    mem = MixtureDataset([PackedSet(ShardSet(tmp_path / "mem"), lay, 64)], [1.0], seed=2)
    G, micro, steps = 20, 5, 4
    for frac in (0.05, 0.25, 0.5):
        R = replay_per_batch(frac, G)
        ds = ReplayMixDataset(new, mem, G, R)
        seqs = {}
        for world in (1, 2, 4):
            per_step: dict[int, list] = {}
            for rank in range(world):
                for k, mb in enumerate(RankBatchSampler(0, steps, micro, G, rank, world)):
                    flags = [ds.stream(j) for j in mb]
                    reps = sum(f for f, _ in flags)
                    assert abs(reps - micro * R / G) < 1 + 1e-9  # spread evenly: within one of the share
                    per_step.setdefault(k // (G // world // micro), []).extend(zip(mb, flags, strict=True))
            for st in per_step.values():
                assert sum(f for _, (f, _) in st) == R  # exactly round(fraction x G) per global batch
            seqs[world] = sorted(j_f for st in per_step.values() for j_f in st)
            items = [ds[j] for j, _ in seqs[world][:G]]
            assert sum(bool(it["replay"]) for it in items) == R
        assert seqs[1] == seqs[2] == seqs[4]
        rep_pos = sorted(p for _, (f, p) in seqs[1] if f)
        new_pos = sorted(p for _, (f, p) in seqs[1] if not f)
        assert rep_pos == list(range(steps * R)) and new_pos == list(range(steps * (G - R)))


# ---------------------------------------------------------------- regularizers (no processes)


def _tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _grads(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_ewc_is_zero_when_off_and_pulls_towards_the_old_weights_when_on():
    model = _tiny_lm()
    samples = [{"input_ids": np.arange(i, i + 12) % 50, "labels": np.arange(i, i + 12) % 50} for i in range(4)]
    fisher = diagonal_fisher(model, samples)
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(ewc_penalty(model, anchor, fisher, 5.0).detach()) == 0.0  # at the old weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert float(ewc_penalty(model, anchor, fisher, 0.0)) == 0.0  # switched off
    ids = torch.arange(12).unsqueeze(0)
    nll = model(input_ids=ids, labels=ids).loss
    g0 = _grads(model, nll)
    g1 = _grads(model, model(input_ids=ids, labels=ids).loss + ewc_penalty(model, anchor, fisher, 5.0))
    want = torch.cat([(5.0 * fisher[n] * (p.detach() - anchor[n])).flatten() for n, p in model.named_parameters()])
    assert not torch.allclose(g0, g1)
    assert torch.allclose(g1 - g0, want, atol=1e-6)


def test_distillation_is_zero_without_replay_or_difference_and_changes_gradients():
    model, teacher = _tiny_lm(), _tiny_lm()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids).logits
    none = torch.zeros(3, dtype=torch.bool)
    kl, n = distill_kl(logits, teacher(input_ids=ids).logits.detach(), ids, none)
    assert float(kl.detach()) == 0.0 and n == 0  # no replayed row in the batch
    kl, n = distill_kl(logits, logits.detach(), ids, torch.ones(3, dtype=torch.bool))
    assert abs(float(kl.detach())) < 1e-5 and n == 3 * 11  # the same model: nothing to pull
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = torch.tensor([True, False, True])
    kl, n = distill_kl(model(input_ids=ids).logits, teacher(input_ids=ids).logits.detach(), ids, rows)
    assert float(kl.detach()) > 0 and n == 2 * 11
    g = _grads(model, kl)
    assert float(g.abs().sum()) > 0


# ---------------------------------------------------------------- through the CLI, several ranks

KW = {"train.log_every": 1, "train.precision": "fp32", "eval.every_steps": 0, "checkpoint.keep_last": 10,
      "eval.samples": 2}


def test_forgetting_record_carries_the_misalignment_of_the_samples_that_parse(tmp_path):
    from prefpretrain.continual import forgetting

    before = {"old": {}, "new": {}, "misalignment": 0.02, "misalignment_parsed": 0.01}
    after = {"old": {}, "new": {}, "misalignment": 0.03, "misalignment_parsed": 0.015}
    rec = forgetting.report(before, after, {})
    assert rec["misalignment"] == {"before": 0.02, "after": 0.03, "before_parsed": 0.01, "after_parsed": 0.015}
    assert forgetting.scalars(rec)["eval/continual/misalignment_parsed_after"] == 0.015
    (tmp_path / "forgetting.json").write_text(json.dumps(rec))
    assert "(samples that parse: 0.01000 -> 0.01500)" in "\n".join(forgetting.summary_lines(tmp_path))
    # none parsed before (or prose): the overall figures alone
    rec = forgetting.report({**before, "misalignment_parsed": None}, after, {})
    assert "before_parsed" not in rec["misalignment"]
    assert "eval/continual/misalignment_parsed_after" not in forgetting.scalars(rec)


@pytest.fixture(scope="session")
def old_run(tmp_path_factory, tiny_shards) -> Path:
    run = tmp_path_factory.mktemp("old") / "old"
    launch_tiny(tiny_shards, run, 2, **dict(KW, **{"train.max_steps": 4, "checkpoint.every_steps": 0}))
    return run


def _crash_after(src: Path, dst: Path, step: int) -> None:
    """The update's run directory as a crash right after step `step`'s checkpoint would have left it."""
    crash_after(src, dst, step)
    shutil.rmtree(dst / "memory")  # written at the end of the update
    (dst / "forgetting.json").unlink()


@pytest.mark.dist
def test_resume_mid_update_at_another_world_size_is_exact(new_shards, old_run, tmp_path):
    kw = dict(KW, **{"train.max_steps": 8, "checkpoint.every_steps": 4, "continual.from": str(old_run),
                     "continual.replay_fraction": 0.5, "continual.memory_size": 40, "continual.ewc_lambda": 50.0,
                     "continual.distill_weight": 1.0})
    ref = tmp_path / "ref"
    launch_tiny(new_shards, ref, 2, **kw)
    train = read_metrics(ref)
    assert [m["replay_fraction"] for m in train] == [0.5] * 8  # 2 of every 4 samples, every step
    assert all(m["ewc_penalty"] >= 0 for m in train) and train[-1]["ewc_penalty"] > 0
    assert all(m["distill_kl"] >= 0 for m in train) and train[-1]["distill_kl"] > 0
    fg = json.loads((ref / "forgetting.json").read_text())
    assert set(fg["old"]) == {tiny_shards_name(old_run)} and set(fg["new"]) == {"new"}
    assert fg["new"]["new"]["after"] == pytest.approx(read_metrics(ref, "eval")[-1]["eval/val_loss"], abs=1e-6)
    assert fg["replay_per_batch"] == 2 and "misalignment" in fg
    st = json.loads((ref / "checkpoints" / "step_00000004" / "state.json").read_text())["continual"]
    assert st["replay_position"] == 8 and st["new_position"] == 8 and st["reservoir"]["windows"] <= 40

    a = tmp_path / "a"  # 2 ranks -> crash after step 4 -> 1 rank
    _crash_after(ref, a, 4)
    r = launch_tiny(new_shards, a, 1, **kw)
    assert "loading its universal form" in r.stderr and "at step 4 (data position 16)" in r.stderr
    assert [m["loss"] for m in read_metrics(a)] == pytest.approx([m["loss"] for m in train], abs=1e-5)
    (name, old), = fg["old"].items()
    resumed = json.loads((a / "forgetting.json").read_text())["old"][name]
    assert resumed["after"] == pytest.approx(old["after"], abs=1e-5)
    # the memory after the update is the same, whatever happened in between
    for f in ("manifest.json", "reservoir.json"):
        assert (a / "memory" / f).read_text().replace(str(a), "X") == (ref / "memory" / f).read_text().replace(
            str(ref), "X")

    # without the regularisers the same update trains differently (they do act on the gradients)
    plain = tmp_path / "plain"
    launch_tiny(new_shards, plain, 2, **dict(kw, **{"continual.ewc_lambda": 0.0, "continual.distill_weight": 0.0}))
    assert read_metrics(plain)[0]["loss"] == pytest.approx(train[0]["loss"], abs=1e-6)  # same start, same data
    assert read_metrics(plain)[-1]["loss"] != pytest.approx(train[-1]["loss"], abs=1e-6)
    assert "ewc_penalty" not in read_metrics(plain)[-1]


def tiny_shards_name(old_run: Path) -> str:
    from prefpretrain.config import load_config

    return Path(load_config(old_run / "config.yaml").data.shards[0].path).name


@pytest.mark.dist
def test_run_command_updates_and_reports_forgetting(new_shards, old_run, tmp_path):
    run = tmp_path / "upd"
    r = run_cli("run", "configs/tiny.yaml", *tiny_overrides(new_shards, run, **dict(KW, **{
        "train.max_steps": 3, "continual.from": str(old_run), "continual.replay_fraction": 0.25,
        "continual.memory_size": 16})))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "forgetting on" in r.stdout and "continual update from" in r.stdout
    assert "at the data's mix of code, comment, docstring and blank lines:" in r.stdout  # (code samples)
    assert json.loads((run / "summary.json").read_text())["misalignment_at_data_mix"] >= 0
    fg = json.loads((run / "forgetting.json").read_text())
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    report = (run / "report" / "report.md").read_text()  # `run` reports the run: the trade-off first
    assert report.index("](tradeoff.png)") < report.index("](forgetting.png)") and "report/report.md" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    (name, v), = fg["old"].items()
    tags = set(ea.Tags()["scalars"])
    assert {f"eval/forgetting/{name}", f"eval/forgetting/{name}/before", "eval/continual/new_val_loss"} <= tags
    assert ea.Scalars(f"eval/forgetting/{name}")[-1].value == pytest.approx(v["after"] - v["before"], abs=1e-5)
    assert len(ShardSet(run / "memory", "train")) == 16 and len(ShardSet(run / "replay", "train")) == 16
    r = cli_forked("report", str(run), "--out", str(tmp_path / "report"))
    assert r.returncode == 0 and (tmp_path / "report" / "forgetting.png").is_file()
    assert f"| upd | 25% | {name} (old) | {v['before']:.4f} | {v['after']:.4f} |" in (
        tmp_path / "report" / "report.md").read_text()

    # a second update from the first: the memory continues (no old raw corpus needed), both sets are 'old'
    run2 = tmp_path / "upd2"
    launch_tiny(new_shards, run2, 2, **dict(KW, **{"train.max_steps": 2, "continual.from": str(run),
                                                   "continual.replay_fraction": 0.25, "continual.memory_size": 16}))
    res = json.loads((run2 / "replay" / "reservoir.json").read_text())
    assert res == json.loads((run / "memory" / "reservoir.json").read_text()) | {"history": res["history"]}
    assert set(json.loads((run2 / "forgetting.json").read_text())["old"]) == {name}  # new == its own set: 'new'


@pytest.mark.dist
def test_tokenizer_mismatch_and_bad_keys_fail_before_any_process(tiny_shards, old_run, tmp_path, stdlib_files):
    from prefpretrain.data_shards.build import ShardOptions, build_shards

    other = tmp_path / "other_tok"
    build_shards(ShardOptions(inputs=stdlib_files[:4], output=str(other), scorer="none", vocab_size=300,
                              val_fraction=0.2, workers=1, progress=False))
    run = tmp_path / "never"
    for cmd in ("launch", "train"):
        r = run_cli(cmd, "configs/tiny.yaml", *tiny_overrides(other, run, **{"continual.from": str(old_run)}))
        assert r.returncode == 2 and not run.exists(), r.stderr[-2000:]
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prefpretrain: config error: continual.from:")
        assert "tokenizer" in err[0] and "--tokenizer" in err[0]
    for bad, says in (("continual.replay_fractio=0.1", "continual.replay_fractio: unknown key"),
                      ("continual.replay_fraction=lots", "continual.replay_fraction: expected a number"),
                      ("continual.replay_fraction=1.5", "continual.replay_fraction: must be within [0, 1)"),
                      ("continual.memory_strategy=fifo", "continual.memory_strategy: expected one of"),
                      ("continual.from=/nowhere", "continual.from: '/nowhere' is neither")):
        r = run_cli("train", "configs/tiny.yaml", *tiny_overrides(tiny_shards, run, **{"continual.from": old_run}),
                    bad)
        assert r.returncode == 2 and says in r.stderr, (bad, r.stderr[-1500:])


@pytest.mark.dist
def test_zero3_update_with_a_misalignment_score_finishes(new_shards, old_run, tmp_path):
    """At ZeRO-3 (partitioning forced) every rank samples its share of the misalignment samples in lockstep;
    rank 0 sampling alone while the others waited at a barrier hung here."""
    from tests.test_engine import FORCE_PARTITIONING

    run = tmp_path / "z3"
    launch_tiny(new_shards, run, 2, timeout=400, **dict(KW, **{
        "train.max_steps": 2, "continual.from": str(old_run), "continual.replay_fraction": 0.25,
        "continual.memory_size": 16, "engine.zero_stage": 3, "engine.deepspeed": FORCE_PARTITIONING,
        "eval.samples": 3, "eval.val_samples": 17}))
    fg = json.loads((run / "forgetting.json").read_text())
    assert fg["misalignment"]["before"] >= 0 and fg["misalignment"]["after"] >= 0
    assert (run / "memory" / "manifest.json").is_file()
