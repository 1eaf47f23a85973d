"""Replay in every batch: which slots of a global batch come from the memory, deterministically.

Global batch k holds positions j = k*G + s, s in [0, G). With R = round(replay_fraction x G) replayed
samples per batch, slot s replays iff floor((s+1)R/G) > floor(sR/G) (the R slots spread evenly over the
batch, Bresenham-style). The new data's own order then consumes G-R positions per step and the memory's
order R per step: stream positions follow from j alone, so the batches do not depend on the world size
(ranks take contiguous slices of the global batch as before) and a resume at step k is exact.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from prefpretrain.data_shards.loader import MixtureDataset


def replay_per_batch(fraction: float, global_batch: int) -> int:
    return int(round(fraction * global_batch))


def replay_slots(global_batch: int, replayed: int) -> np.ndarray:
    """Boolean mask over the G slots of a global batch: True where a memory sample goes."""
    s = np.arange(global_batch, dtype=np.int64)
    return (s + 1) * replayed // global_batch > s * replayed // global_batch


class ReplayMixDataset(Dataset):
    """Global position j -> a sample of the new data or of the replay memory, by the slot rule above."""

    def __init__(self, new: MixtureDataset, memory: MixtureDataset | None, global_batch: int, replayed: int):
        if replayed and memory is None:
            raise ValueError("replay asked for, but no memory")
        self.new, self.memory, self.G, self.R = new, memory, global_batch, replayed
        self.is_replay = replay_slots(global_batch, replayed)
        # how many replay / new slots come before slot s in its batch
        self.rank_in_kind = np.where(self.is_replay, np.cumsum(self.is_replay) - 1, np.cumsum(~self.is_replay) - 1)

    def __len__(self) -> int:
        return 2**62

    def stream(self, j: int) -> tuple[bool, int]:
        """(from the memory?, position in that stream's own order) of global position j."""
        k, s = divmod(j, self.G)
        rep = bool(self.is_replay[s])
        return rep, k * (self.R if rep else self.G - self.R) + int(self.rank_in_kind[s])

    def __getitem__(self, j: int) -> dict:
        rep, p = self.stream(j)
        item = (self.memory if rep else self.new)[p]
        item["position"] = torch.tensor(j)
        item["replay"] = torch.tensor(rep)
        return item
