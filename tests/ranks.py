"""Ranks for the tests without paying their start-up each time: `train_ranks(n, config, overrides)` runs
`prefpretrain train CONFIG OVERRIDES` as n real rank processes, each with the environment torchrun gives a rank
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), the launcher's (OMP threads, extensions cache) and the
CLI's (offline, weights-only loading). They are forked from a multiprocessing forkserver that imported torch,
transformers and DeepSpeed once per test worker: on 2 CPUs a rank's imports are ~10 s of a ~20 s tiny launch.

Everything after the imports is the product's own code path (`prefpretrain.cli.entry`, real torch.distributed
over gloo, real DeepSpeed engines); only torchrun is not in it. Tests whose subject is the launcher itself
(signals, restarts, rendezvous, SLURM, exit codes as a user sees them) use `prefpretrain launch` instead, and
tests/test_train_dist.py checks that both give the same run."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imported once by the forkserver, before any rank is forked from it; nothing here starts a thread
PRELOAD = ["torch", "transformers", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert", "deepspeed",
           # DeepSpeed imports its Muon optimizer (and with it torch._inductor, ~3.5 s) when it checks a client
           # optimizer, in every rank
           "deepspeed.runtime.zero.muon.muon_optimizer",
           "prefpretrain.cli", "prefpretrain.cli.commands", "prefpretrain.trainer.loop",
           "prefpretrain.trainer.evaluate"]
# set in this process before the forkserver starts (it inherits them): what the CLI and the launcher set for
# every process of a run, and what is read once at import time (the hub's offline switch, DeepSpeed's accelerator)
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
              "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
_context = None


def _forkserver():
    """The forkserver, started once per test process with SERVER_ENV, which this process keeps only while
    starting it (a test of this process must not run with, say, weights-only loading forced)."""
    global _context
    if _context is None:
        from multiprocessing import forkserver

        saved = dict(os.environ)
        os.environ.update(SERVER_ENV)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        try:
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return _context


def _rank(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """One process: its environment (a rank's: what torchrun would give it), its output in files, then the CLI's
    entry point (which ends a `train` rank with os._exit and its exit code, any other command with SystemExit).
    It leads a process group of its own (the test stops it and whatever it started) and gets SIGTERM when the
    forkserver dies (which dies with the test process)."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.setpgid(0, 0)
    from prefpretrain.launcher.children import die_with

    die_with(os.getppid())
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    sys.argv = ["prefpretrain", *argv]
    from prefpretrain.cli import entry

    entry()


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun (one node, `world` ranks) and prefpretrain's launcher set for a rank. No TORCHELASTIC_*
    variables: without torchrun's agent, rank 0 hosts the rendezvous store (prefpretrain.distributed._store)."""
    from prefpretrain.launcher.local import child_env

    env = child_env(world)
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                "ROLE_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return env


def train_ranks(nproc: int, config: str, overrides: list[str], log_dir: Path, run_dir: Path | None = None,
                timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`prefpretrain train CONFIG OVERRIDES` on `nproc` forked ranks; stdout/stderr are the ranks' outputs one
    after the other. The return code is the launcher's (prefpretrain.launcher.local.launch_local): 0 if every
    rank succeeded, else the exit code the run's failure.json gives (`run_dir`), else 1 (torchrun's). A rank
    still running after `timeout` s is killed (with the others) and the test fails with the end of the logs."""
    import time

    from prefpretrain.host import free_port
    from prefpretrain.rundir import read_failure

    ctx = _forkserver()
    log_dir.mkdir(parents=True, exist_ok=True)
    port, t0 = free_port(), time.time()
    argv = ["train", config, *overrides]
    procs = []
    try:
        for r in range(nproc):
            p = ctx.Process(target=_rank, args=(argv, rank_env(r, nproc, port), str(cwd),
                                                str(log_dir / f"rank{r}.out"), str(log_dir / f"rank{r}.err")))
            p.start()
            procs.append(p)
        codes, hung = _wait(procs, timeout)
    finally:
        _stop(procs)
    out = "".join(_read(log_dir / f"rank{r}.out") for r in range(nproc))
    err = "".join(_read(log_dir / f"rank{r}.err") for r in range(nproc))
    if hung:
        raise AssertionError(f"prefpretrain train: rank(s) {hung} did not finish in {timeout} s (hung?):\n"
                             f"{err[-4000:]}")
    failure = read_failure(run_dir, t0) if run_dir is not None and any(codes) else None
    rc = 0 if not any(codes) else int(failure["exit_code"]) if failure else 1
    return subprocess.CompletedProcess(argv, rc, out, err)


def _wait(procs: list, timeout: float, grace: float = 30.0) -> tuple[list[int], list[int]]:
    """Wait for the ranks like torchrun's agent: once one fails, the others get SIGTERM, then SIGKILL after
    `grace` s. Returns the exit codes in the order the ranks ended (the first failure first) and the ranks that
    hung (still running at the deadline with no rank failed; killed)."""
    import time
    from multiprocessing.connection import wait

    deadline, codes, running = time.monotonic() + timeout, [], dict(enumerate(procs))
    while running and time.monotonic() < deadline:
        for s in wait([p.sentinel for p in running.values()], deadline - time.monotonic()):
            r = next(r for r, p in running.items() if p.sentinel == s)
            running.pop(r).join()
            codes.append(procs[r].exitcode)
            if procs[r].exitcode != 0 and running:
                for p in running.values():
                    p.terminate()
                deadline = min(deadline, time.monotonic() + grace)
    _stop(running.values())
    return codes, [] if any(codes) else sorted(running)


def _stop(procs) -> None:
    """SIGKILL to the process group of every rank still running (the rank and what it started), then reap it."""
    import signal

    for p in procs:
        if p.exitcode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # not yet the leader of its group
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            p.join()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def cli_forked(*args: str, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`prefpretrain ARGS` (a command other than a rank's `train`: evaluate, export, report...) as one process
    forked from the forkserver, with the environment `tests.conftest.run_cli` gives a command. For steps of a
    test whose subject is not the command's process itself (a refusal's one line with nothing printed before
    it, import-time warnings included, needs run_cli)."""
    import tempfile

    ctx = _forkserver()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with tempfile.TemporaryDirectory(prefix="cli-forked-") as d:
        out, err = Path(d) / "out", Path(d) / "err"
        p = ctx.Process(target=_rank, args=(list(args), env, str(cwd), str(out), str(err)))
        try:
            p.start()
            codes, hung = _wait([p], timeout)
        finally:
            _stop([p])
        r = subprocess.CompletedProcess(list(args), codes[0] if codes else -9, _read(out), _read(err))
    if hung:
        raise AssertionError(f"prefpretrain {' '.join(args[:2])} ... did not finish in {timeout} s (hung?):\n"
                             f"{r.stderr[-4000:]}")
    return r
