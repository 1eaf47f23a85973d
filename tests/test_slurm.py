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


def _no_controller(monkeypatch, tmp_path: Path) -> None:
    """No SLURM controller to ask: `reachable()` is False at once for a SLURM_CONF that does not exist."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-slurm.conf"))


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
    _no_controller(monkeypatch, tmp_path)  # no cluster to check against: the script alone
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


def test_conflicting_slurm_flags_are_refused(tmp_path, capsys, monkeypatch):
    _no_controller(monkeypatch, tmp_path)
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
        ("--slurm", "--gpus-per-node", "8", "--cpus-per-task", "20", "--cpus-per-gpu", "2", "--dry-run"):
            "--cpus-per-gpu: not with --cpus-per-task; give one of them",
        ("--slurm", "--gpus-per-node", "8", "--cpus-per-gpu", "0", "--dry-run"): "--cpus-per-gpu: 0; at least 1",
        ("--slurm", "--cpus-per-gpu", "4", "--dry-run"): "--cpus-per-gpu: only with --gpus-per-node 1 or more",
        ("--cpus-per-gpu", "4"): "--cpus-per-gpu: only with --slurm",
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


@pytest.mark.parametrize("flags, cpus, threads, note", [
    ((), 64, 8, "8 CPUs per GPU (the default: no SLURM controller answered) x 8 GPUs"),
    (("--cpus-per-gpu", "4"), 32, 4, "4 CPUs per GPU (--cpus-per-gpu) x 8 GPUs"),
    (("--cpus-per-task", "20"), 20, 2, "as given (--cpus-per-task)"),
])
def test_dry_run_gpu_job_binds_cpus(flags, cpus, threads, note, tmp_path, capsys, monkeypatch):
    _no_controller(monkeypatch, tmp_path)
    monkeypatch.chdir(ROOT)
    args = ["launch", "configs/demo.yaml", "--slurm", "--nodes", "2", "--gpus-per-node", "8", *flags, "--dry-run",
            "train.global_batch_size=128", "run.output_dir=runs/x"]
    (rc, script, err), again = _main(capsys, *args), _main(capsys, *args)
    assert rc == 0, err[-3000:]
    assert again == (0, script, err)  # the same request gives the same text
    lines = script.splitlines()
    assert f"# --cpus-per-task={cpus}: {note}" in lines and f"#SBATCH --cpus-per-task={cpus}" in lines
    assert lines.index(f"#SBATCH --cpus-per-task={cpus}") < lines.index("#SBATCH --gpus-per-node=8")
    srun = [ln for ln in lines if ln.startswith("srun ")]
    assert len(srun) == 1 and f" --cpus-per-task {cpus} " in srun[0]
    assert f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}  # {cpus} CPUs per task / 8 ranks per node" \
        in lines
    f = tmp_path / "job.sbatch"
    f.write_text(script)
    assert subprocess.run(["bash", "-n", str(f)]).returncode == 0


# what `scontrol show partition -o` and `sinfo -h -N -o '%N|%c|%G'` print (fields shortened)
PARTITIONS = (
    "PartitionName=cpu AllowGroups=ALL Default=YES MaxTime=UNLIMITED Nodes=c[1-2] State=UP TotalCPUs=256 "
    "TotalNodes=2 JobDefaults=(null) DefMemPerCPU=2150 MaxMemPerNode=UNLIMITED TRES=cpu=256,mem=1000G,node=2\n"
    "PartitionName=gpu AllowGroups=ALL Default=NO MaxTime=2-00:00:00 Nodes=g[1-3] State=UP TotalCPUs=304 "
    "TotalNodes=3 JobDefaults=DefCpuPerGPU=7,DefMemPerGPU=94000 DefMemPerCPU=8000 TRES=cpu=304,gres/gpu=24\n"
    "PartitionName=gpu2 Default=NO Nodes=g[1-3],h1 State=UP TotalCPUs=400 TotalNodes=4 JobDefaults=(null)\n"
)
NODES = {
    "gpu": "g1|112|gpu:h100:8(S:0-1)\ng2|96|gpu:a100:4,gpu:v100:4\ng3|96|gpu:8\n",
    "gpu2": "g1|112|gpu:h100:8(S:0-1)\ng2|96|gpu:a100:4,gpu:v100:4\ng3|96|gpu:8\nh1|96|gpu:2\n",
    "cpu": "c1|128|(null)\nc2|128|(null)\n",
}


def test_partition_cpus_per_gpu_from_scontrol_and_sinfo_text():
    from prefpretrain.launcher.slurm import _records, parse_node_resources, partition_cpus_per_gpu

    parts = {p["PartitionName"]: p for p in _records(PARTITIONS)}
    gpu, gpu2 = parse_node_resources(NODES["gpu"]), parse_node_resources(NODES["gpu2"])
    assert gpu == {"g1": (112, 8), "g2": (96, 8), "g3": (96, 8)}
    assert partition_cpus_per_gpu(parts["gpu"], gpu, 8) == (7, "partition gpu: DefCpuPerGPU")
    assert partition_cpus_per_gpu({"PartitionName": "x", "DefCpuPerGPU": "5"}, {}) == (5, "partition x: DefCpuPerGPU")
    # no DefCpuPerGPU: the fewest CPUs per GPU over the nodes that can hold the job's GPUs (h1: 2 GPUs, 48 each)
    fewest = "partition gpu2: the fewest CPUs per GPU of its nodes"
    assert partition_cpus_per_gpu(parts["gpu2"], gpu2, 8) == (12, fewest)
    assert partition_cpus_per_gpu(parts["gpu2"], gpu2, 2) == (12, fewest)
    assert partition_cpus_per_gpu(parts["gpu2"], {"a": (4, 8)}, 8) == (1, fewest)  # fewer CPUs than GPUs: 1
    assert partition_cpus_per_gpu(parts["cpu"], parse_node_resources(NODES["cpu"]), 1) is None


def test_check_cluster_takes_the_partitions_cpus_per_gpu(tmp_path, monkeypatch):
    from prefpretrain.config import ConfigError
    from prefpretrain.launcher import slurm

    def fake(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        out = PARTITIONS if argv[:3] == ("scontrol", "show", "partition") else NODES[argv[argv.index("-p") + 1]]
        return subprocess.CompletedProcess(list(argv), 0, out, "")

    monkeypatch.setattr(slurm, "_slurm", fake)

    def job(**kw) -> slurm.SlurmJob:
        kw = {"nodes": 2, "nproc_per_node": 8, "gpus_per_node": 8, **kw}
        return slurm.SlurmJob(config="c.yaml", overrides=[], run_dir=tmp_path / "run", workdir=tmp_path, **kw)

    j = job(partition="gpu")
    assert slurm.check_cluster(j) == "gpu" and j.cpus_per_task == 56
    script = slurm.sbatch_script(j)
    assert "# --cpus-per-task=56: 7 CPUs per GPU (partition gpu: DefCpuPerGPU) x 8 GPUs\n" in script
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-7}" in script
    j = job(partition="gpu2")
    slurm.check_cluster(j)
    assert (j.cpus_per_task, j.cpus_note) == (96, "12 CPUs per GPU (partition gpu2: the fewest CPUs per GPU of its "
                                                   "nodes) x 8 GPUs")
    with pytest.raises(ConfigError, match=r"^--cpus-per-gpu: 128 CPUs on each of 2 nodes asked for \(16 CPUs per GPU "
                                          r"\(--cpus-per-gpu\) x 8 GPUs\); partition gpu has 0 such nodes \(at most "
                                          r"112 CPUs per node\)$"):
        slurm.check_cluster(job(partition="gpu", cpus_per_gpu=16))
    with pytest.raises(ConfigError, match=r"^--cpus-per-task: 100 CPUs on each of 2 nodes asked for; partition gpu "
                                          r"has 1 such nodes"):
        slurm.check_cluster(job(partition="gpu", cpus_per_task=100))


def test_threads_per_rank_and_child_env_follow_the_cpu_affinity(monkeypatch):
    from prefpretrain.launcher import local

    assert [local.threads_per_rank(c, r) for c, r in ((64, 8), (20, 8), (2, 8), (7, 1), (7, 0))] == [8, 2, 1, 7, 7]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert local.child_env(4)["OMP_NUM_THREADS"] == "3"  # 12 CPUs this process may use, not os.cpu_count()
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert local.child_env(4)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # a user's own setting wins
    assert local.child_env(4)["OMP_NUM_THREADS"] == "5"


def test_shard_array_job_on_both_nodes_reports_a_failed_task_and_equals_one_task(slurm, tmp_path):
    """`shard --executor slurm --tasks 2`: a real array job (one task per node); a task that fails is named with
    its logs, the same command runs it again (only it), and the result equals the one-task result."""
    from prefpretrain.data_shards import engine, plan
    from prefpretrain.data_shards.build import build_shards
    from tests.test_shard_engine import _opt, _same_set

    build_shards(_opt(tmp_path / "one"))
    out = tmp_path / "array"
    opt = _opt(out, tasks=2, executor="slurm")
    plan.make_plan(opt)
    (out / "train-000001-000.tar").mkdir()  # task 1 writes chunk 1 and cannot open its first tar
    cmd = ("shard", "--input", *opt.inputs, "--output", str(out), "--tasks", "2", "--executor", "slurm",
           "--cpus-per-task", str(os.cpu_count()), "--shard-size-mb", "0.3", "--vocab-size", "1024")
    r = run_cli(*cmd, timeout=300)
    edir = engine.engine_dir(out, "slurm", 2)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"task 1 of 2 did not finish: log {edir}/logs/task_00001.log, SLURM log {edir}/slurm_logs/" in r.stderr
    assert "task 0" not in r.stderr.split("prefpretrain shard:")[-1]
    job = json.loads((out / "_progress" / "slurm_job.json").read_text())["job_id"]
    nodes = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    assert {"NodeList=n1", "NodeList=n2"} <= set(nodes.split()), nodes  # one array task on each node
    assert not (edir / "executor.pik").exists()

    (out / "train-000001-000.tar").rmdir()
    r = run_cli(*cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((edir / "ranks_to_run.json").read_text()) == [1]  # the finished task is not redone
    _same_set(tmp_path / "one", out)
