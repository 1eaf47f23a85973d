"""The seam through which a training run is extended without weaving code into the loop.

A hook sees the run at fixed points; every method has a do-nothing default, so an extension implements only
what it needs. Continual updates (prefpretrain.continual.update) are one: the CLI passes them to
`trainer.loop.train(cfg, hooks)`, and the trainer imports nothing of theirs. The order of calls:

    start(ctx)                 the data is open; no model yet (long rank-0 work goes through distributed.rank0_does)
    wrap_dataset(ds)           the training dataset, e.g. with replayed samples mixed in
    initial_model()            a model to train instead of a newly built one (None: build one)
    check_resume(state, ckpt)  refuse a checkpoint this extension cannot continue from
    extra_loss(...)            per micro batch: a term added to the objective's loss (None: nothing)
    window_values()            per log window, on every rank at the same step: scalars for the monitor
    checkpoint_state(step)     what state.json records under `name`, at every checkpoint
    finish(module, step, mon)  after the last step, on every rank: reports, files for the next run
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prefpretrain.config import Config
from prefpretrain.data_shards.packing import Layout, MaskSpec


@dataclass(frozen=True)
class TrainContext:
    """What a hook may know at `start`."""

    cfg: Config
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    layout: Layout
    mlm: MaskSpec | None
    vocab_size: int


class TrainHooks:
    name = ""  # the key of checkpoint_state() in a checkpoint's state.json

    def start(self, ctx: TrainContext) -> None:
        pass

    def wrap_dataset(self, ds):
        return ds

    def initial_model(self) -> torch.nn.Module | None:
        return None

    def check_resume(self, state: dict, ckpt: Path) -> None:
        pass

    def extra_loss(self, module, batch: dict, logits: torch.Tensor, scale: float) -> torch.Tensor | None:
        return None

    def window_values(self) -> dict[str, float]:
        return {}

    def checkpoint_state(self, step: int) -> dict | None:
        return None

    def finish(self, module, step: int, mon) -> None:
        pass


class HookList(TrainHooks):
    """Several hooks as one, called in the order given."""

    def __init__(self, hooks: Sequence[TrainHooks] = ()):
        self.hooks = list(hooks)

    def start(self, ctx: TrainContext) -> None:
        for h in self.hooks:
            h.start(ctx)

    def wrap_dataset(self, ds):
        for h in self.hooks:
            ds = h.wrap_dataset(ds)
        return ds

    def initial_model(self) -> torch.nn.Module | None:
        models = [m for m in (h.initial_model() for h in self.hooks) if m is not None]
        if len(models) > 1:
            raise ValueError("more than one hook supplies the initial model")
        return models[0] if models else None

    def check_resume(self, state: dict, ckpt: Path) -> None:
        for h in self.hooks:
            h.check_resume(state, ckpt)

    def extra_loss(self, module, batch: dict, logits: torch.Tensor, scale: float) -> torch.Tensor | None:
        terms = [t for t in (h.extra_loss(module, batch, logits, scale) for h in self.hooks) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def window_values(self) -> dict[str, float]:
        return {k: v for h in self.hooks for k, v in h.window_values().items()}

    def checkpoint_state(self, step: int) -> dict:
        return {h.name: s for h in self.hooks if (s := h.checkpoint_state(step)) is not None}

    def finish(self, module, step: int, mon) -> None:
        for h in self.hooks:
            h.finish(module, step, mon)
