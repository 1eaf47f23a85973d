"""Checkpoints: resume at another world size, pre-emption, a killed worker under torchrun elastic, crashes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from prefpretrain.trainer.checkpoint import find_latest
from tests.conftest import ROOT, cli_env, crash_after, launch_tiny, read_metrics, tiny_overrides
from tests.ranks import cli_forked

pytestmark = pytest.mark.dist

KW = {"train.log_every": 1, "train.precision": "fp32", "eval.every_steps": 0, "checkpoint.keep_last": 10}


def test_resume_at_another_world_size_continues_exactly(tiny_shards, tmp_path):
    kw = dict(KW, **{"train.max_steps": 9, "checkpoint.every_steps": 3})
    ref = tmp_path / "ref"
    launch_tiny(tiny_shards, ref, 2, **kw)
    a = tmp_path / "a"  # 2 ranks -> stop after 3 -> 1 rank
    crash_after(ref, a, 3)
    r = launch_tiny(tiny_shards, a, 1, **kw)
    assert "loading its universal form" in r.stderr and "at step 3 (data position 12)" in r.stderr
    b = tmp_path / "b"  # ... -> stop after 6 -> 2 ranks again
    crash_after(a, b, 6)
    r = launch_tiny(tiny_shards, b, 2, **kw)
    assert "at step 6 (data position 24)" in r.stderr
    want = [m["loss"] for m in read_metrics(ref)]
    assert [m["loss"] for m in read_metrics(a)] == pytest.approx(want, abs=1e-5)
    assert [m["loss"] for m in read_metrics(b)] == pytest.approx(want, abs=1e-5)
    assert json.loads((b / "checkpoints" / "step_00000009" / "state.json").read_text())["world_size"] == 2


def _wait_for(pred, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_saves_a_checkpoint_and_exits_4(tiny_shards, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", "--nproc-per-node", "2",
                          *tiny_overrides(tiny_shards, run, **dict(KW, **{"train.max_steps": 5000,
                                                                          "checkpoint.every_steps": 0}))],
                         cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 4, err[-3000:]
    assert time.time() - t0 < 30  # within torchrun's grace period
    ckpt = find_latest(run / "checkpoints")
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step >= 3 and json.loads((run / "failure.json").read_text())["reason"] == "preempted"
    assert read_metrics(run)[-1]["step"] <= step


def _worker_pids(run: Path) -> dict[int, int]:
    """rank -> pid of the `prefpretrain train` processes of this run."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and f"run.output_dir={run}".encode() in cmd:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = int(d.name)
    return out


def _last_ids(run: Path) -> Counter:
    last = {}
    for f in sorted((run / "sample_ids").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            last[(rec["step"], rec["rank"])] = tuple(rec["ids"])  # after a restart, steps are written again
    return Counter(last.values())


def test_killed_worker_restarts_and_gives_the_same_result(tiny_shards, tmp_path):
    kw = dict(KW, **{"train.max_steps": 200, "checkpoint.every_steps": 25, "data.log_sample_ids": "true"})
    ref = tmp_path / "ref"
    launch_tiny(tiny_shards, ref, 2, **kw)

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", "--nproc-per-node", "2",
                          "--max-restarts", "1", *tiny_overrides(tiny_shards, run, **kw)],
                         cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (run / "checkpoints" / "latest").is_file())
    pids = _worker_pids(run)
    assert set(pids) == {0, 1}
    killed_at = len(read_metrics(run))
    os.kill(pids[1], signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-4000:]
    assert killed_at < 200 and "resumed from" in err
    assert len(json.loads((run / "run_info.json").read_text())["history"]) == 1  # started twice
    assert read_metrics(run)[-1]["loss"] == pytest.approx(read_metrics(ref)[-1]["loss"], abs=1e-5)
    assert _last_ids(run) == _last_ids(ref)


SIX = dict(KW, **{"train.max_steps": 6, "checkpoint.every_steps": 3})


@pytest.mark.xdist_group("six_steps")
def test_an_incomplete_checkpoint_is_never_used(tmp_path, shared_run):
    run = tmp_path / "run"
    shutil.copytree(shared_run(2, **SIX), run)  # (a copy of the run the damaged-checkpoint test also uses)
    ck = run / "checkpoints"
    # a crash in the middle of saving step 6: DeepSpeed's files are there, our state.json is not
    (ck / "step_00000006" / "state.json").unlink()
    assert find_latest(ck).name == "step_00000003"  # `latest` names an incomplete one: fall back
    (ck / "latest").write_text("step_00000003")
    assert find_latest(ck).name == "step_00000003"
    r = cli_forked("evaluate", str(run), "--samples", "0")
    assert r.returncode == 0 and json.loads((run / "eval.json").read_text())["step"] == 3


@pytest.mark.xdist_group("six_steps")
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tiny_shards, tmp_path, shared_run):
    run = tmp_path / "run"
    shutil.copytree(shared_run(2, **SIX), run)
    ck = run / "checkpoints"
    state = json.loads((ck / "step_00000006" / "state.json").read_text())
    assert {"mp_rank_00_model_states.pt", "rng_rank0.json", "rng_rank1.json"} <= set(state["files"])
    victim = ck / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert find_latest(ck).name == "step_00000003"
    r = cli_forked("evaluate", str(run), "--samples", "0")
    assert r.returncode == 0 and "is damaged" in r.stderr
    assert json.loads((run / "eval.json").read_text())["step"] == 3


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tiny_shards, tmp_path):
    """SIGKILL the whole job while a checkpoint directory exists without its state.json (mid-save)."""
    run = tmp_path / "run"
    kw = dict(KW, **{"train.max_steps": 200, "checkpoint.every_steps": 4, "model.hidden_size": 256,
                     "model.num_layers": 4, "model.num_heads": 4, "checkpoint.keep_last": 100})
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", "--nproc-per-node", "2",
                          *tiny_overrides(tiny_shards, run, **kw)], cwd=ROOT, env=cli_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ck = run / "checkpoints"

    def mid_save() -> bool:
        done = [d for d in ck.glob("step_*") if (d / "state.json").is_file()]
        partial = [d for d in ck.glob("step_*") if d.is_dir() and not (d / "state.json").is_file()]
        return bool(done) and bool(partial)

    assert _wait_for(lambda: len(_worker_pids(run)) == 2)
    pids = _worker_pids(run)
    caught = _wait_for(mid_save, timeout=180)
    for pid in pids.values():  # the ranks (torchrun starts them in sessions of their own) ...
        os.kill(pid, signal.SIGKILL)
    os.killpg(p.pid, signal.SIGKILL)  # ... and the launcher with torchrun
    p.wait()
    assert caught, "never saw a save in progress"
    partial = [d for d in ck.glob("step_*") if not (d / "state.json").is_file()]
    assert partial
    latest = find_latest(ck)
    assert (ck / "latest").read_text() == latest.name and latest < min(partial)
    r = cli_forked("evaluate", str(run), "--samples", "0")
    assert r.returncode == 0 and json.loads((run / "eval.json").read_text())["step"] == int(latest.name[5:])


class _Planted:
    """Unpickling this creates a file: what a crafted checkpoint would do with weights_only=False."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _recompute_crc(ckpt: Path, name: str) -> None:
    """What an attacker does after planting a file: the CRC-32 in state.json is no defence."""
    from prefpretrain.trainer.checkpoint import _checksum

    st = json.loads((ckpt / "state.json").read_text())
    st["files"][name] = _checksum(ckpt / name)
    (ckpt / "state.json").write_text(json.dumps(st))


def test_a_crafted_pickle_is_never_run_and_damaged_checkpoints_stop_the_run(tiny_shards, tmp_path):
    import torch

    run = tmp_path / "run"
    kw = dict(KW, **{"train.max_steps": 4, "checkpoint.every_steps": 2, "engine.zero_stage": 0})
    launch_tiny(tiny_shards, run, 2, **kw)
    ck, marker = run / "checkpoints", tmp_path / "PWNED"
    step4 = ck / "step_00000004"
    f = step4 / "mp_rank_00_model_states.pt"
    blob = torch.load(f, weights_only=False)  # (our own file, in the test)
    blob["extra"] = _Planted(str(marker))
    torch.save(blob, f)
    _recompute_crc(step4, f.name)
    r = cli_forked("export", str(run), str(tmp_path / "out"))
    assert r.returncode == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(
        f"prefpretrain: error: {step4}: refused to load it: it names Python objects")
    r = launch_tiny(tiny_shards, run, 2, expect=2, **dict(kw, **{"train.max_steps": 6}))  # resume: refused
    assert not marker.exists() and not (ck / "step_00000006").exists()
    assert json.loads((run / "failure.json").read_text())["reason"] == "refused"
    # ZeRO-2: one rank's own optimizer file, read by DeepSpeed's zero_to_fp32 on export (it passes
    # weights_only=False; the forced setting holds)
    z2 = tmp_path / "z2"
    launch_tiny(tiny_shards, z2, 2, **dict(kw, **{"engine.zero_stage": 2}))
    opt = z2 / "checkpoints" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    blob = torch.load(opt, weights_only=False)
    blob["extra"] = _Planted(str(marker))
    torch.save(blob, opt)
    _recompute_crc(opt.parent, opt.name)
    r = cli_forked("export", str(z2), str(tmp_path / "out2"))
    assert r.returncode == 2 and not marker.exists() and "refused to load it" in r.stderr

    # every checkpoint damaged: the run stops, names the damage, and overwrites nothing
    for d in (ck / "step_00000002", step4):
        victim = d / "mp_rank_00_model_states.pt"
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    r = launch_tiny(tiny_shards, run, 2, expect=2, torchrun=True, **dict(kw, **{"train.max_steps": 6}))
    assert "none of the 2 checkpoint(s)" in r.stderr and "run.resume=never" in r.stderr
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    r = launch_tiny(tiny_shards, run, 2, expect=2, **dict(kw, **{"run.resume": str(step4)}))
    assert f"run.resume: {step4} is damaged (mp_rank_00_model_states.pt does not match its checksum)" in r.stderr
    (step4 / "state.json").write_text("{not json")  # an unreadable state.json is damage, not a traceback
    assert find_latest(ck) is None
    # told to start over: the old checkpoints move aside, the new run trains from step 0
    launch_tiny(tiny_shards, run, 2, **dict(kw, **{"run.resume": "never"}))
    aside = [p for p in run.iterdir() if p.name.startswith("checkpoints.before_")]
    assert len(aside) == 1 and (aside[0] / "step_00000002").is_dir()
    assert find_latest(ck).name == "step_00000004" and read_metrics(run)[-1]["step"] == 4


def _alive(pids) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[:1]]


def test_ctrl_c_checkpoints_like_sigterm_and_a_second_one_stops_at_once(tiny_shards, tmp_path):
    """SIGINT to `prefpretrain launch`: checkpoint, failure.json, exit 4, no rank left; twice: stop now."""
    for twice in (False, True):
        run = tmp_path / f"run{int(twice)}"
        p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", "--nproc-per-node",
                              "2", *tiny_overrides(tiny_shards, run, **dict(KW, **{"train.max_steps": 5000,
                                                                                  "checkpoint.every_steps": 0}))],
                             cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _wait_for(lambda r=run: (r / "metrics.jsonl").is_file() and len(read_metrics(r)) >= 3)
        ranks = list(_worker_pids(run).values())
        assert len(ranks) == 2
        p.send_signal(signal.SIGINT)
        if twice:
            time.sleep(0.05)
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert _wait_for(lambda r=ranks: not _alive(r), timeout=30), "ranks outlived the launcher"
        if twice:
            assert p.returncode == 130 and "second Ctrl-C" in err  # not 4: SLURM would requeue a pre-emption
        else:
            assert p.returncode == 4, err[-3000:]
            assert json.loads((run / "failure.json").read_text())["reason"] == "preempted"
            assert find_latest(run / "checkpoints") is not None and "KeyboardInterrupt" not in err
