"""`prefpretrain launch`: torchrun (or Accelerate) on this machine or several by hand, or a SLURM batch job."""
from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from prefpretrain.config import Config, load_config
from prefpretrain.errors import ConfigError
from prefpretrain.preflight import check_device, check_engine, check_paths, cuda_wanted
from prefpretrain.rundir import ACCELERATE

SLURM_ONLY = ("nodes", "gpus_per_node", "cpus_per_task", "cpus_per_gpu", "partition", "time", "account",
              "signal_grace", "submit", "wait")


def cmd_launch(a) -> int:
    if a.slurm:
        return cmd_launch_slurm(a)
    # in a SLURM job step SIGUSR1 (pre-emption) may come at any time: hold it until launch_local forwards it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    given = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(a, k) not in (None, False)]
    if given:
        raise ConfigError(f"{given[0]}: only with --slurm")
    cfg = load_config(a.config, a.overrides)
    n = cfg.launch.nproc_per_node if a.nproc_per_node is None else a.nproc_per_node
    if n < 1 or a.max_restarts < 0:
        raise ConfigError(f"--nproc-per-node: {n}; at least 1" if n < 1 else
                          f"--max-restarts: {a.max_restarts}; 0 or more")
    a.nnodes = 1 if a.nnodes is None else a.nnodes
    if a.node_rank is None:  # inside a SLURM job step every node runs the same command line
        a.node_rank = int(os.environ.get("SLURM_NODEID", "0")) if a.nnodes > 1 else 0
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        raise ConfigError(f"--node-rank: {a.node_rank} is not within 0..{a.nnodes - 1} (--nnodes {a.nnodes})")
    if a.nnodes > 1 and not a.rdzv_endpoint:
        raise ConfigError("--rdzv-endpoint: HOST:PORT of the first node is needed with --nnodes > 1")
    check_engine(cfg, n * a.nnodes)
    from prefpretrain.launcher.local import launch_local, torchrun_argv

    node = {"nnodes": a.nnodes, "rdzv_endpoint": a.rdzv_endpoint, "rdzv_id": Path(cfg.run.output_dir).name}
    if a.launcher == "accelerate":
        return _launch_accelerate(a, cfg, n)
    if a.dry_run:
        for r in range(a.nnodes):
            print(f"# node {r}:", shlex.join(torchrun_argv(a.config, a.overrides, n, a.max_restarts, node_rank=r,
                                                          **node)))
        return 0
    check_paths(cfg)
    return launch_local(a.config, a.overrides, n, a.max_restarts, cfg.run.output_dir, node_rank=a.node_rank, **node)


def _launch_accelerate(a, cfg: Config, n: int) -> int:
    """`launch --launcher accelerate`: a generated Accelerate config per node, then `accelerate launch`."""
    from prefpretrain.host import free_port
    from prefpretrain.launcher.accelerate import accelerate_argv, accelerate_config, config_text
    from prefpretrain.launcher.local import launch_local

    endpoint = a.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    conf_dir = Path(cfg.run.output_dir) / ACCELERATE
    if a.dry_run:
        for r in range(a.nnodes):
            f = conf_dir / f"node{r}.yaml"
            print(f"# node {r}: {f}\n" + "".join(f"#   {x}\n" for x in config_text(accelerate_config(
                n, a.nnodes, r, endpoint)).splitlines()), end="")
            print(f"# node {r}:", shlex.join(accelerate_argv(str(f), a.config, a.overrides, a.max_restarts)))
        return 0
    if not cuda_wanted(cfg.engine.device):
        raise ConfigError("--launcher: accelerate needs GPUs (on CPU `accelerate launch` starts one process per "
                          "machine and the ranks train apart); use the default torchrun launcher")
    check_paths(cfg)
    conf_dir.mkdir(parents=True, exist_ok=True)
    f = conf_dir / f"node{a.node_rank}.yaml"
    f.write_text(config_text(accelerate_config(n, a.nnodes, a.node_rank, endpoint)))
    return launch_local(a.config, a.overrides, n, a.max_restarts, cfg.run.output_dir,
                        argv=accelerate_argv(str(f), a.config, a.overrides, a.max_restarts))


def cmd_launch_slurm(a) -> int:
    from prefpretrain.launcher import slurm

    for flag, v in (("--node-rank", a.node_rank), ("--rdzv-endpoint", a.rdzv_endpoint), ("--nnodes", a.nnodes)):
        if v is not None:
            raise ConfigError(f"{flag}: not with --slurm (SLURM places the nodes; use --nodes)")
    if a.wait and not a.submit:
        raise ConfigError("--wait: only with --submit")
    if a.dry_run and a.submit:
        raise ConfigError("--submit: not with --dry-run (which submits nothing)")
    cfg = load_config(a.config, a.overrides)
    gpus = a.gpus_per_node or 0
    n = a.nproc_per_node or (gpus if gpus else cfg.launch.nproc_per_node)
    job = slurm.SlurmJob(config=str(Path(a.config).resolve()), overrides=list(a.overrides),
                         run_dir=Path(cfg.run.output_dir).resolve(), workdir=Path.cwd(), nodes=a.nodes or 1,
                         nproc_per_node=n, gpus_per_node=gpus, cpus_per_task=a.cpus_per_task,
                         cpus_per_gpu=a.cpus_per_gpu, partition=a.partition,
                         time=a.time, account=a.account, signal_grace=a.signal_grace or 180,
                         max_restarts=a.max_restarts)
    slurm.check_request(job)
    cfg.grad_accum_for(n * job.nodes)
    from prefpretrain.trainer.dsconfig import ds_config

    ds_config(cfg, n * job.nodes)  # engine.deepspeed conflicts, before anything is written
    if not gpus:  # CPU ranks; GPU nodes are judged by SLURM, not by this (login) machine
        check_device(cfg)
    if not a.dry_run:
        check_paths(cfg)
    if slurm.reachable():
        slurm.check_cluster(job)  # with the partition's CPUs per GPU (slurm.settle_cpus)
    elif a.submit:
        raise ConfigError("--submit: no SLURM controller answers here (`scontrol ping` fails or is not installed)")
    else:
        slurm.settle_cpus(job)
    if a.dry_run:
        print(f"# would be written to {job.script_path}", file=sys.stderr)
        print(slurm.sbatch_script(job), end="")
        return 0
    script = slurm.write_script(job)
    if not a.submit:
        print(f"wrote {script}\nsubmit it with: sbatch {shlex.quote(str(script))}")
        return 0
    slurm.sbatch_test_only(script)
    job_id = slurm.submit(script)
    print(f"submitted job {job_id}: {script}; logs {job.run_dir}/slurm/job-{job_id}*.out", flush=True)
    if not a.wait:
        return 0
    try:
        rc = slurm.wait(job_id)
    except KeyboardInterrupt:
        print(f"stopped following job {job_id}; it keeps running (scancel {job_id} stops it)", file=sys.stderr)
        return 130
    print(f"job {job_id} finished with exit status {rc}")
    return rc
