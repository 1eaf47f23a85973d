"""SLURM: write an sbatch script (one srun task per node, each a torchrun), check it, submit it, follow it.

The script's pre-emption path: `#SBATCH --signal=USR1@GRACE` makes SLURM send SIGUSR1 to every process of
the job step before the time limit (`scancel --signal=USR1 JOB` does the same by hand). The ranks save a
checkpoint and exit 4 (`prefpretrain launch` turns its own USR1 into SIGTERM for torchrun, which is
started with USR1 ignored so that it does not die of it); the script sees srun exit with 4 and runs
`scontrol requeue`; the next attempt (same job id, SLURM_RESTART_COUNT+1) resumes from that checkpoint.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefpretrain.errors import EXIT_PREEMPTED, ConfigError

log = logging.getLogger(__name__)

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "SPECIAL_EXIT", "REQUEUE_HOLD"}
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:+@-]+$")  # what may go into an #SBATCH line
# CPUs per GPU when neither a flag nor a SLURM controller says (e.g. `--dry-run` on a laptop): what a typical
# 8-GPU node has (2 x 32 cores or more); a dry run on the cluster itself asks the partition instead
FALLBACK_CPUS_PER_GPU = 8


@dataclass
class SlurmJob:
    """What `launch --slurm` was asked for, with every path absolute."""

    config: str
    overrides: list[str]
    run_dir: Path
    workdir: Path
    nodes: int
    nproc_per_node: int
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: settle_cpus() fills it in (and cpus_note: where it came from)
    cpus_per_gpu: int | None = None
    cpus_note: str = ""
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    signal_grace: int = 180
    max_restarts: int = 0
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"


def check_request(job: SlurmJob) -> None:
    """Requests that cannot make sense on any cluster (one line each, before anything is written)."""
    if job.nodes < 1:
        raise ConfigError(f"--nodes: {job.nodes}; at least 1")
    if job.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: {job.gpus_per_node}; 0 (CPU ranks) or more")
    if job.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node: {job.nproc_per_node}; at least 1")
    if job.gpus_per_node and job.nproc_per_node != job.gpus_per_node:
        raise ConfigError(f"--nproc-per-node: {job.nproc_per_node} ranks on {job.gpus_per_node} GPUs per node; "
                          f"one rank per GPU (leave --nproc-per-node out)")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task: {job.cpus_per_task}; at least 1")
    if job.cpus_per_gpu is not None:
        if not job.gpus_per_node:
            raise ConfigError("--cpus-per-gpu: only with --gpus-per-node 1 or more (CPU ranks: --cpus-per-task)")
        if job.cpus_per_task is not None:
            raise ConfigError("--cpus-per-gpu: not with --cpus-per-task; give one of them")
        if job.cpus_per_gpu < 1:
            raise ConfigError(f"--cpus-per-gpu: {job.cpus_per_gpu}; at least 1")
    if job.signal_grace < 1:
        raise ConfigError(f"--signal-grace: {job.signal_grace}; seconds before the time limit, at least 1")
    for flag, v in (("--partition", job.partition), ("--time", job.time), ("--account", job.account)):
        if v is not None and not _SAFE_VALUE.match(v):
            raise ConfigError(f"{flag}: {v!r} holds characters SLURM does not take here")
    for what, p in (("run.output_dir", job.run_dir), ("the working directory", job.workdir)):
        if re.search(r"[\s%'\"\\]", str(p)):
            raise ConfigError(f"{what}: {str(p)!r}: SLURM file names cannot hold spaces, quotes or '%'")


def sbatch_script(job: SlurmJob) -> str:
    """The batch script: readable, and the same text for the same request (no ports or times in it)."""
    q = shlex.quote
    cpus = job.cpus_per_task
    head = [
        "#!/bin/bash",
        "# Written by `prefpretrain launch --slurm`. Submit with: sbatch " + q(str(job.script_path)),
        f"# {job.nodes} node(s) x {job.nproc_per_node} rank(s): one srun task per node runs `prefpretrain launch`",
        "# (torchrun, c10d rendezvous on the first node). SIGUSR1 before the time limit (or `scancel --signal=USR1`)",
        "# reaches every rank: they save a checkpoint and exit 4, and this script requeues the job, whose next",
        "# attempt (same job id, SLURM_RESTART_COUNT+1) resumes from that checkpoint.",
        f"#SBATCH --job-name=prefpretrain-{_job_name(job.run_dir)}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if cpus is not None:
        if job.cpus_note:
            head.append(f"# --cpus-per-task={cpus}: {job.cpus_note}")
        head.append(f"#SBATCH --cpus-per-task={cpus}")
    if job.gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    for flag, v in (("partition", job.partition), ("time", job.time), ("account", job.account)):
        if v is not None:
            head.append(f"#SBATCH --{flag}={v}")
    head += [
        f"#SBATCH --signal=USR1@{job.signal_grace}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={job.run_dir}/slurm/job-%j.out",
        f"#SBATCH --chdir={job.workdir}",
        "#SBATCH --export=ALL",
        "",
    ]
    launch = [job.python, "-m", "prefpretrain", "launch", job.config, "--nnodes", str(job.nodes),
              "--nproc-per-node", str(job.nproc_per_node), "--max-restarts", str(job.max_restarts)]
    srun = ["srun", "--nodes", str(job.nodes), "--ntasks-per-node", "1"]
    if cpus is not None:  # srun 22.05 does not take it over from sbatch
        srun += ["--cpus-per-task", str(cpus)]
    threads = max(1, cpus // job.nproc_per_node) if cpus is not None else None
    body = [
        "set -u",
        f"run_dir={q(str(job.run_dir))}",
        "attempt=${SLURM_RESTART_COUNT:-0}",
        'echo "prefpretrain: job $SLURM_JOB_ID attempt $attempt on $SLURM_JOB_NODELIST, $(date -Is)"',
        "export PYTHONUNBUFFERED=1",
        *([f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}  # {cpus} CPUs per task / {job.nproc_per_node} "
           "ranks per node"] if threads else []),
        "",
        "# rendezvous on the first node, at the address SLURM itself reaches it by; a fresh port per attempt",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "head_addr=$(scontrol show node \"$head_node\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "port=$(( 20000 + (SLURM_JOB_ID * 8 + attempt) % 40000 ))",
        "",
        "# SIGUSR1 sent to this shell only (--signal=B:USR1, scancel --batch) goes on to every process of the step",
        'trap \'echo "prefpretrain: SIGUSR1, passing it on"; scancel --signal=USR1 "$SLURM_JOB_ID"\' USR1',
        "",
        "# one task per node; each node's log: $run_dir/slurm/job-JOBID-nodeN.out. The task on every node runs",
        "#   " + _torchrun_line(job),
        "# (SLURM_NODEID: 0..nodes-1) and turns SIGUSR1/SIGTERM into SIGTERM for it.",
        " ".join(q(a) for a in srun) + ' --output="$run_dir/slurm/job-%j-node%n.out" --open-mode=append \\',
        "    " + " ".join(q(a) for a in launch) + ' \\',
        '    --rdzv-endpoint "$head_addr:$port"' + "".join(" " + q(o) for o in job.overrides) + " &",
        "srun_pid=$!",
        "while :; do  # a trapped signal interrupts `wait`; wait again until srun has really exited",
        '    wait "$srun_pid"; rc=$?',
        '    kill -0 "$srun_pid" 2>/dev/null || break',
        "done",
        'echo "prefpretrain: srun exited with $rc, $(date -Is)"',
        f'if [ "$rc" -eq {EXIT_PREEMPTED} ]; then',
        "    # pre-empted: a checkpoint of the current step was written; the next attempt resumes from it",
        '    echo "prefpretrain: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(head + body) + "\n"


def _torchrun_line(job: SlurmJob) -> str:
    """The torchrun command each node's `prefpretrain launch` starts (for reading; the task builds it)."""
    from prefpretrain.launcher.local import torchrun_argv

    argv = torchrun_argv(job.config, job.overrides, job.nproc_per_node, job.max_restarts, job.nodes, 0,
                         "$head_addr:$port", job.run_dir.name)
    argv[argv.index("--node-rank") + 1] = "$SLURM_NODEID"
    return " ".join(argv)


def _job_name(run_dir: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name) or "run"


def write_script(job: SlurmJob) -> Path:
    p = job.script_path
    p.parent.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log directory
    p.write_text(sbatch_script(job))
    p.chmod(0o755)
    return p


# ---- the cluster: what it has, submit, follow


def _slurm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def reachable() -> bool:
    """Is there a SLURM controller to ask (client commands installed and answering)?"""
    conf = os.environ.get("SLURM_CONF")
    if not shutil.which("scontrol") or conf == "" or (conf is not None and not Path(conf).is_file()):
        return False  # (scontrol retries a missing SLURM_CONF for a minute)
    try:
        return _slurm("scontrol", "ping", timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _records(text: str) -> list[dict[str, str]]:
    """`scontrol show ... -o` lines as mappings."""
    return [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in text.splitlines() if ln.strip()]


def partition_info(name: str | None) -> dict[str, str]:
    r = _slurm("scontrol", "show", "partition", "-o")
    parts = _records(r.stdout) if r.returncode == 0 else []
    if not parts:
        raise ConfigError(f"--partition: SLURM lists no partitions ({_last_line(r)})")
    names = [p.get("PartitionName", "?") for p in parts]
    if name is None:
        default = [p for p in parts if p.get("Default") == "YES"]
        if not default:
            raise ConfigError(f"--partition: the cluster has no default partition; name one of {', '.join(names)}")
        return default[0]
    for p in parts:
        if p.get("PartitionName") == name:
            return p
    raise ConfigError(f"--partition: no partition {name!r} (have: {', '.join(names)})")


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES string: 'gpu:4', 'gpu:a100:4(S:0-1)', 'gpu:a100:2,gpu:v100:2' -> 4, 4, 4."""
    n = 0
    for item in gres.split(","):
        f = item.split("(")[0].split(":")
        if f[0] == "gpu":
            n += int(f[-1]) if f[-1].isdigit() else 1
    return n


def node_resources(partition: str) -> dict[str, tuple[int, int]]:
    """node -> (CPUs, GPUs) of the nodes in `partition`."""
    return parse_node_resources(_slurm("sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%G").stdout)


def parse_node_resources(text: str) -> dict[str, tuple[int, int]]:
    """`sinfo -h -N -o '%N|%c|%G'` lines (node|CPUs|GRES) -> {node: (CPUs, GPUs)}."""
    out = {}
    for ln in text.splitlines():
        if ln.count("|") == 2:
            node, cpus, gres = ln.split("|")
            out[node.strip()] = (int(cpus) if cpus.strip().isdigit() else 0, _gpus(gres.strip()))
    return out


def partition_cpus_per_gpu(part: dict[str, str], res: dict[str, tuple[int, int]],
                           gpus_per_node: int = 1) -> tuple[int, str] | None:
    """CPUs per GPU a partition gives, and where that comes from: its DefCpuPerGPU (`scontrol show partition -o`
    prints it as JobDefaults=DefCpuPerGPU=7,DefMemPerGPU=...), else the fewest CPUs per GPU on the nodes with
    `gpus_per_node` GPUs or more (`res`: node_resources()); None when neither says."""
    name = part.get("PartitionName", "?")
    defaults = dict(kv.split("=", 1) for kv in part.get("JobDefaults", "").split(",") if "=" in kv)
    v = defaults.get("DefCpuPerGPU", part.get("DefCpuPerGPU", ""))
    if v.isdigit() and int(v) > 0:
        return int(v), f"partition {name}: DefCpuPerGPU"
    per_gpu = [c // g for c, g in res.values() if c > 0 and g >= max(1, gpus_per_node)]
    if not per_gpu:
        return None
    return max(1, min(per_gpu)), f"partition {name}: the fewest CPUs per GPU of its nodes"


def settle_cpus(job: SlurmJob, part: dict[str, str] | None = None,
                res: dict[str, tuple[int, int]] | None = None) -> None:
    """Fill in job.cpus_per_task and job.cpus_note (where the number comes from). CPU ranks: one CPU each unless
    --cpus-per-task. GPU ranks: --cpus-per-task as given, else CPUs per GPU (--cpus-per-gpu, else the partition's
    `part`/`res` when a controller answered, else FALLBACK_CPUS_PER_GPU) x GPUs per node."""
    if job.cpus_per_task is not None:
        job.cpus_note = "as given (--cpus-per-task)"
        return
    if not job.gpus_per_node:
        job.cpus_per_task, job.cpus_note = job.nproc_per_node, "one CPU per rank (no GPUs)"
        return
    if job.cpus_per_gpu is not None:
        per_gpu, why = job.cpus_per_gpu, "--cpus-per-gpu"
    else:
        found = partition_cpus_per_gpu(part, res or {}, job.gpus_per_node) if part is not None else None
        if found is None:
            unsaid = "no SLURM controller answered" if part is None else "the partition does not say"
            found = FALLBACK_CPUS_PER_GPU, f"the default: {unsaid}"
        per_gpu, why = found
    job.cpus_per_task = per_gpu * job.gpus_per_node
    job.cpus_note = f"{per_gpu} CPUs per GPU ({why}) x {job.gpus_per_node} GPUs"


def check_cluster(job: SlurmJob) -> str:
    """One-line errors for what this cluster cannot run, after settle_cpus() with the partition's CPUs per GPU;
    returns the partition's name."""
    part = partition_info(job.partition)
    name = part["PartitionName"]
    total = int(part.get("TotalNodes", "0"))
    if job.nodes > total:
        raise ConfigError(f"--nodes: {job.nodes} nodes asked for, partition {name} has {total}")
    res = node_resources(name)
    if job.gpus_per_node:
        with_gpus = [n for n, (_, g) in res.items() if g >= job.gpus_per_node]
        if not any(g for _, g in res.values()):
            raise ConfigError(f"--gpus-per-node: {job.gpus_per_node} GPUs asked for, partition {name} has no GPUs "
                              f"(no GRES gpu on its nodes); use --gpus-per-node 0 for CPU ranks")
        if len(with_gpus) < job.nodes:
            raise ConfigError(f"--gpus-per-node: {job.nodes} nodes with {job.gpus_per_node} GPUs asked for, "
                              f"partition {name} has {len(with_gpus)}")
    settle_cpus(job, part, res)
    if job.cpus_per_task:
        fit = [n for n, (c, _) in res.items() if c >= job.cpus_per_task]
        if len(fit) < job.nodes:
            most = max((c for c, _ in res.values()), default=0)
            given = job.cpus_note.startswith("as given")
            flag = "--cpus-per-gpu" if job.gpus_per_node and not given else "--cpus-per-task"
            why = "" if given else f" ({job.cpus_note})"
            raise ConfigError(f"{flag}: {job.cpus_per_task} CPUs on each of {job.nodes} nodes asked for{why}; "
                              f"partition {name} has {len(fit)} such nodes (at most {most} CPUs per node)")
    return name


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = (r.stderr.strip() or r.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit code {r.returncode}"


def sbatch_test_only(script: Path) -> None:
    """`sbatch --test-only`: SLURM's own verdict on the request, without submitting it."""
    r = _slurm("sbatch", "--test-only", str(script))
    if r.returncode != 0:
        raise ConfigError(f"sbatch refuses the job: {_last_line(r).removeprefix('sbatch: error: ')}")


def submit(script: Path) -> str:
    r = _slurm("sbatch", "--parsable", str(script))
    if r.returncode != 0:
        raise ConfigError(f"sbatch refuses the job: {_last_line(r).removeprefix('sbatch: error: ')}")
    return r.stdout.strip().split(";")[0]


def job_record(job_id: str) -> dict[str, str] | None:
    r = _slurm("scontrol", "show", "job", "-o", job_id)
    recs = _records(r.stdout) if r.returncode == 0 else []
    return recs[0] if recs else None


def job_exit_status(rec: dict[str, str]) -> int:
    """The batch script's exit status from ExitCode=CODE:SIGNAL (128+signal when killed by one)."""
    code, _, sig = rec.get("ExitCode", "1:0").partition(":")
    if sig.isdigit() and int(sig):
        return 128 + int(sig)
    rc = int(code) if code.isdigit() else 1
    return rc if rc or rec.get("JobState") == "COMPLETED" else 1


def wait(job_id: str, poll_s: float = 1.0, settle_s: float = 2.0) -> int:
    """Follow the job through its attempts (a requeued job keeps its id) until it has really finished."""
    seen: tuple | None = None
    while True:
        rec = job_record(job_id)
        if rec is None:
            raise RuntimeError(f"job {job_id}: SLURM no longer knows it (MinJobAge passed?)")
        state = rec.get("JobState", "?")
        now = (state, rec.get("Restarts", "0"))
        if now != seen:
            log.info("job %s: %s (attempt %d, %s)", job_id, state, int(now[1]) + 1,
                     rec.get("NodeList") if state == "RUNNING" else rec.get("Reason"))
            seen = now
        if state in FINAL_STATES:
            time.sleep(settle_s)  # a requeue in flight would show up as a new state or restart count
            again = job_record(job_id) or rec
            if (again.get("JobState"), again.get("Restarts", "0")) == now:
                return job_exit_status(again)
            continue
        time.sleep(poll_s)
