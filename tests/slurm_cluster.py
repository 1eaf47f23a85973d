"""A real two-node SLURM cluster on this host for the `slurm` tests: slurmctld + slurmd n1, n2.

Everything it writes (slurm.conf, state, spool, logs, pid files) lives in one directory; it stops only
the daemons it started, by their pid files. Usable by hand too:
`python -m tests.slurm_cluster DIR` starts one and prints the `export SLURM_CONF=...` line.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> str | None:
    """Install Debian's SLURM if missing (root only); None when ready, else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not usable here (needs root and Debian)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True,
                       text=True, env=env, timeout=600)
    if r.returncode != 0:
        r = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True,
                           text=True, env=env, timeout=600)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get could not install {' '.join(PACKAGES)}: {tail[0]}"
    return None


def slurm_conf(d: Path, host: str, ctld_port: int, node_ports: list[int], cpus: int) -> str:
    lines = [
        "ClusterName=prefpretrain-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/none", "CredType=cred/none", "AuthInfo=cred_expire=5",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill", "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1",
        "EnforcePartLimits=ALL", "ReturnToService=2", "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none", "MailProg=/bin/true", "InactiveLimit=0", "KillWait=10", "MinJobAge=600",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.%n.log",
        "SlurmctldDebug=info", "SlurmdDebug=info",
    ]
    for name, port in zip(NODES, node_ports, strict=True):
        lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """slurmctld and two slurmd of one temporary directory; `env` holds SLURM_CONF for clients."""

    def __init__(self, d: Path):
        self.dir = d
        self.conf = d / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> None:
        d = self.dir
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        self.conf.write_text(slurm_conf(d, host, free_port(), [free_port() for _ in NODES], cpus))
        subprocess.run(["slurmctld", "-f", str(self.conf), "-c", "-i"], check=True, env=self.env, timeout=60)
        for n in NODES:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", n], check=True, env=self.env, timeout=60)
        t0 = time.time()
        while time.time() - t0 < timeout:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=self.env)
            states = dict(ln.split() for ln in r.stdout.splitlines() if ln.strip())
            if r.returncode == 0 and set(states) == set(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM nodes did not become idle in {timeout}s: {r.stdout.strip()} {r.stderr.strip()} "
                           f"(logs in {d})")

    def _pids(self) -> list[int]:
        files = [self.dir / "slurmctld.pid", *(self.dir / f"slurmd.{n}.pid" for n in NODES)]
        return [int(f.read_text().split()[0]) for f in files if f.is_file() and f.read_text().strip()]

    def stop(self, timeout: float = 20) -> None:
        pids = self._pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while time.time() - t0 < timeout and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a mapping (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             env=self.env, check=True).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


if __name__ == "__main__":  # start one by hand; stop it with `python -m tests.slurm_cluster DIR --stop`
    c = SlurmCluster(Path(sys.argv[1]).resolve())
    if "--stop" in sys.argv:
        c.stop()
    else:
        why = ensure_installed()
        if why:
            sys.exit(why)
        c.start()
        print(f"export SLURM_CONF={c.conf}")
