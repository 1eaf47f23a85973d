"""A run's newest checkpoint -> a HF `save_pretrained` directory (safetensors + tokenizer)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from prefpretrain import distributed

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_placement(device: str = "auto", precision: str = "fp32") -> tuple[torch.device, torch.dtype]:
    """Where evaluate / generate run a trained model: the run's device (engine.device; auto = a GPU if torch
    sees one), in the training precision on a GPU, in fp32 on the CPU (the samplers' tests and the CPU
    numbers are fp32; CPU bf16 is fast on some processors only)."""
    dev = distributed.pick_device(device)
    return dev, _DTYPES[precision] if dev.type == "cuda" else torch.float32


_CPU = torch.device("cpu")


def load_run_model(run_dir: str | Path, ckpt: Path | None = None, device: torch.device = _CPU,
                   dtype: torch.dtype = torch.float32):
    """(model on `device` in `dtype`, checkpoint dir, checkpoint state) from a run's newest checkpoint (or
    `ckpt`). The ZeRO partitions are consolidated into fp32 weights on the host first (DeepSpeed's reader)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from prefpretrain.trainer import checkpoint as ckptlib
    from prefpretrain.trainer.model import VALUE_HEAD_PREFIX

    run = Path(run_dir)
    ckpt = ckpt or ckptlib.find_latest(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint under checkpoints/")
    state = ckptlib.read_state(ckpt)
    hf_conf = AutoConfig.from_pretrained(str(run / "model_config"), local_files_only=True, trust_remote_code=False)
    auto = AutoModelForCausalLM if state.get("model_kind", "causal") == "causal" else AutoModelForMaskedLM
    model = auto.from_config(hf_conf)
    sd = {k: v for k, v in ckptlib.consolidated_state_dict(ckpt).items()
          if not k.startswith(VALUE_HEAD_PREFIX)}  # awr's value head is a training device, not the LM
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if "lm_head" in k or "decoder" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
    model.to(device=device, dtype=dtype).eval()
    return model, ckpt, state


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    from prefpretrain.config import load_config
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.data_shards.tokenizer import hf_tokenizer

    run, out = Path(run_dir), Path(out_dir)
    model, ckpt, state = load_run_model(run)
    cfg = load_config(run / "config.yaml")
    ss = ShardSet(cfg.data.shards[0].path, "train", verify=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    hf_tokenizer(ss.tokenizer_dir).save_pretrained(str(tmp))
    info = {
        "exported_from": str(ckpt), "step": state["step"], "tokens_seen": state.get("tokens_seen"),
        "objective": cfg.train.objective, "tokenizer_hash": ss.tokenizer_hash,
        "control_tokens": {"aligned": "<|aligned|>", "misaligned": "<|misaligned|>"},
        "scorer": ss.manifest["scorer"], "segmenter": ss.manifest["segmenter"], "precision": cfg.train.precision,
        "conditioning": ("prefix <|aligned|> and re-insert it after every newline"
                         if cfg.train.objective == "conditional" else "none"),
    }
    (tmp / "prefpretrain.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported step %d to %s", state["step"], out)
    return out
