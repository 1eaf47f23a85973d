"""Checkpoints are pickles: `torch.load(weights_only=False)` runs whatever a crafted file names, and a CRC-32
beside it can be recomputed by whoever crafted it. Every torch.load of a prefpretrain process — its own and
DeepSpeed's (its checkpoint engine and zero_to_fp32 pass weights_only=False) — is forced to weights-only
unpickling (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, also inherited by the universal-checkpoint converter,
which `python -m prefpretrain.trainer.safe_load` runs), with exactly three DeepSpeed types allowed besides
tensors and plain containers: over every kind of checkpoint the test suite writes (ZeRO 0-3, bf16/fp32,
universal), those are the only other globals the files name (DESIGN.md), plus fp16's DynamicLossScaler
(GPU-only, so not in that survey; a test round-trips one).
"""
from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

from prefpretrain.errors import InputError

ALLOWED = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
           "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16's ZeRO optimizer states
           "deepspeed.utils.tensor_fragment.fragment_address")
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpoint(InputError):
    """A checkpoint file names Python objects beyond the allow-list: refused, never unpickled."""


def force_weights_only() -> None:
    """Every torch.load of this process and its children weights-only (no torch import: the CLI sets it first
    thing; torch refuses every load when the NO_ variant is set too, so a user's one is removed)."""
    os.environ[_FORCE] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def enforce() -> None:
    """Weights-only loading for this process and its children, with the allow-list registered."""
    force_weights_only()
    import torch

    allowed = []
    for dotted in ALLOWED:
        module, _, name = dotted.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), name))
    torch.serialization.add_safe_globals(allowed)


def refusal(where: str | Path, e: BaseException) -> UnsafeCheckpoint:
    """The one line for a file weights-only unpickling refused (torch's message names the global)."""
    text = str(e)
    named = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported global" in ln), "")
    return UnsafeCheckpoint(f"{where}: refused to load it: it names Python objects a checkpoint does not hold "
                            f"({named or text.splitlines()[0] if text else type(e).__name__}); nothing was run")


def is_refusal(e: BaseException) -> bool:
    return isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)


def main() -> None:
    """`python -m prefpretrain.trainer.safe_load ARGS`: DeepSpeed's ds_to_universal with weights-only loading."""
    import runpy
    import sys

    enforce()
    sys.argv[0] = "ds_to_universal"
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
