"""`launch --slurm` and `srun ... train` against a real two-node SLURM cluster started on this host."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, read_metrics, run_cli, tiny_overrides
from tests.slurm_cluster import SlurmCluster, ensure_installed

pytestmark = pytest.mark.slurm

# long enough for a signal to land mid-run, short enough for CI; no periodic checkpoints, so a resume
# can only come from the pre-emption checkpoint
KW = {"train.log_every": 1, "train.precision": "fp32", "train.max_steps": 200, "eval.every_steps": 0,
      "checkpoint.every_steps": 0}
JOB = ["--slurm", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmctld/slurmd as root")
    why = ensure_installed()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)  # for the CLI, sbatch, srun, and the jobs (--export=ALL)
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from prefpretrain.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _job_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("submitted job "))
    return line.split()[2].rstrip(":")


def _ranks(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="session")
def uninterrupted(slurm, tiny_shards, tmp_path_factory):
    """The tiny demo as a 2-node job (1 CPU rank per node), submitted and followed to its end."""
    run = tmp_path_factory.mktemp("slurm_runs") / "full"
    t0 = time.time()
    r = run_cli("launch", "configs/tiny.yaml", *JOB, "--submit", "--wait", *tiny_overrides(tiny_shards, run, **KW),
                timeout=300)
    return run, r, time.time() - t0


def test_two_node_job_trains_one_model_on_both_nodes(uninterrupted):
    run, r, seconds = uninterrupted
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    job = _job_id(r.stdout)
    assert f"job {job} finished with exit status 0" in r.stdout
    ranks = _ranks(run)
    assert [x["world_size"] for x in ranks] == [2, 2]
    assert {x["slurm"]["node_name"] for x in ranks} == {"n1", "n2"}  # one rank on each simulated node
    assert {x["slurm"]["node_id"] for x in ranks} == {0, 1}
    assert {x["slurm"]["job_id"] for x in ranks} == {job} and ranks[0]["slurm"]["restart_count"] == 0
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]  # one model, not two
    assert len(read_metrics(run)) == KW["train.max_steps"]
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["history"] == []  # started once
    logs = run / "slurm"
    assert (logs / "job.sbatch").is_file()
    node_logs = [(logs / f"job-{job}-node{node}.out").read_text() for node in (0, 1)]  # one log per node
    assert all(node_logs) and "-m torch.distributed.run --nnodes 2" in node_logs[0]
    assert "srun exited with 0" in (logs / f"job-{job}.out").read_text()


def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(slurm, uninterrupted, tiny_shards,
                                                                          tmp_path):
    ref = uninterrupted[0]
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", *JOB, "--submit",
                          "--wait", *tiny_overrides(tiny_shards, run, **KW)],
                         cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = _job_id(p.stdout.readline())
    t0 = time.time()
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 20):
        assert p.poll() is None and time.time() - t0 < 120, "the job did not start training"
        time.sleep(0.1)
    # what `#SBATCH --signal=USR1@GRACE` does before the time limit: SIGUSR1 to every process of the step
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=cli_env())
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, out[-2000:] + err[-4000:]
    assert slurm.job(job)["Restarts"] == "1"

    batch_log = (run / "slurm" / f"job-{job}.out").read_text()
    assert "srun exited with 4" in batch_log and "requeueing job" in batch_log
    assert "attempt 1 on" in batch_log
    assert [ln.split(",")[0] for ln in batch_log.splitlines() if "srun exited" in ln][-1].endswith("with 0")
    # the second attempt resumed from the pre-emption checkpoint, with SLURM_RESTART_COUNT=1
    stop = json.loads((run / "failure.json").read_text())
    assert stop["reason"] == "preempted"
    stopped_at = int(stop["message"].split("at step ")[1].split(";")[0])
    assert 20 <= stopped_at < KW["train.max_steps"]
    node_logs = "".join(f.read_text() for f in sorted((run / "slurm").glob(f"job-{job}-node*.out")))
    assert f"resumed from {run}/checkpoints/step_{stopped_at:08d}" in node_logs
    assert [x["slurm"]["restart_count"] for x in _ranks(run)] == [1, 1]
    info = json.loads((run / "run_info.json").read_text())
    assert info["slurm"]["restart_count"] == 1 and [h["slurm"]["restart_count"] for h in info["history"]] == [0]

    # ... and the result is the uninterrupted run's
    a = {m["step"]: m["loss"] for m in read_metrics(ref)}
    b = {m["step"]: m["loss"] for m in read_metrics(run)}
    assert sorted(b) == sorted(a) == list(range(1, KW["train.max_steps"] + 1))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], abs=1e-4)
    va, vb = read_metrics(ref, "eval")[-1], read_metrics(run, "eval")[-1]
    assert vb["eval/val_loss"] == pytest.approx(va["eval/val_loss"], abs=1e-4)


def test_srun_one_task_per_rank_runs_train_directly(slurm, tiny_shards, tmp_path):
    """No torchrun: `srun -N2 -n2 prefpretrain train` takes its ranks from SLURM_PROCID / SLURM_NTASKS."""
    run = tmp_path / "run"
    r = subprocess.run(["srun", "-N2", "-n2", sys.executable, "-m", "prefpretrain", "train", "configs/tiny.yaml",
                        *tiny_overrides(tiny_shards, run, **{"train.max_steps": 4})],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = _ranks(run)
    assert [x["world_size"] for x in ranks] == [2, 2]
    assert [(x["slurm"]["procid"], x["slurm"]["node_name"]) for x in ranks] == [(0, "n1"), (1, "n2")]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]


def test_impossible_requests_fail_before_anything_is_submitted(slurm, tiny_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    ov = tiny_overrides(tiny_shards, tmp_path / "run")
    cases = {
        ("--nodes", "3", "--nproc-per-node", "1", "train.global_batch_size=6"):
            "--nodes: 3 nodes asked for, partition debug has 2",
        ("--gpus-per-node", "1"): "--gpus-per-node: 1 GPUs asked for, partition debug has no GPUs",
        ("--partition", "gpu"): "--partition: no partition 'gpu' (have: debug)",
        ("--cpus-per-task", "64"): "--cpus-per-task: 64 CPUs on each of 1 nodes asked for",
    }
    for flags, message in cases.items():
        rc, _, err = _main(capsys, "launch", "configs/tiny.yaml", "--slurm", *flags, "--submit", *ov)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err[-2000:])
    queue = subprocess.run(["squeue", "-h", "-t", "all"], capture_output=True, text=True, env=cli_env()).stdout
    assert str(tmp_path / "run") not in queue and not (tmp_path / "run").exists()


def test_dry_run_prints_a_stable_script_that_bash_accepts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)  # no cluster to check against: the script alone
    monkeypatch.chdir(ROOT)
    args = ["launch", "configs/demo.yaml", "--slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
            "--time", "04:00:00", "--account", "lm", "--dry-run", "train.global_batch_size=256",
            "train.micro_batch_size=8", "run.output_dir=runs/x", "data.shards=[data/a $(touch PWNED)]"]
    (rc, script, err), again = _main(capsys, *args), _main(capsys, *args)
    assert rc == 0, err[-3000:]
    assert again == (0, script, err)  # stable: no ports or times in it
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --account=lm",
                 "#SBATCH --signal=USR1@180", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={ROOT}/runs/x/slurm/job-%j.out", f"#SBATCH --chdir={ROOT}",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST"', 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    srun = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1 and "--ntasks-per-node 1" in srun[0] and "--output=" in srun[0]
    assert "-m torch.distributed.run --nnodes 4 --node-rank $SLURM_NODEID --nproc-per-node 8" in script
    assert "--nnodes 4 --nproc-per-node 8" in script and "'data.shards=[data/a $(touch PWNED)]'" in script
    f = tmp_path / "job.sbatch"
    f.write_text(script)
    assert subprocess.run(["bash", "-n", str(f)]).returncode == 0
    assert not (ROOT / "runs" / "x").exists() and not (ROOT / "PWNED").exists()  # --dry-run writes nothing


def test_conflicting_slurm_flags_are_refused(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.chdir(ROOT)
    cases = {
        ("--slurm", "--node-rank", "1"): "--node-rank: not with --slurm",
        ("--slurm", "--rdzv-endpoint", "h:1"): "--rdzv-endpoint: not with --slurm",
        ("--slurm", "--nnodes", "2"): "--nnodes: not with --slurm",
        ("--slurm", "--wait"): "--wait: only with --submit",
        ("--slurm", "--submit", "--dry-run"): "--submit: not with --dry-run",
        ("--nodes", "2"): "--nodes: only with --slurm",
        ("--slurm", "--gpus-per-node", "4", "--nproc-per-node", "2", "--dry-run"): "one rank per GPU",
        ("--slurm", "--partition", "a\nb", "--dry-run"): "--partition: 'a\\nb' holds characters",
        ("--slurm", "--nodes", "3", "--dry-run"): "is not divisible by micro_batch_size x world size = 8 x 6",
    }
    for flags, message in cases.items():
        rc, _, err = _main(capsys, "launch", "configs/demo.yaml", *flags)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err[-2000:])


def test_gres_and_exit_status_parsing():
    from prefpretrain.launcher.slurm import _gpus, job_exit_status

    assert [_gpus(g) for g in ("(null)", "gpu:4", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2", "gpu", "mps:100")] \
        == [0, 4, 4, 4, 1, 0]
    assert job_exit_status({"JobState": "COMPLETED", "ExitCode": "0:0"}) == 0
    assert job_exit_status({"JobState": "FAILED", "ExitCode": "2:0"}) == 2
    assert job_exit_status({"JobState": "CANCELLED", "ExitCode": "0:15"}) == 143
    assert job_exit_status({"JobState": "NODE_FAIL", "ExitCode": "0:0"}) == 1
