"""Real multi-process training: torchrun, torch.distributed on gloo, DeepSpeed ZeRO on CPU."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import launch_tiny, read_metrics, run_cli
from tests.ranks import cli_forked


@pytest.mark.dist
def test_two_ranks_train_one_model(tiny_shards, tmp_path):
    """Through `prefpretrain launch` (torchrun), and the same run through the tests' forked ranks
    (tests/ranks.py), which most other tests use: both must give the same run."""
    run, forked = tmp_path / "run", tmp_path / "forked"
    kw = {"train.max_steps": 12, "train.log_every": 1, "train.lr": "1.0e-2"}
    launch_tiny(tiny_shards, run, torchrun=True, **kw)
    launch_tiny(tiny_shards, forked, **kw)
    keys = ("step", "loss", "nll", "lr", "grad_norm", "score_mean", "tokens_seen", "samples_seen")
    assert [[m[k] for k in keys] for m in read_metrics(run)] == [[m[k] for k in keys] for m in read_metrics(forked)]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]  # one model, not two
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and len(info["hosts"]) == 2 and info["versions"]["deepspeed"]
    losses = [m["loss"] for m in read_metrics(run)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # it learns
    for m in read_metrics(run):
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(m)
    assert (run / "config.yaml").is_file() and (run / "deepspeed_config.json").is_file()
    assert json.loads((run / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.dist
def test_world_size_does_not_change_the_training(tiny_shards, tmp_path):
    """Same global batch and order: 1 rank x accumulation 2 == 2 ranks x accumulation 1."""
    kw = {"train.max_steps": 4, "train.log_every": 1, "checkpoint.every_steps": 0, "eval.every_steps": 0}
    launch_tiny(tiny_shards, tmp_path / "w1", nproc=1, **kw)
    launch_tiny(tiny_shards, tmp_path / "w2", nproc=2, **kw)
    a = [m["loss"] for m in read_metrics(tmp_path / "w1")]
    b = [m["loss"] for m in read_metrics(tmp_path / "w2")]
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=2e-4)


@pytest.mark.dist
def test_resume_from_checkpoint_is_exact(tiny_shards, tmp_path):
    kw = {"train.max_steps": 6, "train.log_every": 1, "checkpoint.every_steps": 3, "checkpoint.keep_last": 5}
    full = tmp_path / "full"
    launch_tiny(tiny_shards, full, **kw)
    # a crash after step 3's checkpoint: drop what came later, resume
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    (cut / "checkpoints" / "latest").write_text("step_00000003")
    (cut / "metrics.jsonl").write_text("".join(
        json.dumps(m) + "\n" for m in read_metrics(full) if m["step"] <= 3))
    # attention must not change mid-run: resuming without the document mask the run was trained with is refused
    r = launch_tiny(tiny_shards, cut, expect=2, **kw, **{"data.document_mask": "false"})
    assert "data.document_mask: false, but" in r.stderr and "was trained with document masking" in r.stderr
    # nor with another cut into attention blocks (checkpoints from before the EOS opened a document's block)
    state = cut / "checkpoints" / "step_00000003" / "state.json"
    kept = state.read_text()
    state.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "document_blocks"}))
    r = launch_tiny(tiny_shards, cut, expect=2, **kw)
    assert "was trained with an earlier document-mask layout" in r.stderr
    state.write_text(kept)
    assert not (cut / "checkpoints" / "step_00000006").exists()
    r = launch_tiny(tiny_shards, cut, **kw)
    assert "resumed from" in r.stderr
    a = [m["loss"] for m in read_metrics(full)]
    b = [m["loss"] for m in read_metrics(cut)]
    assert len(b) == 6 and b == pytest.approx(a, abs=1e-6)
    state = json.loads((cut / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["data_position"] == 6 * 4 and state["world_size"] == 2


@pytest.mark.dist
def test_masked_lm_trains_and_exports(tiny_shards, tmp_path):
    run = tmp_path / "bert"
    launch_tiny(tiny_shards, run, nproc=1, **{"model.kind": "masked", "model.arch": "bert", "train.objective": "mle",
                                          "train.max_steps": 16, "train.log_every": 1, "train.lr": "1.0e-2"})
    losses = [m["loss"] for m in read_metrics(run)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    r = cli_forked("export", str(run), str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModelForMaskedLM

    assert type(AutoModelForMaskedLM.from_pretrained(str(tmp_path / "export"))).__name__ == "BertForMaskedLM"


@pytest.mark.dist
def test_two_nodes_by_hand_rendezvous_and_train_one_model(tiny_shards, tmp_path):
    """Two `launch --nnodes 2 --node-rank R --rdzv-endpoint` agents (here on one host) form one job."""
    import subprocess
    import sys

    from prefpretrain.distributed import free_port
    from tests.conftest import ROOT, cli_env, tiny_overrides

    run, port = tmp_path / "run", free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "prefpretrain", "launch", "configs/tiny.yaml", "--nnodes", "2",
                               "--node-rank", str(r), "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               *tiny_overrides(tiny_shards, run, **{"train.log_every": 1, "train.precision": "fp32"})],
                              cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    assert len(read_metrics(run)) == 6


@pytest.mark.cli
def test_launch_dry_run_prints_every_node_and_refuses_bad_requests():
    r = run_cli("launch", "configs/demo.yaml", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint",
                "n1:29500", "--dry-run", "train.max_steps=5")
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == ["# node 0", "# node 1"]
    for i, ln in enumerate(lines):
        assert f"--node-rank {i}" in ln and "--rdzv-endpoint n1:29500" in ln and ln.endswith("train.max_steps=5")
    assert run_cli("launch", "configs/demo.yaml", "--nnodes", "2", "--dry-run").returncode == 2
    r = run_cli("launch", "configs/demo.yaml", "--nnodes", "3", "--nproc-per-node", "2", "--rdzv-endpoint", "n:1",
                "--dry-run")
    assert r.returncode == 2 and "is not divisible by micro_batch_size x world size = 8 x 6" in r.stderr


@pytest.mark.cli
def test_accelerate_launcher_config_is_valid_for_accelerate_and_refused_on_cpu(tmp_path):
    """`--launcher accelerate`: the generated config loads with Accelerate's own loader, its argv parses with
    Accelerate's own launch parser, and on CPU (where `accelerate launch` starts one process) it is refused."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    from prefpretrain.launcher.accelerate import accelerate_argv, accelerate_config, config_text

    f = tmp_path / "node1.yaml"
    f.write_text(config_text(accelerate_config(4, 2, 1, "10.0.0.1:29400")))
    c = load_config_from_file(str(f))
    assert (c.distributed_type.value, c.num_machines, c.machine_rank, c.num_processes) == ("MULTI_GPU", 2, 1, 8)
    assert (c.main_process_ip, c.main_process_port, c.rdzv_backend) == ("10.0.0.1", 29400, "c10d")
    argv = accelerate_argv(str(f), "configs/tiny.yaml", ["train.max_steps=3"], max_restarts=3)
    args = launch_command_parser().parse_args(argv[3:])
    assert args.module and args.training_script == "prefpretrain" and args.max_restarts == 3
    assert args.training_script_args == ["train", "configs/tiny.yaml", "train.max_steps=3"]
    r = run_cli("launch", "configs/tiny.yaml", "--launcher", "accelerate", "--nnodes", "2", "--node-rank", "0",
                "--rdzv-endpoint", "10.0.0.1:29400", "--nproc-per-node", "1", f"run.output_dir={tmp_path}/run",
                "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("accelerate.commands.launch --config_file") == 2 and "machine_rank: 1" in r.stdout
    r = run_cli("launch", "configs/tiny.yaml", "--launcher", "accelerate", f"run.output_dir={tmp_path}/run")
    assert r.returncode == 2 and "accelerate needs GPUs" in r.stderr and not (tmp_path / "run").exists()
