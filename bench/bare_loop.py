"""The baseline of bench/trainer_vs_bare.py: a bare torch DDP loop (run under torchrun, 2 ranks).

Same model (built from the same config), same samples (read from the same shards in the same global
order, loaded into memory before timing), AdamW, the same precision, no DeepSpeed, no logging. Rank 0 prints
one JSON line: tokens/s and the matmul peak measured by every rank.

bf16 comes in two regimes (--bf16):
  autocast  fp32 weights, bf16 matmuls under torch.autocast, fp32 gradients all-reduced (the usual DDP recipe);
  weights   what DeepSpeed's bf16 does: bf16 weights and gradients (the all-reduce carries bf16), an fp32
            master copy that AdamW updates, copied back to the bf16 weights after each step.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from prefpretrain.config import load_config
from prefpretrain.data_shards.loader import MixtureDataset, rank_positions
from prefpretrain.data_shards.packing import PackedSet
from prefpretrain.losses import token_nll
from prefpretrain.objectives import layout_for
from prefpretrain.trainer.data import open_data
from prefpretrain.trainer.flops import matmul_peak
from prefpretrain.trainer.model import build_model, count_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16", choices=["autocast", "weights"], default="autocast", help="the bf16 regime")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    sets, _, manifest = open_data(cfg)
    sp = manifest["tokenizer"]["special_ids"]
    ds = MixtureDataset([PackedSet(sets[0], layout_for(t.objective, cfg.objective.threshold, cfg.objective.drop_prob,
                                                       cfg.run.seed, sp), cfg.data.seq_len)], [1.0], cfg.run.seed)
    batches = [torch.stack([ds[j]["input_ids"] for j in mb]) for s in range(t.max_steps)
               for mb in rank_positions(s, t.micro_batch_size, t.global_batch_size, rank, world)]
    ga = cfg.grad_accum_for(world)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, manifest["tokenizer"]["vocab_size"], cfg.data.seq_len, sp)
    n_params = count_params(model)
    bf16_weights = t.precision == "bf16" and a.bf16 == "weights"
    master = [p.detach().clone().float().requires_grad_(True) for p in model.parameters()] if bf16_weights else None
    if bf16_weights:
        model.to(torch.bfloat16)
    ddp = DDP(model)
    opt = torch.optim.AdamW(master or model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                            weight_decay=t.weight_decay, fused=True)  # as the trainer's (engine.make_optimizer)
    peak = matmul_peak(t.precision, torch.device("cpu"))
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    use_bf16 = t.precision == "bf16" and not bf16_weights  # autocast
    labels_of = {}
    t0 = None
    for step in range(t.max_steps):
        if step == a.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        for m in range(ga):
            x = batches[step * ga + m]
            labels = labels_of.setdefault(id(x), x)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = ddp(input_ids=x).logits
            nll, mask = token_nll(logits, labels)
            loss = nll.sum() / mask.sum() / ga
            if m < ga - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        if bf16_weights:
            for p, m in zip(model.parameters(), master, strict=True):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(master or model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16_weights:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(model.parameters(), master, strict=True):
                    p.copy_(m)
    dist.barrier()
    dt = time.perf_counter() - t0
    tokens = (t.max_steps - a.warmup) * t.global_batch_size * cfg.data.seq_len
    if rank == 0:
        print(json.dumps({"tokens_per_s": tokens / dt, "peak_flops_per_rank": peaks, "n_params": n_params,
                          "bf16_regime": a.bf16 if t.precision == "bf16" else None,
                          "threads": int(os.environ.get("OMP_NUM_THREADS", "0"))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
