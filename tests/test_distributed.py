"""The communication layer (prefpretrain/distributed.py): the only module that issues collectives, device and
thread binding for every launcher, collectives between two real processes, and the validation split that keeps
ZeRO-3 ranks in step."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prefpretrain.distributed import Placement, device_index, free_port, placement, threads_for
from tests.conftest import ROOT, cli_env


def _torch_distributed_uses(tree: ast.AST) -> list[str]:
    """Imports of torch.distributed (as a module or names from it) in a parsed file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed") or (
                    node.module == "torch" and any(a.name == "distributed" for a in node.names)):
                found.append(node.module)
    return found


def test_no_module_but_the_communication_layer_touches_torch_distributed():
    """Every collective goes through prefpretrain/distributed.py, which puts tensors on the backend's device:
    a `dist.all_reduce` on a CPU tensor anywhere else would fail under NCCL at the first step."""
    offenders = {}
    for f in sorted((ROOT / "prefpretrain").rglob("*.py")):
        if f.name == "distributed.py" and f.parent.name == "prefpretrain":
            continue
        uses = _torch_distributed_uses(ast.parse(f.read_text()))
        if uses:
            offenders[str(f.relative_to(ROOT))] = uses
    assert offenders == {}
    # the check itself sees what it looks for
    assert _torch_distributed_uses(ast.parse("import torch.distributed as dist\nfrom torch import distributed"))
    assert _torch_distributed_uses(ast.parse((ROOT / "prefpretrain" / "distributed.py").read_text()))


# launcher environment, visible GPUs -> (rank, world, local rank, launcher), device index (or the error)
CASES = [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, 8, (3, 8, 3, "torchrun"), 3),
    ({"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, 8, (11, 16, 3, "torchrun"), 3),
    # torchrun with CUDA_VISIBLE_DEVICES=2,3: two visible, LOCAL_RANK picks among them
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "2,3"}, 2,
     (1, 2, 1, "torchrun"), 1),
    # a rank with one GPU of its own (CUDA_VISIBLE_DEVICES=5 per rank): ordinal 0
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "CUDA_VISIBLE_DEVICES": "5"}, 1,
     (5, 8, 5, "torchrun"), 0),
    # srun, one GPU bound per task (--gpus-per-task=1): every task sees one device, whatever its SLURM_LOCALID
    ({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
      "SLURM_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "5"}, 1, (13, 16, 5, "srun"), 0),
    # srun with all GPUs visible to every task: SLURM_LOCALID picks
    ({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
      "SLURM_TASKS_PER_NODE": "8(x2)"}, 8, (13, 16, 5, "srun"), 5),
    # srun with two GPUs per task and four tasks per node: no sound choice
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4"}, 2,
     (1, 4, 1, "srun"), "bind one GPU per task"),
    # more ranks than GPUs under torchrun
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}, 2, (2, 4, 2, "torchrun"),
     "sees only 2 GPUs"),
    ({}, 1, (0, 1, 0, "single"), 0),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, 4, (0, 1, 0, "single"), 0),  # one task
    ({"RANK": "0", "WORLD_SIZE": "1"}, 0, (0, 1, 0, "torchrun"), "sees no GPU"),
]


@pytest.mark.parametrize(("env", "visible", "where", "index"), CASES)
def test_device_for_every_launcher(env, visible, where, index):
    p = placement(env)
    assert (p.rank, p.world_size, p.local_rank, p.launcher) == where
    if isinstance(index, int):
        assert device_index(p, visible, env.get("CUDA_VISIBLE_DEVICES")) == index
    else:
        with pytest.raises(RuntimeError, match=index):
            device_index(p, visible, env.get("CUDA_VISIBLE_DEVICES"))


def test_slurm_tasks_per_node_and_threads():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "11", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "4(x2),3"}
    assert placement(env).local_world_size == 3
    torchrun = Placement(0, 16, 0, 8, "torchrun")
    assert threads_for(torchrun, 112, {}) == 14  # the node's ranks share the agent's CPUs
    srun = Placement(0, 16, 0, 8, "srun")
    assert threads_for(srun, 14, {"SLURM_CPUS_PER_TASK": "14"}) == 14  # a task owns its CPUs
    assert threads_for(srun, 112, {"SLURM_CPUS_PER_TASK": "14"}) == 14  # no task binding: the task's share
    assert threads_for(srun, 112, {}) == 14 and threads_for(torchrun, 4, {}) == 1


@pytest.mark.dist
def test_collectives_between_two_processes_and_rank0_failures_reach_the_others():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_worker.py"), "60"],
                              env=dict(cli_env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    for r, x in enumerate(res):
        assert x["world"] == 2 and x["comm_device"] == "cpu"
        assert x["sum"] == [1.0, 2.0] and x["sum_tensor"] == [2.0, 1.0] and x["max"] == [1.0]
        assert x["any_only_rank1"] is True and x["any_none"] is False
        assert x["broadcast"] == {"from": 0} and x["gathered"] == ["rank0", "rank1"]
        assert x["rank0_does"] == ("done" if r == 0 else None)
    assert res[0]["failure"] == "ValueError: boom on rank 0"
    assert res[1]["failure"].startswith("RuntimeError: rank 0 failed a failing job: ValueError: boom on rank 0")
    assert res[1]["failure_seconds"] < 10  # not the 60 s timeout


def test_validation_batches_keep_every_rank_in_step():
    """17 samples, micro 8, 2 ranks: each rank runs 2 forwards (one of rank 1's is a counted-out repeat), and
    the samples that count are each sample once, whatever the world size."""
    from prefpretrain.data_shards.loader import val_batches

    ps = [{k: np.full(4, i) for k in ("input_ids", "labels", "scores", "control")} for i in range(17)]
    for world in (1, 2, 3, 4):
        counted, forwards = [], []
        for r in range(world):
            got = list(val_batches(ps, 0, 8, r, world))
            forwards.append(len(got))
            counted += [int(x) for b, pad in got if not pad for x in b["input_ids"][:, 0]]
        assert len(set(forwards)) == 1, forwards
        assert sorted(counted) == list(range(17))


def test_user_deepspeed_settings_merge_and_conflicts_are_refused():
    from prefpretrain.config import ConfigError, load_config
    from prefpretrain.trainer.engine import ds_config

    over = ["engine.zero_stage=3", "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0, "
            "stage: 3}, communication_data_type: fp32}"]
    conf = ds_config(load_config(ROOT / "configs" / "tiny.yaml", over), 2)
    z = conf["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0
    assert conf["communication_data_type"] == "fp32"
    bad = load_config(ROOT / "configs" / "tiny.yaml", ["engine.deepspeed={zero_optimization: {stage: 1}}"])
    with pytest.raises(ConfigError, match=r"engine.deepspeed.zero_optimization.stage: prefpretrain sets it to 2"):
        ds_config(bad, 2)


def test_optimizer_fits_the_device(monkeypatch):
    """torch's fused AdamW with the guard (CPU and CUDA); CUDA + offload: DeepSpeed's CPU Adam."""
    from prefpretrain.config import load_config
    from prefpretrain.trainer import engine

    model = torch.nn.Linear(4, 4)
    cpu = engine.make_optimizer(load_config(ROOT / "configs" / "tiny.yaml"), model)
    assert isinstance(cpu, engine.GuardedAdamW) and cpu.defaults["fused"]
    assert engine.optimizer_kind(load_config(ROOT / "configs" / "tiny.yaml", ["engine.offload=optimizer"])) == \
        "adamw_fused"  # offloading from the CPU to the CPU: nothing moves, no 45 s CPU Adam build
    monkeypatch.setattr(engine.host, "use_cuda", lambda device: True)
    assert engine.optimizer_kind(load_config(ROOT / "configs" / "tiny.yaml")) == "adamw_fused"
    off = load_config(ROOT / "configs" / "tiny.yaml", ["engine.offload=optimizer"])
    assert engine.optimizer_kind(off) == "deepspeed_cpu_adam"
    assert engine.ds_config(off, 2)["zero_force_ds_cpu_optimizer"] is True


def test_deepspeed_on_cpu_builds_no_op_training_does_not_use(monkeypatch, tmp_path):
    """DeepSpeed's CPU comm backend would JIT-build its shared-memory op (~45 s of gcc on a fresh machine) for its
    inference all-reduce alone: after import_deepspeed its loader returns no op and builds nothing."""
    from prefpretrain.host import torch_sees_gpu
    from prefpretrain.trainer import engine

    if torch_sees_gpu():
        pytest.skip("DeepSpeed's CUDA accelerator builds no shared-memory comm op")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ds = engine.import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    assert ds.get_accelerator().device_name() == "cpu"
    assert build_shm_op() is None and not any(tmp_path.iterdir())


def test_mfu_model_flops_and_the_datasheet_peak():
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefpretrain.trainer.flops import datasheet_peak, flops_per_token, matmul_params

    m = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=8, n_layer=2, n_head=2))
    total = sum(p.numel() for p in m.parameters())
    assert matmul_params(m) == total - 16 * 8  # the position table is a lookup; the tied head is a matmul
    assert flops_per_token(m, 16) == 6 * (total - 128) + 12 * 2 * 8 * 16
    assert datasheet_peak("NVIDIA H200", "bf16") == 989e12 and datasheet_peak("NVIDIA H100 PCIe", "fp16") == 756e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert datasheet_peak("NVIDIA H200", "fp32") is None and datasheet_peak("Some Future GPU", "bf16") is None


def test_chunked_cross_entropy_equals_torchs_values_and_gradients(monkeypatch):
    from prefpretrain import losses

    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 3 * 50)  # several chunks
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, 3] = losses.IGNORE
    for causal in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            base = torch.randn(2, 7, 50, generator=g).to(dtype)
            a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
            la, ma = losses.token_logp(a, labels, causal)
            lb, mb = losses.token_logp(b, labels, causal, chunked=True)
            assert torch.equal(ma, mb) and torch.allclose(la, lb, atol=1e-5)
            w = torch.rand(la.shape, generator=g)
            (la * w).sum().backward()
            (lb * w).sum().backward()
            assert b.grad.dtype == dtype
            assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_samples_do_not_depend_on_how_many_ranks_draw_them():
    """Batch k always draws from its own generator: two ranks' shares put together are one rank's samples."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefpretrain.trainer.sampling import my_batches, nucleus_floor, sample, top_p_probs

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    kw = {"bos_id": 0, "eos_id": 1, "banned": [2], "seed": 7, "batch_size": 3, "top_p": 0.8}
    one = sample(m, 7, 12, **kw)
    parts = [sample(m, 7, 12, rank=r, world=2, **kw) for r in (0, 1)]
    index = [j for r in (0, 1) for rng in my_batches(7, 3, r, 2) for j in rng]
    merged = dict(zip(index, parts[0] + parts[1], strict=True))
    assert [merged[j] for j in range(7)] == one and len(one) == 7
    assert all(2 not in s for s in one)
    # the device-side nucleus (GPUs) keeps what the host-side one (CPU) keeps
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(logits, -1)
    assert torch.equal(top_p_probs(logits, 0.7), torch.where(probs >= nucleus_floor(probs, 0.7)[:, None], probs, 0.0))


@pytest.mark.cli
def test_a_cuda_request_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from tests.conftest import run_cli

    r = run_cli("generate", str(tmp_path), "--device", "cuda")
    assert r.returncode == 2 and r.stderr.strip() == "prefpretrain: config error: --device: cuda asked for, but " \
                                                      "torch sees no GPU"
    assert Path(tmp_path).is_dir()


@pytest.mark.cli
def test_weights_only_loading_takes_every_deepspeed_type_a_checkpoint_holds(tmp_path):
    """fp16's dynamic loss scaler is pickled into ZeRO optimizer states (GPU only, so no CPU run writes one):
    it must load under the forced weights-only setting, and a planted global must not."""
    import os
    import pickle
    import subprocess
    import sys

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    f = tmp_path / "states.pt"
    torch.save({"loss_scaler": DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                                           consecutive_hysteresis=False), "x": torch.ones(2)}, f)
    code = ("import sys, torch; from prefpretrain.trainer import safe_load; safe_load.enforce(); "
            "print(type(torch.load(sys.argv[1], weights_only=False)['loss_scaler']).__name__)")
    r = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))  # (a user's setting, popped)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "DynamicLossScaler", r.stderr[-2000:]
    torch.save({"x": pickle.loads(pickle.dumps(Path("/tmp")))}, f)  # a global outside the allow-list
    r = subprocess.run([sys.executable, "-c", code.replace("['loss_scaler']).__name__", ")"), str(f)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "Weights only load failed" in r.stderr


def test_a_changed_universal_form_is_converted_again(tmp_path):
    from prefpretrain.trainer.checkpoint import _checksum, _universal_problem

    out = tmp_path / "step_00000003_universal"
    (out / "zero" / "w").mkdir(parents=True)
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"weights")
    files = {"zero/w/fp32.pt": _checksum(out / "zero" / "w" / "fp32.pt")}
    (out / "converted").write_text(json.dumps({"files": files}))
    assert _universal_problem(out) is None
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"weightz")
    assert _universal_problem(out) == "zero/w/fp32.pt does not match its checksum"
    (out / "converted").write_text("ok\n")  # written before the checksums were recorded
    assert _universal_problem(out) == "no checksums recorded"
