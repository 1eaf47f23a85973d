"""What a prefpretrain process can end with: the errors it refuses input with and its exit codes.

Dependency-free, so that every layer (data, trainer, launchers, CLI) names them from one place.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # anything unexpected (a bug, a crashed rank): torchrun's / the traceback's report says why
EXIT_REFUSED = 2  # input refused: one line on stderr (InputError / ConfigError), RUN/failure.json
EXIT_DIVERGED = 3  # too many non-finite steps in a row; the last good checkpoint is intact
EXIT_PREEMPTED = 4  # SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint of the current step was written (SLURM requeues)
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, without a checkpoint of the current step


class InputError(ValueError):
    """Input prefpretrain refuses (a damaged or unsafe file, a request that cannot work): one line, exit code 2."""


class ConfigError(InputError):
    """A config problem, reported as one line that names the key."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (exit code 3)."""


class Preempted(RuntimeError):
    """SIGTERM, SIGUSR1 or SIGINT arrived; the run saved a checkpoint and stopped (exit code 4)."""


def describe(e: BaseException, limit: int = 200) -> str:
    """`Type: the first line of its message` (at most `limit` characters of it): how a one-line error or warning
    names the exception behind it."""
    text = str(e).splitlines()[0][:limit] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class TasksFailed(RuntimeError):
    """Tasks of a distributed job (shard tasks) that did not finish: the message names each with its log (exit 1)."""
