"""A finished (or stopped) run opened for reading: `evaluate`, `export`, `generate` and continual updates all
start here (`report` reads its files only, through RunDir). Its config, its newest complete and verified
checkpoint (or a given one), the reference shard set (tokenizer, validation split), and its model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prefpretrain import distributed
from prefpretrain.config import Config, load_config
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.errors import InputError
from prefpretrain.rundir import CHECKPOINTS, CONFIG, MODEL_CONFIG, RunDir
from prefpretrain.trainer import checkpoint as ckptlib


@dataclass
class FinishedRun:
    dir: RunDir
    cfg: Config
    ckpt: Path
    state: dict  # the checkpoint's state.json

    @classmethod
    def open(cls, path: str | Path, key: str = "run_dir", check: bool = True):
        """A run directory (its newest verified checkpoint) or one checkpoint directory of a run (verified);
        what is wrong is one line naming `key`. `check=False`: checkpoints complete, checksums not read."""
        p = Path(path)
        if (p / ckptlib.STATE).is_file():  # RUN/checkpoints/step_N
            ckpt, run = p, RunDir(p.parent.parent)
            problem = ckptlib.verify(ckpt) if check else None
            if problem:
                raise InputError(f"{key}: {ckpt} is damaged ({problem})")
        elif RunDir(p).checkpoints.is_dir():
            run = RunDir(p)
            ckpt = ckptlib.find_latest(run.checkpoints, check)
            if ckpt is None:
                raise InputError(f"{key}: {path!r} has no complete checkpoint")
        else:
            raise InputError(f"{key}: {path!r} is neither a run directory nor a checkpoint directory")
        if not run.is_run():
            raise InputError(f"{key}: {run.path} has no config.yaml / model_config (not a prefpretrain run?)")
        cfg, state = load_config(run / CONFIG), ckptlib.read_state(ckpt)
        # judged as it was trained: a checkpoint from before data.document_mask existed was trained unmasked
        cfg.data.document_mask = bool(state.get("document_mask", False))
        return cls(run, cfg, ckpt, state)

    @property
    def path(self) -> Path:
        return self.dir.path

    def shards(self, split: str = "val", verify: bool = False) -> ShardSet:
        from prefpretrain.trainer.data import open_split

        return open_split(self.cfg, self.cfg.data.reference, split, verify)

    def load_model(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32, heads: bool = False):
        model, _, _ = load_run_model(self.path, self.ckpt, device=device or torch.device("cpu"), dtype=dtype,
                                     heads=heads)
        return model


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_placement(device: str = "auto", precision: str = "fp32") -> tuple[torch.device, torch.dtype]:
    """Where evaluate / generate run a trained model: the run's device (engine.device; auto = a GPU if torch
    sees one), in the training precision on a GPU, in fp32 on the CPU (the samplers' tests and the CPU
    numbers are fp32; CPU bf16 is fast on some processors only)."""
    dev = distributed.pick_device(device)
    return dev, _DTYPES[precision] if dev.type == "cuda" else torch.float32


_CPU = torch.device("cpu")


def load_run_model(run_dir: str | Path, ckpt: Path | None = None, device: torch.device = _CPU,
                   dtype: torch.dtype = torch.float32, heads: bool = False):
    """(model on `device` in `dtype`, checkpoint dir, checkpoint state) from a run's newest checkpoint (or
    `ckpt`). The ZeRO partitions are consolidated into fp32 weights on the host first (DeepSpeed's reader).
    The training heads (value, label) are left out, or with `heads` attached as they were trained."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from prefpretrain.trainer.model import HEAD_PREFIXES, attach_heads, heads_in

    run = Path(run_dir)
    ckpt = ckpt or ckptlib.find_latest(run / CHECKPOINTS)
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint under checkpoints/")
    state = ckptlib.read_state(ckpt)
    hf_conf = AutoConfig.from_pretrained(str(run / MODEL_CONFIG), local_files_only=True, trust_remote_code=False)
    auto = AutoModelForCausalLM if state.get("model_kind", "causal") == "causal" else AutoModelForMaskedLM
    model = auto.from_config(hf_conf)
    sd = ckptlib.consolidated_state_dict(ckpt)
    if heads:
        attach_heads(model, heads_in(sd))
    else:  # awr's value head and the label head are training devices, not the LM
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if "lm_head" in k or "decoder" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
    model.to(device=device, dtype=dtype).eval()
    return model, ckpt, state
