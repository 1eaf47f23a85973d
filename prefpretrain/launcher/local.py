"""Start ranks on this machine with torchrun (c10d rendezvous); argv lists only, never a shell."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from prefpretrain.errors import EXIT_PREEMPTED
from prefpretrain.host import cpus_available, extensions_cache, free_port
from prefpretrain.launcher.children import die_with_parent, kill_tree

log = logging.getLogger(__name__)



def torchrun_argv(config: str, overrides: list[str], nproc_per_node: int, max_restarts: int = 0,
                  nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                  rdzv_id: str = "prefpretrain") -> list[str]:
    """The torchrun command of one node. One node without an endpoint gets a free local port."""
    if rdzv_endpoint is None:
        if nnodes > 1:
            raise ValueError("--rdzv-endpoint HOST:PORT is needed with more than one node")
        rdzv_endpoint = f"127.0.0.1:{free_port()}"
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id,
        "--max-restarts", str(max_restarts),
        "-m", "prefpretrain", "train", config, *overrides,
    ]


def threads_per_rank(cpus_available: int, ranks: int) -> int:
    """OpenMP threads per rank so that ranks x threads does not exceed the CPUs (at least 1)."""
    return max(1, cpus_available // max(1, ranks))


def child_env(nproc_per_node: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    # ranks x threads must not exceed the CPUs this process may run on: its affinity (under SLURM the task's
    # CPUs), not the whole machine's; a user's OMP_NUM_THREADS wins
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(cpus_available(), nproc_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["TORCH_EXTENSIONS_DIR"] = extensions_cache()
    return env


def launch_local(config: str, overrides: list[str], nproc_per_node: int, max_restarts: int = 0,
                 run_dir: str | None = None, argv: list[str] | None = None, **node) -> int:
    """Run torchrun for this node (`node`: nnodes, node_rank, rdzv_endpoint, rdzv_id), or the given launcher
    `argv`; a failed run's own exit code (RUN/failure.json) is returned instead of the launcher's 1."""
    import time
    from pathlib import Path

    from prefpretrain.rundir import read_failure

    argv = argv or torchrun_argv(config, overrides, nproc_per_node, max_restarts, **node)
    log.info("launch: %s", " ".join(argv))
    t0 = time.time()
    # torchrun starts with SIGUSR1 blocked (the mask is inherited through fork and exec): SLURM signals every
    # process of a job step, and torchrun would die of an unhandled SIGUSR1 and orphan the ranks. The ranks
    # inherit the mask and unblock it once their handler is in place, so a SIGUSR1 that came during start-up
    # is still acted on; so does this process (`cmd_launch` blocks it first thing) once its handler is set.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    # torchrun runs in a session of its own (a terminal's Ctrl-C reaches this process alone, which passes it on
    # once) and dies with this process, even a SIGKILLed one: no rank outlives the launch
    proc = subprocess.Popen(argv, env=child_env(nproc_per_node), start_new_session=True, preexec_fn=die_with_parent())
    # pre-emption (SIGTERM, SLURM's SIGUSR1, Ctrl-C) goes to torchrun as SIGTERM, which it passes to the ranks;
    # a second Ctrl-C ends torchrun and the ranks at once
    stop: list[int] = []

    def forward(signum, _frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in stop:
            log.warning("second Ctrl-C: stopping torchrun and the ranks now, without a checkpoint")
            kill_tree(proc.pid)
        else:
            proc.send_signal(signal.SIGTERM)
        stop.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stop.count(signal.SIGINT) >= 2:
        # stopped at once on a second Ctrl-C (not a pre-emption), even when the ranks had just finished the first
        # one's checkpoint and said so in failure.json: the user's second Ctrl-C decides the exit code
        return 130
    if rc != 0 and run_dir is not None:
        failure = read_failure(Path(run_dir), t0)
        if failure is not None:
            log.error("run stopped (%s): %s", failure["reason"], failure["message"])
            return int(failure["exit_code"])
    if rc != 0 and stop:  # stopped before the ranks were up (or could save): the newest checkpoint stays the
        log.warning("stopped by %s before the ranks could save a checkpoint (torchrun exit %d); a restart resumes "
                    "from the newest one there is", signal.Signals(stop[0]).name, rc)
        return EXIT_PREEMPTED
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention
