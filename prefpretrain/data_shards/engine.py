"""Where shard tasks run: HF datatrove's executors (local processes, a SLURM array job, a Ray cluster).

datatrove is the engine FineWeb was built with; it brings what a home-made scheduler would have to grow:
per-task logs, completion markers (a finished task is never run again), a SLURM array job with requeue
on SIGUSR1 and a cap on array size, a Ray executor, and stats. prefpretrain gives it one pipeline step,
`ShardTask` (task.py); the plan (plan.py) was written before, and the manifest is merged after (writer.py).

The SLURM array runs `python -m prefpretrain.data_shards.engine` (this module) in every array task, which
rebuilds the executor from plain arguments: datatrove's own launcher would unpickle an executor file
(`executor.pik`), and nothing prefpretrain runs unpickles a file.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.stats import PipelineStats

from prefpretrain.data_shards.task import ShardTask
from prefpretrain.host import cpus_available

log = logging.getLogger(__name__)

POLL_S = 2.0


@dataclass
class Cluster:
    """The SLURM request of `shard --executor slurm` (the flags `launch --slurm` has)."""

    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # CPUs of one array task (default: --workers, else 1)
    gpus_per_task: int = 0  # GPUs of one array task (a classifier scorer on device auto uses the first)
    python: str = field(default_factory=lambda: sys.executable)


def engine_dir(out: Path, executor: str, tasks: int) -> Path:
    """datatrove's logging directory: task logs, completion markers, stats (one per executor and task count)."""
    return out / "_progress" / "engine" / f"{executor}-{tasks}"


class EngineError(RuntimeError):
    """Tasks that did not finish; the message names each with its log."""


def run_tasks(out: Path, tasks: int, executor: str, workers: int, progress: bool, cluster: Cluster | None = None,
              dry_run: bool = False) -> str | None:
    """Run the plan's tasks on `executor` and wait for them; raise EngineError naming unfinished tasks with their
    logs. `workers`: scoring processes (0: the CPUs a task may use). With `dry_run`, return what would run (the
    SLURM script, or one line) and start nothing."""
    if tasks < 1:
        raise ValueError(f"--tasks: {tasks}; at least 1")
    if executor == "local":
        return _local(out, tasks, workers or cpus_available(), progress, dry_run)
    if executor == "slurm":
        return _slurm(out, tasks, workers, cluster or Cluster(), dry_run)
    if executor == "ray":
        return _ray(out, tasks, workers or cpus_available(), dry_run)
    raise ValueError(f"--executor: {executor!r}; local, slurm or ray")


def _check_done(ex, out: Path, executor: str, tasks: int, extra_logs=None) -> None:
    left = ex.get_incomplete_ranks(skip_completed=True)
    if left:
        logs = engine_dir(out, executor, tasks) / "logs"
        lines = [f"task {r} of {tasks} did not finish: log {logs / f'task_{r:05d}.log'}"
                 + (f", {extra_logs(r)}" if extra_logs else "") for r in left]
        raise EngineError("; ".join(lines) + ". Run the same command again to run the unfinished tasks "
                                             "(finished ones are not redone).")


# ---- local: processes on this machine


class _Local(LocalPipelineExecutor):
    """datatrove's local executor, where a failed task does not stop the others (datatrove's own pool ends at the
    first error, killing tasks midway): the failure is in the task's log, and reported after."""

    def _launch_run_for_rank(self, rank: int, ranks_q, completed=None, completed_lock=None):
        try:
            return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)
        except Exception:  # noqa: BLE001 - logged by datatrove in the task's log; _check_done reports it
            return PipelineStats()


def _local(out: Path, tasks: int, workers: int, progress: bool, dry_run: bool) -> str | None:
    # one task: it runs in this process and scores with a pool of `workers`; several: each task is a process
    # of datatrove's pool (daemonic, so it cannot have a pool of its own) and scores in itself
    per_task, at_once = (workers, 1) if tasks == 1 else (1, min(tasks, workers))
    if dry_run:
        return (f"local: {tasks} task(s), {at_once} at a time, {per_task} scoring process(es) each; logs "
                f"{engine_dir(out, 'local', tasks)}/logs")
    step = ShardTask(str(out), per_task, progress and tasks == 1)
    ex = _Local([step], tasks=tasks, workers=at_once, logging_dir=str(engine_dir(out, "local", tasks)),
                start_method="spawn")
    ex.run()
    _check_done(ex, out, "local", tasks)
    return None


# ---- Ray: a running cluster, or a local one


def _ray(out: Path, tasks: int, workers: int, dry_run: bool) -> str | None:
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'prefpretrain[ray]'") from None
    from datatrove.executor.ray import RayPipelineExecutor

    per_task = max(1, workers // tasks) if tasks > 1 else workers
    if dry_run:
        return f"ray: {tasks} task(s), {per_task} CPU(s) each, on the Ray cluster at RAY_ADDRESS or a local one"
    if not ray.is_initialized():
        try:
            ray.init(address="auto", log_to_driver=False)
        except ConnectionError:
            log.info("shard: no running Ray cluster; starting a local one")
            ray.init(num_cpus=max(workers, tasks), log_to_driver=False, include_dashboard=False)
    ex = RayPipelineExecutor([ShardTask(str(out), 1)], tasks=tasks, workers=tasks, cpus_per_task=1,
                             mem_per_cpu_gb=0.5, logging_dir=str(engine_dir(out, "ray", tasks)))
    try:
        ex.run()
    except Exception as e:  # noqa: BLE001 - reported with the task logs below
        log.error("shard: a Ray task failed: %s: %s", type(e).__name__, e)
    _check_done(ex, out, "ray", tasks)
    return None


# ---- SLURM: an array job, one array task per shard task


class _ShardArray(SlurmPipelineExecutor):
    """datatrove's array job, running this module (no pickle), without its stats-merging job (we merge)."""

    def __init__(self, out: Path, tasks: int, workers: int, cluster: Cluster):
        self.cpus = cluster.cpus_per_task or workers or 1
        self.cluster, self.task_argv = cluster, task_argv(out, tasks, workers, cluster)
        edir = engine_dir(out, "slurm", tasks)
        super().__init__([ShardTask(str(out), self.cpus)], tasks=tasks, time=cluster.time,
                         partition=cluster.partition, cpus_per_task=self.cpus, qos=None, mail_user=None,
                         job_name=f"prefpretrain-shard-{out.name}"[:60], logging_dir=str(edir),
                         slurm_logs_folder=str(edir / "slurm_logs"))

    def get_launch_file_contents(self, sbatch_args: dict, run_script: str) -> str:
        run = " ".join(shlex.quote(a) for a in self.task_argv)
        return super().get_launch_file_contents(sbatch_args, f"srun -l -n 1 --cpus-per-task {self.cpus} {run}")

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        a = {"job-name": self.job_name, "cpus-per-task": self.cpus, "nodes": 1,
             "output": f"{self.slurm_logs_folder}/%A_%a.out", "error": f"{self.slurm_logs_folder}/%A_%a.out",
             "array": f"0-{max_array - 1}", "requeue": "", "open-mode": "append"}
        c = self.cluster
        if c.gpus_per_task:
            a["gres"] = f"gpu:{c.gpus_per_task}"
        for k, v in (("partition", c.partition), ("time", c.time), ("account", c.account)):
            if v is not None:
                a[k] = v
        return a

    def launch_merge_stats(self) -> None:
        pass


def task_argv(out: Path, tasks: int, workers: int, cluster: Cluster) -> list[str]:
    argv = [cluster.python, "-m", "prefpretrain.data_shards.engine", str(out.resolve()), str(tasks), str(workers),
            str(cluster.cpus_per_task or 0)]
    return argv + [f"--{k}={v}" for k, v in (("partition", cluster.partition), ("time", cluster.time),
                                              ("account", cluster.account), ("gpus", cluster.gpus_per_task or None))
                   if v is not None]


def _squeue(job_id: str) -> list[str]:
    """States of the job's array tasks still pending or running (empty: none left)."""
    r = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:
            return []
        raise EngineError(f"squeue -j {job_id}: {r.stderr.strip() or r.returncode}")
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]


def _slurm(out: Path, tasks: int, workers: int, cluster: Cluster, dry_run: bool) -> str | None:
    out = out.resolve()
    ex = _ShardArray(out, tasks, workers, cluster)
    if dry_run:
        return ex.get_launch_file_contents(ex.get_sbatch_args(tasks), "")
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        raise ValueError("--executor slurm: sbatch/squeue are not on PATH (run on a SLURM login node)")
    edir = engine_dir(out, "slurm", tasks)
    job_file = edir / "job.json"
    job_id = json.loads(job_file.read_text())["job_id"] if job_file.is_file() else None
    if job_id is not None and _squeue(job_id):
        log.info("shard: SLURM job %s of this shard set is still running; following it", job_id)
    else:
        Path(ex.slurm_logs_folder).mkdir(parents=True, exist_ok=True)
        ex.launch_job()
        if ex.job_id in (None, -1):  # every task finished before
            return None
        job_id = str(ex.job_id)
        (edir / "executor.pik").unlink(missing_ok=True)  # datatrove writes it; nothing here reads it
        job_file.write_text(json.dumps({"job_id": job_id, "submitted": time.time()}))
        log.info("shard: submitted SLURM array job %s (%d tasks); logs in %s", job_id, tasks, ex.slurm_logs_folder)
    while _squeue(job_id):
        time.sleep(POLL_S)
    ranks = json.loads((edir / "ranks_to_run.json").read_text())

    def slurm_log(r: int) -> str:
        i = ranks.index(r) if r in ranks else "?"
        return f"SLURM log {ex.slurm_logs_folder}/{job_id}_{i}.out"

    _check_done(ex, out, "slurm", tasks, slurm_log)
    return None


def main(argv: list[str]) -> int:
    """Inside one SLURM array task: rebuild the executor and run this array index's shard task(s)."""
    out, tasks, workers, cpus, *flags = argv
    kw = dict(f[2:].split("=", 1) for f in flags)
    cluster = Cluster(kw.get("partition"), kw.get("time"), kw.get("account"), int(cpus) or None, int(kw.get("gpus", 0)))
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        print("prefpretrain.data_shards.engine: runs inside a SLURM array task (use `prefpretrain shard`)",
              file=sys.stderr)
        return 2
    _ShardArray(Path(out), int(tasks), int(workers), cluster).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
