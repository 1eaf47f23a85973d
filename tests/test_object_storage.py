"""Object storage against a real S3-compatible server (moto's server, a separate process on 127.0.0.1): inputs and
shard sets at s3:// URLs, training reads through a bounded, checked cache, and an unusable store is one line."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import read_metrics, run_cli, tiny_overrides

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process; the AWS environment points every client (and every command) at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*CREDS, "AWS_ENDPOINT_URL", "PREFPRETRAIN_CACHE"]}
    os.environ.update(CREDS, AWS_ENDPOINT_URL=endpoint,
                      PREFPRETRAIN_CACHE=str(tmp_path_factory.mktemp("cache")))
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        for b in ("corpus", "shards"):
            client.create_bucket(Bucket=b)
        yield client
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _clear_caches() -> None:
    from prefpretrain.data_shards import remote, storage

    storage._filesystem.cache_clear()
    remote.configure(None, 50.0)
    shutil.rmtree(remote.cache_root(), ignore_errors=True)


@pytest.mark.cli
def test_shard_from_and_to_s3_and_read_through_a_bounded_checked_cache(s3, stdlib_files, tmp_path):
    from prefpretrain.data_shards import remote
    from prefpretrain.data_shards.reader import ShardError, ShardSet

    for f in stdlib_files:
        s3.upload_file(f, "corpus", f"code/{Path(f).name}")
    r = run_cli("shard", "--input", "s3://corpus/code/", "--output", "s3://shards/set", "--workers", "1",
                "--tasks", "2", "--vocab-size", "512", "--shard-size-mb", "0.05", "--val-fraction", "0.2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="shards", Prefix="set/")["Contents"]}
    assert "set/manifest.json" in keys and "set/tokenizer/tokenizer.json" in keys
    assert not any("_progress" in k for k in keys)
    tars = sorted(k for k in keys if k.endswith(".tar"))
    assert len(tars) >= 3

    _clear_caches()
    ss = ShardSet("s3://shards/set", "train")
    sizes = [sh["bytes"] for sh in ss.shards]
    remote.configure(str(remote.cache_root().parent), max_gb=2.2 * max(sizes) / 1e9)  # room for two parts
    names = [ss.read(i)["meta"]["doc_id"] for i in range(len(ss))]
    assert len(names) == len(ss) >= 6 and all(n.startswith("s3://corpus/code/") for n in names)
    cached = list(remote.cache_root().glob("*/*.tar"))
    assert sum(p.stat().st_size for p in cached) <= 2.2 * max(sizes)  # the bound held
    assert 1 <= len(cached) < len(sizes)  # every part was read, the least recently used went

    # a part damaged in the store is refused (same sha256 check as a local shard), never read
    bad = next(k for k in tars if k.startswith("set/train-"))
    body = bytearray(s3.get_object(Bucket="shards", Key=bad)["Body"].read())
    body[700] ^= 0xFF
    s3.put_object(Bucket="shards", Key=bad, Body=bytes(body))
    _clear_caches()
    ss = ShardSet("s3://shards/set", "train")
    part = [sh["name"] for sh in ss.shards].index(bad.split("/", 1)[1])
    with pytest.raises(ShardError, match="sha256 mismatch"):
        ss.read(int(ss.starts[part]))
    assert not list(remote.cache_root().glob(f"*/{bad.split('/', 1)[1]}"))


@pytest.mark.cli
def test_train_reads_a_shard_set_on_s3(s3, tiny_shards, tmp_path):
    from prefpretrain.data_shards import remote

    remote.upload(tiny_shards, "s3://shards/tiny")
    run = tmp_path / "run"
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides("s3://shards/tiny", run, **{"train.max_steps": 3}),
                f"data.cache_dir={tmp_path / 'cache'}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run) if "loss" in m][-1] == 3
    assert np.isfinite([m["loss"] for m in read_metrics(run) if "loss" in m]).all()
    assert list((tmp_path / "cache" / "shards").glob("*/train-*.tar"))


@pytest.mark.cli
def test_an_unusable_store_is_one_line_before_any_task(s3, tmp_path):
    r = run_cli("shard", "--input", "s3://no-such-bucket/x/", "--output", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and "the bucket 'no-such-bucket' does not exist" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    env_port = _free_port()
    os.environ["AWS_ENDPOINT_URL"], saved = f"http://127.0.0.1:{env_port}", os.environ["AWS_ENDPOINT_URL"]
    try:
        r = run_cli("shard", "--input", str(tmp_path), "--output", "s3://shards/x", timeout=120)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
    assert r.returncode == 2 and "cannot reach the store" in r.stderr, r.stderr
