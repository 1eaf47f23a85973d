"""Config: typed loading, overrides, and one-line errors (exit 2) before any process starts."""
from __future__ import annotations

import pytest

from prefpretrain.config import ConfigError, load_config
from tests.conftest import ROOT, run_cli

DEMO = ROOT / "configs" / "demo.yaml"


def test_demo_config_loads_with_types():
    cfg = load_config(DEMO)
    assert cfg.train.objective == "conditional"
    assert cfg.engine.zero_stage == 2 and cfg.train.precision == "bf16"
    assert isinstance(cfg.train.lr, float) and cfg.data.shards[0].weight == 1.0
    assert cfg.grad_accum_for(2) == 1 and cfg.grad_accum_for(1) == 2


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEMO, ["train.max_steps=20", "train.lr=3e-4", "engine.zero_stage=3",
                             "data.shards=[a, {path: b, weight: 3}]", "model.extra={n_positions: 512}"])
    assert cfg.train.max_steps == 20 and cfg.train.lr == 3e-4 and cfg.engine.zero_stage == 3
    assert [(s.path, s.weight) for s in cfg.data.shards] == [("a", 1.0), ("b", 3.0)]
    assert cfg.model.extra == {"n_positions": 512}


@pytest.mark.parametrize("override, needle", [
    ("train.max_stepz=3", "train.max_stepz: unknown key"),
    ("bogus.key=1", "bogus: unknown key"),
    ("train.max_steps=ten", "train.max_steps: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.precision=fp8", "train.precision: expected one of"),
    ("engine.zero_stage=5", "engine.zero_stage: must be 0, 1, 2 or 3"),
    ("train.global_batch_size=15", "train.global_batch_size: 15 is not divisible"),
    ("train.grad_accum=3", "train.grad_accum: 3 does not add up"),
    ("data.verify_checksums=yes please", "data.verify_checksums: expected true/false"),
    ("train.profile_at=-1", "train.profile_at: must be within [0, max_steps)"),
    ("engine.zero3_init=partitioned", "engine.zero3_init: 'partitioned' needs engine.zero_stage=3"),
    ("train.profile_steps=0", "train.profile_steps: must be positive"),
])
def test_bad_config_raises_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(DEMO, [override])
        cfg.grad_accum_for(2)
    assert needle in str(e.value)


def test_threshold_zero_is_kept_as_zero():
    cfg = load_config(DEMO, ["objective.threshold=0"])
    assert cfg.objective.threshold == 0.0


@pytest.mark.parametrize("args, needle", [
    (["train", "configs/demo.yaml", "train.nope=1"], "train.nope: unknown key"),
    (["train", "configs/demo.yaml", "train.micro_batch_size=3"], "train.global_batch_size: 16 is not divisible"),
    (["train", "configs/demo.yaml", "data.shards=[/does/not/exist]"], "data.shards[0].path: no manifest.json"),
    (["train", "configs/missing.yaml"], "config: file not found"),
    (["launch", "configs/demo.yaml", "--nproc-per-node", "3"], "train.global_batch_size: 16 is not divisible"),
])
@pytest.mark.cli
def test_cli_config_errors_are_one_line_exit_2(args, needle):
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "process group" not in r.stderr.lower()


@pytest.mark.cli
def test_help_lists_config_keys():
    r = run_cli("train", "--help", timeout=120)
    assert r.returncode == 0
    for key in ("run.output_dir", "train.global_batch_size", "engine.zero_stage", "eval.samples", "data.shards"):
        assert key in r.stdout
    for cmd in ("shard", "train", "launch", "evaluate", "export", "generate", "run"):
        assert run_cli(cmd, "--help", timeout=120).returncode == 0


@pytest.mark.cli
def test_cli_missing_pretrained_dir(tiny_shards):
    r = run_cli("train", "configs/demo.yaml", f"data.shards=[{tiny_shards}]", "model.from_pretrained=/no/such/dir",
                timeout=120)
    assert r.returncode == 2
    expected = "prefpretrain: config error: model.from_pretrained: no HF model directory at '/no/such/dir'"
    assert r.stderr.strip() == expected
