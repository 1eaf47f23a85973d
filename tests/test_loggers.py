"""Experiment loggers: W&B (offline) and MLflow (local file store) receive what TensorBoard receives, read back
with each library's own reader; a resumed or evaluated run continues the same W&B / MLflow run; a logger that is
unknown or not installed is one line before anything starts."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import struct
from pathlib import Path

import pytest

from prefpretrain.errors import ConfigError
from prefpretrain.trainer.loggers import IDS, check_loggers
from tests.conftest import launch_tiny
from tests.ranks import cli_forked

LOGGERS = "[tensorboard,wandb,mlflow]"


def wandb_records(path: Path):
    """The records of a W&B offline transaction log (`run-ID.wandb`), decoded with W&B's own protobuf schema:
    its framing is LevelDB's log format (a 7-byte `:W&B` header, 32 KiB blocks, records of crc32, length,
    type), which wandb >= 0.20 no longer ships a Python reader for (its Go core writes and syncs it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block too short for a header, or zero padding
            pos += left
            continue
        buf = data[pos + 7: pos + 7 + n] if kind in (1, 2) else buf + data[pos + 7: pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def wandb_scalars(run: Path) -> tuple[dict, dict]:
    """({tag: [(step, value)]} of every offline W&B run in `run`, in order; the config they were given)."""
    out, config = {}, {}
    for f in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in row.items():
                    if not k.startswith("_") and k != "step":
                        out.setdefault(k, []).append((row["step"], v))
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return out, config


def tensorboard_scalars(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def mlflow_scalars(run: Path, tags) -> tuple[dict, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    rid = json.loads((run / IDS).read_text())["mlflow"]["run_id"]
    got = client.get_run(rid)
    hist = {t: [(m.step, m.value) for m in sorted(client.get_metric_history(rid, t), key=lambda m: m.timestamp)]
            for t in got.data.metrics}
    assert set(got.data.metrics) == set(tags)
    return hist, got


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        assert [v for _, v in a[tag]] == pytest.approx([v for _, v in b[tag]], rel=1e-6, abs=1e-7), tag


def test_a_logger_unknown_or_not_installed_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^monitor.loggers: unknown logger 'neptune' \(choose from tensorboard, "):
        check_loggers(["tensorboard", "neptune"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ConfigError, match=r"mlflow is not installed; pip install 'prefpretrain\[mlflow\]'$"):
        check_loggers(["mlflow"])
    check_loggers(["tensorboard", "wandb"])


@pytest.mark.dist
def test_wandb_and_mlflow_get_what_tensorboard_gets_and_evaluate_continues_their_runs(tmp_path, tiny_shards,
                                                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (reading MLflow 3's file store, as a user would)
    run = tmp_path / "run"
    launch_tiny(tiny_shards, run, 2, **{"monitor.loggers": LOGGERS, "eval.samples": 0})
    tb = tensorboard_scalars(run)
    assert {"train/loss", "train/lr", "eval/val_loss", "ckpt/save_seconds"} <= set(tb)
    assert len(list(run.glob("wandb/offline-run-*"))) == 1  # rank 0 only
    wb, wb_config = wandb_scalars(run)
    _same(tb, wb)
    ml, ml_run = mlflow_scalars(run, tb)
    _same(tb, ml)
    assert wb_config["train"]["objective"] == "conditional" == ml_run.data.params["train.objective"]
    assert wb_config["hparams"]["objective"] == "conditional"
    assert ml_run.data.tags["hparams.objective"] == "conditional" and ml_run.info.status == "FINISHED"
    ids = json.loads((run / IDS).read_text())

    r = cli_forked("evaluate", str(run), "--samples", "0")  # eval/* at the last step, to the same runs
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / IDS).read_text()) == ids
    tb2 = tensorboard_scalars(run)
    assert len(tb2["eval/val_loss"]) == len(tb["eval/val_loss"]) + 1
    _same(tb2, wandb_scalars(run)[0])
    _same(tb2, mlflow_scalars(run, tb2)[0])
    offline = sorted(p.name.rsplit("-", 2)[-2:] for p in run.glob("wandb/offline-run-*"))  # one W&B run a process
    assert offline == [[ids["wandb"], "0"], [ids["wandb"], "1"]]


def test_mlflow_is_hidden_from_deepspeeds_own_import_only(monkeypatch):
    """DeepSpeed's autotuner imports mlflow while DeepSpeed initialises (3.6 s per process); prefpretrain hides it
    from that import alone."""
    import sys
    import types

    import prefpretrain  # noqa: F401 - installs the finder

    ds = types.ModuleType("deepspeed.autotuning.autotuner")
    ds.__spec__ = importlib.machinery.ModuleSpec("deepspeed.autotuning.autotuner", None)
    ds.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "deepspeed.autotuning.autotuner", ds)
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    with pytest.raises(ModuleNotFoundError, match="while DeepSpeed initialises"):
        importlib.import_module("mlflow")
    ds.__spec__._initializing = False
    assert importlib.util.find_spec("mlflow") is not None


def test_a_logger_failing_mid_run_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    from prefpretrain.trainer import monitor

    got = []

    class Good:
        def scalars(self, step, values):
            got.append((step, values))

        def config(self, *a):
            pass

        def hparams(self, *a):
            pass

        def close(self, status="FINISHED"):
            got.append(status)

    class Gone(Good):
        def scalars(self, step, values):
            raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(monitor, "open_loggers", lambda mon, run_dir: [Gone(), Good()])
    mon = monitor.Monitor(tmp_path, True, 10, config_text="x: 1")
    mon.scalars(1, {"train/loss": 2.0})
    mon.scalars(2, {"train/loss": 1.5})
    mon.close("FAILED")
    mon.close("FAILED")  # (a second close: nothing)
    assert got == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5}), "FAILED"]
    assert "logger Gone failed (ConnectionError: tracking server unreachable)" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
