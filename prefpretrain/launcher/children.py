"""Child processes that never outlive prefpretrain: the kernel sends them SIGTERM when the process that started
them dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG; elsewhere nothing is set), and a second Ctrl-C can end
a child's whole process tree at once."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_PRCTL = None
if sys.platform.startswith("linux"):  # resolved here, in the parent: nothing but the call runs after fork
    with contextlib.suppress(OSError, AttributeError):
        _PRCTL = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for Popen: SIGTERM to the child when this process dies (and exit at once if it already
    has, between fork and the call)."""
    parent = os.getpid()
    return lambda: die_with(parent)


def die_with(parent: int) -> None:
    """In a child of `parent`: SIGTERM to it when `parent` dies (exit at once if it already has)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = open(f"/proc/{d}/stat").read()  # noqa: SIM115 - read at once
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it (the ranks run in sessions of their own under torchrun)."""
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
