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

import fcntl
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor

from prefpretrain.data_shards.task import ShardTask
from prefpretrain.errors import TasksFailed
from prefpretrain.host import cpus_available
from prefpretrain.rundir import atomic_write

log = logging.getLogger(__name__)

POLL_S = 5.0  # how often the command asks SLURM whether the array is done


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


class EngineError(TasksFailed):
    """Tasks that did not finish; the message names each with its log."""


def slurm_job_file(out: Path) -> Path:
    """The SLURM array job writing this shard set (one per directory, whatever the task count)."""
    return out / "_progress" / "slurm_job.json"


def running_slurm_job(out: Path) -> dict | None:
    """{job_id, tasks} of this shard set's array job while SLURM still lists it; else None."""
    f = slurm_job_file(out)
    if not f.is_file() or not shutil.which("squeue"):
        return None
    job = json.loads(f.read_text())
    return job if _squeue(job["job_id"]) else None


@contextmanager
def exclusive(out: Path, executor: str, tasks: int, overwrite: bool):
    """One writer of a shard directory at a time: a lock held by this command (on the shared filesystem too), and
    no new work while an array job of an earlier command still runs (unless this is that job, to be followed)."""
    from prefpretrain.data_shards.plan import check_writable

    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".shard.lock", "a+") as f:
        try:  # a POSIX lock: the process's own (not inherited by the processes it forks, freed when it dies)
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{out}: another `prefpretrain shard` is writing it (holds {out}/.shard.lock)") from None
        job = running_slurm_job(out)
        if job is not None and (overwrite or executor != "slurm" or job["tasks"] != tasks):
            raise ValueError(f"{out}: SLURM array job {job['job_id']} ({job['tasks']} tasks) of this shard set is "
                             f"still running; wait for it (the command that started it follows it) or scancel it")
        yield


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


def _run_rank(ex: LocalPipelineExecutor, rank: int) -> None:
    ex._run_for_rank(rank)


class _Local(LocalPipelineExecutor):
    """datatrove's local executor (its task runner, logs, completion markers), where a failed task does not stop
    the others and a killed one does not hang the command (datatrove's own pool ends at the first error, killing
    tasks midway, and waits for ever on a task whose process was killed): tasks run on a ProcessPoolExecutor,
    whose broken pool is an error. A failure is in the task's log (datatrove writes it) and reported after."""

    def run(self):
        ranks = self.get_incomplete_ranks()
        if len(ranks) < self.tasks:  # (datatrove's completion markers)
            log.info("shard: %d of %d tasks finished before; not run again", self.tasks - len(ranks), self.tasks)
        if not ranks:
            return None
        self.save_executor_as_json()
        if self.workers == 1:  # one at a time, in this process (where one task scores with its own pool); no
            for r in ranks:    # multiprocess.Manager as datatrove's run() starts: it outlives a killed command
                try:
                    self._run_for_rank(r)
                except Exception as e:  # noqa: BLE001 - in the task's log; reported by _check_done
                    log.error("shard: task %d did not finish (%s: %s)", r, type(e).__name__, e)
            return None
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_rank, self, r): r for r in ranks}
            for f in as_completed(futures):
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - BrokenProcessPool (a killed task) or the task's own error
                    log.error("shard: task %d did not finish (%s: %s)", futures[f], type(e).__name__, e)
        return None


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

    if dry_run:
        return (f"ray: {tasks} task(s), 1 CPU (one scoring process) each, on the Ray cluster ray.init('auto') "
                f"finds, else a local one")
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


def _squeue(job_id: str, tries: int = 5) -> list[str]:
    """States of the job's array tasks still pending or running (empty: none left); a controller that does not
    answer is asked again (a few times, a few seconds apart) before it is an error."""
    why = ""
    for attempt in range(tries):
        try:
            r = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                               timeout=60)
        except subprocess.TimeoutExpired:
            why = "timed out"
        else:
            if r.returncode == 0:
                return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
            if "Invalid job id" in r.stderr:
                return []
            why = r.stderr.strip() or f"exit {r.returncode}"
        time.sleep(min(30, 2 ** attempt))
    raise EngineError(f"squeue -j {job_id}: {why} ({tries} tries); the job may still be running: run the same "
                      f"command again to follow it")


def _slurm(out: Path, tasks: int, workers: int, cluster: Cluster, dry_run: bool) -> str | None:
    out = out.resolve()
    ex = _ShardArray(out, tasks, workers, cluster)
    if dry_run:
        return ex.get_launch_file_contents(ex.get_sbatch_args(tasks), "")
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        raise ValueError("--executor slurm: sbatch/squeue are not on PATH (run on a SLURM login node)")
    edir = engine_dir(out, "slurm", tasks)
    job_file = slurm_job_file(out)
    running = running_slurm_job(out)  # (exclusive() let only a job of this task count through)
    if running is not None:
        job_id = running["job_id"]
        log.info("shard: SLURM job %s of this shard set is still running; following it", job_id)
    else:
        Path(ex.slurm_logs_folder).mkdir(parents=True, exist_ok=True)
        try:
            ex.launch_job()
        except subprocess.CalledProcessError as e:  # sbatch refused the script (its own message says why)
            raise ValueError(f"sbatch refused the shard array job (exit {e.returncode}; its message is above); the "
                             f"script is {edir}/launch_script.slurm") from None
        if ex.job_id in (None, -1):  # every task finished before
            return None
        job_id = str(ex.job_id)
        (edir / "executor.pik").unlink(missing_ok=True)  # datatrove writes it; nothing here reads it
        atomic_write(job_file, json.dumps({"job_id": job_id, "tasks": tasks, "submitted": time.time()}))
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
