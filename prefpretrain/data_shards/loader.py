"""Per-rank data loading: a Dataset over global positions, a batch sampler for this rank's slice."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prefpretrain.data_shards.order import GlobalOrder, rank_positions
from prefpretrain.data_shards.packing import SAMPLE_ARRAYS, PackedSet


class MixtureDataset(Dataset):
    """Global position j -> the packed sample the global order puts there."""

    def __init__(self, sets: list[PackedSet], weights: list[float], seed: int):
        self.sets = sets
        self.order = GlobalOrder([len(s) for s in sets], weights, seed)

    def __len__(self) -> int:  # positions are unbounded (epochs repeat); DataLoader never asks
        return 2**62

    def locate(self, j: int) -> tuple[int, int, int]:
        return self.order(j)

    def __getitem__(self, j: int) -> dict:
        s, i, epoch = self.order(j)
        item = self.sets[s].get(i, epoch)
        return {
            **{k: torch.from_numpy(item[k]) for k in SAMPLE_ARRAYS if k in item},
            "corrupt": torch.tensor(bool(item["corrupt"])),
            "position": torch.tensor(j),
            "epoch": torch.tensor(epoch),
        }


class RankBatchSampler(Sampler):
    """Micro batches of global positions for one rank, from `start_step` to `max_steps`."""

    def __init__(self, start_step: int, max_steps: int, micro: int, global_batch: int, rank: int, world: int):
        self.start_step, self.max_steps = start_step, max_steps
        self.micro, self.global_batch, self.rank, self.world = micro, global_batch, rank, world

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield from rank_positions(step, self.micro, self.global_batch, self.rank, self.world)

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * (self.global_batch // self.world // self.micro)


def train_loader(ds: MixtureDataset, start_step: int, max_steps: int, micro: int, global_batch: int,
                 rank: int, world: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """`pin_memory` (training on a GPU): page-locked batches, so their copy to the device does not block."""
    sampler = RankBatchSampler(start_step, max_steps, micro, global_batch, rank, world)
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def val_batches(ps: PackedSet, limit: int, micro: int, rank: int, world: int):
    """(micro batch, pad) pairs: this rank's share of the first `limit` validation samples (0 = all). Batch k
    holds samples [k micro, (k+1) micro) and goes to rank k mod world; every rank gets as many batches as the
    others (a ZeRO-3 forward needs every rank), a rank short of one repeating batch 0 with `pad` set (its loss
    is not counted). The sum over ranks does not depend on the world size."""
    n = len(ps) if limit <= 0 else min(limit, len(ps))
    n_batches = -(-n // micro)
    for i in range(-(-n_batches // world)):
        k = i * world + rank
        pad = k >= n_batches
        items = [ps[j] for j in (range(min(micro, n)) if pad else range(k * micro, min(n, (k + 1) * micro)))]
        yield {key: torch.from_numpy(np.stack([it[key] for it in items]))
               for key in SAMPLE_ARRAYS if key in items[0]}, pad
