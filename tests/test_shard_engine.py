"""Sharding as tasks on datatrove: the result does not depend on the number of tasks, a failed task is reported
with its log and run again by the same command, a finished one is not redone; the plan; the table formats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prefpretrain.data_shards import engine, plan
from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.sources import InputFile, expand_inputs, read_file, stdlib_root
from tests.conftest import run_cli

CORPUS = ["json", "email", "http"]  # 40 stdlib files, 0.6 MB: three chunks at 0.3 MB


def _opt(out: Path, tasks: int = 1, **kw) -> ShardOptions:
    root = stdlib_root()
    return ShardOptions(inputs=[str(root / d) for d in CORPUS], output=str(out), tasks=tasks, workers=1,
                        shard_size_mb=0.3, vocab_size=1024, progress=False, **kw)


def _same_set(a: Path, b: Path) -> None:
    """Equal manifests (so equal bytes: every tar and index is checksummed there) and, read back through the
    reader, the same samples in the same global order with the same tokens and scores."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    ma.pop("build_seconds"), mb.pop("build_seconds")
    assert ma == mb
    for split in ("train", "val"):
        sa, sb = ShardSet(a, split), ShardSet(b, split)
        assert len(sa) == len(sb) > 0
        for i in range(len(sa)):
            ra, rb = sa.read(i), sb.read(i)
            assert ra["meta"] == rb["meta"]
            np.testing.assert_array_equal(ra["tokens"], rb["tokens"])
            np.testing.assert_array_equal(ra["scores"], rb["scores"])


@pytest.fixture(scope="module")
def one_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "one"
    build_shards(_opt(out))
    return out


@pytest.mark.cli
def test_two_and_three_tasks_give_the_one_task_result(one_task, tmp_path):
    m = json.loads((one_task / "manifest.json").read_text())
    assert len(json.loads((one_task / plan.PLAN).read_text())["chunks"]) == 3
    assert m["files"] == 40 and m["splits"]["train"]["samples"] > 30
    for n in (2, 3):
        build_shards(_opt(tmp_path / f"t{n}", tasks=n))
        _same_set(one_task, tmp_path / f"t{n}")
        done = sorted(p.name for p in (engine.engine_dir(tmp_path / f"t{n}", "local", n) / "completions").iterdir())
        assert done == [f"{r:05d}" for r in range(n)]


@pytest.mark.cli
def test_a_failed_task_is_reported_with_its_log_and_the_same_command_finishes_it(one_task, tmp_path):
    out = tmp_path / "two"
    opt = _opt(out, tasks=2)
    plan.make_plan(opt)
    (out / "train-000001-000.tar").mkdir()  # task 1 of 2 writes chunk 1: it cannot open its first tar
    with pytest.raises(engine.EngineError) as e:
        engine.run_tasks(out, 2, "local", 1, False)
    log = engine.engine_dir(out, "local", 2) / "logs" / "task_00001.log"
    assert f"task 1 of 2 did not finish: log {log}" in str(e.value) and "task 0" not in str(e.value)
    assert "IsADirectoryError" in log.read_text()
    finished = plan.chunk_record(out, 0).stat().st_mtime_ns, plan.chunk_record(out, 2).stat().st_mtime_ns
    assert not plan.chunk_record(out, 1).exists() and not (out / "manifest.json").exists()

    (out / "train-000001-000.tar").rmdir()
    r = run_cli("shard", "--input", *opt.inputs, "--output", str(out), "--tasks", "2", "--workers", "1",
                "--shard-size-mb", "0.3", "--vocab-size", "1024", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (plan.chunk_record(out, 0).stat().st_mtime_ns, plan.chunk_record(out, 2).stat().st_mtime_ns) == finished
    assert "1 of 2 tasks finished before; not run again" in r.stderr  # datatrove's completion markers
    _same_set(one_task, out)


@pytest.mark.cli
def test_dry_run_shows_the_job_and_writes_nothing(tmp_path):
    out = tmp_path / "dry"
    r = run_cli("shard", "--input", str(stdlib_root() / "json"), "--output", str(out), "--tasks", "4",
                "--executor", "slurm", "--cpus-per-task", "2", "--gpus-per-task", "1", "--partition", "cpu",
                "--time", "01:00:00", "--dry-run", timeout=120)
    assert r.returncode == 0, r.stderr
    for line in ("#SBATCH --array=0-3", "#SBATCH --cpus-per-task=2", "#SBATCH --partition=cpu", "--gpus=1",
                 "#SBATCH --time=01:00:00", "#SBATCH --gres=gpu:1", "-m prefpretrain.data_shards.engine"):
        assert line in r.stdout, r.stdout
    assert "launch_pickled_pipeline" not in r.stdout and not out.exists()


def test_tokenizer_sample_is_fixed_and_spread(tmp_path):
    files = [InputFile(f"/x/{i}", f"f{i:03d}", 100_000, "0") for i in range(100)]  # 10 MB
    assert plan.tokenizer_sample(files, 20) == files  # under the bound: everything
    a = plan.tokenizer_sample(files, 1)
    assert len(a) == 10 and a == plan.tokenizer_sample(list(reversed(files)), 1)
    assert a != files[:10]  # a hash order, not the first files


def test_tasks_take_every_chunk_once():
    for n_chunks in (1, 7, 30):
        for world in (1, 2, 3, 8):
            got = sorted(c for r in range(world) for c in plan.task_chunks(n_chunks, r, world))
            assert got == list(range(n_chunks))


def _table_rows() -> list[dict]:
    return [{"text": "def f(x):\n    return x\n", "score": 0.0}, {"text": "", "score": 1.0},
            {"text": None, "score": 0.5}, {"text": "x=1  # no spaces\n", "score": 0.7}]


def test_parquet_arrow_and_save_to_disk_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(_table_rows())
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    datasets.Dataset.from_list(_table_rows()).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    files = expand_inputs([str(tmp_path / "a.parquet"), str(tmp_path / "saved"), str(tmp_path / "bad.parquet")])
    assert [Path(f.name).suffix for f in files] == [".parquet", ".parquet", ".arrow"]
    for f in files:
        res = read_file(f.path, f.name, "text", "score")
        if f.name.endswith("bad.parquet"):
            assert res.skipped == {"unreadable": 1} and not res.docs
            continue
        assert [d.text for d in res.docs] == ["def f(x):\n    return x\n", "x=1  # no spaces\n"]
        assert [d.score for d in res.docs] == [0.0, 0.7] and res.docs[1].doc_id == f"{f.name}#3"
        assert res.skipped == {"missing_text": 2}
    res = read_file(files[0].path, files[0].name, "body")
    assert res.skipped == {"missing_column": 1} and "no column 'body'" in res.problems[0]


def test_a_parquet_corpus_shards_with_its_score_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"content": f"line {i} of a document\n" * (1 + i % 3), "label": float(i % 2)} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    m = build_shards(ShardOptions(inputs=[str(tmp_path / "c.parquet")], output=str(tmp_path / "out"), workers=1,
                                  scorer="field", score_field="label", text_field="content", vocab_size=300,
                                  val_fraction=0.0, progress=False))
    assert m["splits"]["train"]["samples"] == 40
    s = ShardSet(tmp_path / "out", "train")
    assert sorted(round(s.mean_score(i)) for i in range(len(s))) == [0] * 20 + [1] * 20


@pytest.mark.cli
def test_ray_tasks_give_the_one_task_result(one_task, tmp_path):
    """`--executor ray`: no Ray cluster is running, so the command starts a local one (and it ends with it)."""
    out = tmp_path / "ray"
    r = run_cli("shard", "--input", *_opt(out).inputs, "--output", str(out), "--tasks", "2", "--executor", "ray",
                "--workers", "2", "--shard-size-mb", "0.3", "--vocab-size", "1024", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting a local one" in r.stderr
    _same_set(one_task, out)
    done = sorted(p.name for p in (engine.engine_dir(out, "ray", 2) / "completions").iterdir())
    assert done == ["00000", "00001"]


@pytest.mark.cli
def test_a_large_parquet_file_is_split_by_row_groups_and_the_tasks_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"def f{i}(x):\n    return x + {i}\n" * (1 + i % 7)} for i in range(1200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=80)  # 15 row groups
    kw = dict(inputs=[str(tmp_path / "big.parquet")], workers=1, vocab_size=400, shard_size_mb=0.008,
              progress=False)
    m1 = build_shards(ShardOptions(output=str(tmp_path / "one"), **kw))
    items = json.loads((tmp_path / "one" / plan.PLAN).read_text())["files"]
    assert len(items) >= 3 and all(it[3] is not None for it in items) and m1["files"] == 1
    assert [it[3][2] for it in items] == sorted({it[3][2] for it in items})  # runs in order, first rows rising
    build_shards(ShardOptions(output=str(tmp_path / "two"), tasks=2, **kw))
    _same_set(tmp_path / "one", tmp_path / "two")
    whole = build_shards(ShardOptions(output=str(tmp_path / "whole"), **dict(kw, shard_size_mb=64)))
    def doc_ids(d: str) -> dict:
        sets = {sp: ShardSet(tmp_path / d, sp) for sp in ("train", "val")}
        return {sp: sorted(ss.read(i)["meta"]["doc_id"] for i in range(len(ss))) for sp, ss in sets.items()}

    ids, ids_whole = doc_ids("one"), doc_ids("whole")
    assert ids == ids_whole and whole["splits"]["train"]["samples"] + whole["splits"]["val"]["samples"] == 1200


def _kill_corpus(d: Path) -> list[str]:
    """Six one-document files, named relative to the working directory (so their ids, and with them the train/val
    split, do not depend on where the test runs: 3 and 3 at val_fraction 0.5)."""
    d.mkdir()
    for i in range(6):  # one chunk each at --shard-size-mb 0.005; chunk 1 (task 1 of 2) holds KILLME
        (d / f"f{i}.txt").write_text("".join(f"line {j} of file {i} xx\n" for j in range(400))
                                     + ("KILLME\n" if i == 1 else ""))
    return [d.name]


@pytest.mark.cli
def test_a_killed_task_does_not_hang_and_the_same_command_finishes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = dict(inputs=_kill_corpus(tmp_path / "in"), workers=2, vocab_size=300, shard_size_mb=0.005, val_fraction=0.5,
              scorer="tests.scorer_fns:x_share_or_die", progress=False)
    build_shards(ShardOptions(output=str(tmp_path / "one"), **kw))
    monkeypatch.setenv("PREFPRETRAIN_TEST_KILL", "1")
    with pytest.raises(engine.EngineError, match="task 1 of 2 did not finish"):
        build_shards(ShardOptions(output=str(tmp_path / "two"), tasks=2, **kw))  # (a hang would time the suite out)
    assert not (tmp_path / "two" / "manifest.json").exists()
    monkeypatch.delenv("PREFPRETRAIN_TEST_KILL")
    build_shards(ShardOptions(output=str(tmp_path / "two"), tasks=2, **kw))
    _same_set(tmp_path / "one", tmp_path / "two")
    assert not list((tmp_path / "two").glob("*.tmp-*"))  # what the killed task left half-written is gone


@pytest.mark.cli
def test_one_writer_per_directory_and_a_written_plan_is_kept(tmp_path, monkeypatch):
    import subprocess
    import sys

    from prefpretrain.data_shards import sources

    out = tmp_path / "s"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"  # another command writing it
                               f"f = open({str(out / '.shard.lock')!r}, 'a+')\n"
                               "fcntl.lockf(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another `prefpretrain shard` is writing it"):
            build_shards(_opt(out))
    finally:
        holder.kill()
        holder.wait()
    first = plan.make_plan(_opt(out))
    monkeypatch.setattr(sources, "work_items", lambda *a: pytest.fail("a written plan was planned again"))
    assert plan.make_plan(_opt(out)) == first  # resuming: the stored items, chunks and tokenizer, as they are
