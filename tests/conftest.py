"""Shared fixtures: a tiny real shard set (stdlib code scored by pycodestyle) and CLI runners."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# What a test needs, said by markers (pyproject.toml): `dist` starts several ranks, `slurm` a local SLURM cluster,
# `cli` prefpretrain commands as processes; unmarked tests are the quick tier (`make test-fast`). A fixture that
# starts ranks or a cluster marks every test that uses it; a test that runs commands must say so itself.
FIXTURE_NEEDS = {"slurm": "slurm", "uninterrupted": "slurm", "two_runs": "dist", "old_run": "dist"}
STARTS_COMMANDS = ("run_cli(", "launch_tiny(", "cli_forked(", "train_ranks(", "_forked_cli(")
# run on several workers (`pytest -n N --dist loadgroup`; `make test` runs one process), the tests that share an
# expensive fixture (one SLURM cluster, one earlier run) stay on one worker, which builds it once
SHARED_FIXTURES = {"slurm": "slurm", "uninterrupted": "slurm", "old_run": "continual", "two_runs": "monitoring"}


def pytest_itemcollected(item):
    """Marks from the fixtures a test uses, as it is collected (pytest-xdist reads the groups before any
    collection_modifyitems hook of a conftest runs)."""
    names = getattr(item, "fixturenames", ())
    for fixture, mark in FIXTURE_NEEDS.items():
        if fixture in names:
            item.add_marker(getattr(pytest.mark, mark))
    for fixture, group in SHARED_FIXTURES.items():
        if fixture in names:
            item.add_marker(pytest.mark.xdist_group(group))
            break


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        fn = getattr(item, "function", None)
        if fn is not None and not marks & {"dist", "slurm", "cli"} and any(
                s in inspect.getsource(fn) for s in STARTS_COMMANDS):
            raise pytest.UsageError(f"{item.nodeid} runs prefpretrain commands: mark it cli (or dist / slurm)")
    # the long tests first, the quick ones last: on 2 workers the quick ones fill the gaps at the end
    cost = {"slurm": 0, "dist": 1, "cli": 2}
    items.sort(key=lambda it: min((cost[m.name] for m in it.iter_markers() if m.name in cost), default=3))


@pytest.fixture(autouse=True)
def _environment_of_the_test():
    """Each test's environment ends with it: a test that runs prefpretrain's main() in-process gets the settings
    main() makes for its children (e.g. weights-only loading), and a later test on the same worker must not."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(*args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`prefpretrain ARGS` in its own session: on a timeout (a hang) the whole process tree is killed, so no
    rank survives the test, and the test fails with the end of its log."""
    p = subprocess.Popen([sys.executable, "-m", "prefpretrain", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"prefpretrain {' '.join(args[:2])} ... did not finish in {timeout} s (hung?):\n"
                             f"{err[-4000:]}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# a handful of real stdlib modules of different sizes and style
TINY_FILES = ["bisect.py", "colorsys.py", "keyword.py", "shlex.py", "textwrap.py", "fnmatch.py", "graphlib.py",
              "numbers.py", "stat.py", "this.py", "abc.py", "copy.py"]


@pytest.fixture(scope="session")
def stdlib_files() -> list[str]:
    from prefpretrain.data_shards.sources import stdlib_root

    root = stdlib_root()
    return [str(root / f) for f in TINY_FILES if (root / f).is_file()]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, stdlib_files) -> Path:
    from prefpretrain.data_shards.build import ShardOptions, build_shards

    out = tmp_path_factory.mktemp("shards") / "tiny"
    build_shards(ShardOptions(inputs=stdlib_files, output=str(out), scorer="pep8", vocab_size=512,
                              val_fraction=0.2, workers=1, progress=False))
    return out


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, tiny_shards):
    """`shared_run(nproc, **overrides)`: a finished launch_tiny run on tiny_shards, made once per worker for each
    distinct configuration and shared by the tests that need the same one (they read it; to change it, copy it).
    Tests sharing one are put in one xdist group."""
    cache: dict = {}

    def get(nproc: int = 2, **kw) -> Path:
        key = (nproc, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp("shared") / "run"
            launch_tiny(tiny_shards, cache[key], nproc, **kw)
        return cache[key]

    return get


def launch_tiny(shards: Path, run_dir: Path, nproc: int = 2, expect: int = 0, timeout: int = 600,
                torchrun: bool = False, **kw) -> subprocess.CompletedProcess:
    """configs/tiny.yaml on `shards` with overrides as `nproc` ranks; asserts the exit code. The ranks are forked
    from this worker's forkserver (tests/ranks.py: the product's `prefpretrain train` without ~10 s of imports
    each); `torchrun=True`: `prefpretrain launch` as a user starts it, for tests of the launcher itself."""
    if torchrun:
        r = run_cli("launch", "configs/tiny.yaml", "--nproc-per-node", str(nproc),
                    *tiny_overrides(shards, run_dir, **kw), timeout=timeout)
    else:
        from tests.ranks import train_ranks

        r = train_ranks(nproc, "configs/tiny.yaml", tiny_overrides(shards, run_dir, **kw),
                        log_dir=run_dir.parent / f"{run_dir.name}.ranks", run_dir=run_dir, timeout=timeout)
    assert r.returncode == expect, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def tiny_overrides(shards: Path, run_dir: Path, **kw) -> list[str]:
    """Overrides that turn configs/tiny.yaml into a seconds-long run on `shards`."""
    items = {"data.shards": f"[{shards}]", "run.output_dir": str(run_dir)}
    items.update(kw)
    return [f"{k}={v}" for k, v in items.items()]


def crash_after(src: Path, dst: Path, step: int) -> None:
    """A copy of run directory `src` as a crash right after step `step`'s checkpoint would have left it."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    (dst / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in read_metrics(src) if m["step"] <= step))
