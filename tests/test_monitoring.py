"""What people look at: TensorBoard events (read back with tensorboard's reader), report, served TensorBoard."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT, cli_env, launch_tiny, read_metrics, run_cli
from tests.ranks import cli_forked

pytestmark = pytest.mark.dist

SCALARS = {"train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "perf/tokens_per_s", "perf/mfu",
           "perf/step_time_s", "mem/rss_gb", "data/epoch", "data/samples_seen", "data/tokens_seen",
           "pref/aligned_fraction", "pref/score_mean", "eval/val_loss", "eval/perplexity", "eval/misalignment"}


@pytest.fixture(scope="module")
def two_runs(tiny_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    runs = []
    for obj in ("mle", "conditional"):
        run = base / obj
        prof = {"train.profile_at": 2, "train.profile_steps": 2} if obj == "mle" else {}
        launch_tiny(tiny_shards, run, nproc=1, **{"train.objective": obj}, **prof)
        assert cli_forked("evaluate", str(run), "--samples", "4").returncode == 0
        runs.append(run)
    return runs


def test_tensorboard_events_hold_the_scalars_config_and_hparams(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = two_runs[1]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert SCALARS <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [3, 6, 6]  # every 3 steps, the end, `evaluate`
    assert any("config" in t for t in tags["tensors"])
    assert acc.PluginTagToContent("hparams")  # the HPARAMS tab has this run
    # metrics.jsonl mirrors the scalars
    tb = {e.step: e.value for e in acc.Scalars("train/lr")}
    for m in read_metrics(run):
        assert m["lr"] == pytest.approx(tb[m["step"]], rel=1e-6)
    ev = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"evaluate"' in x]
    assert ev and ev[-1]["eval/misalignment"] == pytest.approx(acc.Scalars("eval/misalignment")[-1].value)


def test_profile_of_the_asked_steps_is_written(two_runs):
    trace = json.loads((two_runs[0] / "profile" / "rank0.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::mm", "aten::addmm"} & names and "Optimizer.step#GuardedAdamW.step" in names
    ops = (two_runs[0] / "profile" / "rank0.ops.txt").read_text()
    assert ops.startswith("steps 3..4 (rank 0)") and "aten::" in ops
    assert not (two_runs[1] / "profile").exists()  # off unless asked


def test_report_renders_plots_and_a_table(two_runs, tmp_path):
    import shutil

    cont = tmp_path / "continual"  # a run with a forgetting record (the format continual updates write)
    shutil.copytree(two_runs[0], cont)
    (cont / "forgetting.json").write_text(json.dumps({"old": {"stdlib_a": {"before": 3.1, "after": 3.4}}}))
    r = run_cli("report", *map(str, two_runs), str(cont), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| mle | mle |" in md and "| conditional | conditional |" in md
    ev = json.loads((two_runs[0] / "eval.json").read_text())  # code: the samples that parse, next to all of them
    row = next(x for x in md.splitlines() if x.startswith("| mle | mle |")).split(" | ")
    assert row[9] == f"{ev['parse_fraction']:.0%}" and "samples that parse | their misalignment" in md
    for png in ("tradeoff.png", "loss_curves.png", "misalignment.png", "objectives.png", "forgetting.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({png})" in md


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on `port`."""
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            addr, p = parts[1].split(":")
            if int(p, 16) == port and parts[3] == "0A":  # LISTEN
                out.add(addr)
    return out


def test_tensorboard_command_serves_on_localhost_only(two_runs):
    from prefpretrain.distributed import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "tensorboard", *map(str, two_runs), "--port",
                          str(port)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline, body = time.time() + 90, None
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "TensorBoard did not answer"
        assert {name.split("/")[0] for name in json.loads(body)} == {"mle", "conditional"}
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0
    finally:
        p.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal must take TensorBoard down
        p.wait(timeout=30)
    deadline = time.time() + 20  # TensorBoard went with it: nothing listens on the port any more
    while _listening(port) and time.time() < deadline:
        time.sleep(0.2)
    assert not _listening(port)


def test_the_tradeoff_plots_lm_eval_capability_when_every_run_has_it():
    from prefpretrain.report import tradeoff_points

    def run(name, obj, **ev):
        return {"name": name, "objective": obj, "eval": ev}

    runs = [run("a", "mle", misalignment=0.3, misalignment_ci95=[0.2, 0.4], val_loss=2.0, capability=0.6),
            run("b", "conditional", misalignment=0.1, val_loss=2.2, capability=0.5), run("c", "mle", val_loss=1.0)]
    label, pts = tradeoff_points(runs)
    assert label.startswith("capability: lm-eval") and pts == [("a", "mle", 0.6, 0.3, 0.2, 0.4),
                                                              ("b", "conditional", 0.5, 0.1, 0.1, 0.1)]
    del runs[1]["eval"]["capability"]  # one run without lm-eval results: validation loss for all
    label, pts = tradeoff_points(runs)
    assert label.startswith("validation loss") and [p[2] for p in pts] == [2.0, 2.2]
    assert tradeoff_points([runs[2]]) == ("validation loss (lower is better; no lm-eval results)", [])
