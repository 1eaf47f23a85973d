"""What the label head and the similarity task cost (issue 22), side by side, like for like.

    python bench/heads_overhead.py [--shards DIR] [--steps 40] [--rounds 2] [--out docs/results/heads_overhead.json]

1. data: reading packed samples with `segment` keys (PackedSet(segments=True)) against without, the same samples
   (400 at seeded random places, as training reads them) in alternating passes, the best pass of each (the keys
   cost a read of the document's segment table per document window).
2. training: the same small GPT-2 run (fp32, ZeRO-2, 1 rank, the same seed, data and steps) with no auxiliary
   term, the label head, the similarity task (neighbour positives), both, and the similarity task with dropout
   views (a second forward); configurations interleaved over --rounds rounds; median tokens/s of each run after
   its first 5 steps, and its ratio to the baseline of the same round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_mfu import QUIET, ROOT, cli, metrics, shard  # noqa: E402

MODEL = ["model.arch=gpt2", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "data.seq_len=256",
         "train.micro_batch_size=8", "train.global_batch_size=8", "train.precision=fp32", "engine.zero_stage=2",
         "train.objective=mle", "train.log_every=1", "model.dropout=0.1"]
CONFIGS = {
    "baseline": [],
    "label_head": ["objective.label_head_weight=1.0"],
    "similarity": ["objective.similarity_weight=0.1"],
    "both": ["objective.label_head_weight=1.0", "objective.similarity_weight=0.1"],
    "similarity_dropout": ["objective.similarity_weight=0.1", "objective.similarity_positive=dropout"],
}


def data_part(shards: str, n: int = 400, passes: int = 3) -> dict:
    import numpy as np

    from prefpretrain.data_shards.packing import Layout, PackedSet
    from prefpretrain.data_shards.reader import ShardSet

    ss = ShardSet(shards, verify=False)
    sets = {k: PackedSet(ss, Layout("mle"), 256, segments=k == "keys") for k in ("plain", "keys")}
    n = min(n, len(sets["plain"]))
    order = np.random.default_rng(0).permutation(len(sets["plain"]))[:n]  # random places, as training reads them
    times: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(passes):
        for k, ps in sets.items():
            t0 = time.perf_counter()
            for i in order:
                ps[int(i)]
            times[k].append((time.perf_counter() - t0) / n)
    per = {k: min(v) for k, v in times.items()}
    return {"samples": n, "seconds_per_sample": per, "ratio_keys_over_plain": per["keys"] / per["plain"]}


def train_part(shards: str, work: Path, steps: int, rounds: int) -> dict:
    runs: dict[str, list[float]] = {k: [] for k in CONFIGS}
    for r in range(rounds):
        for name, over in CONFIGS.items():
            run = work / f"{name}_{r}"
            cli("launch", str(ROOT / "configs" / "tiny.yaml"), "--nproc-per-node", "1", f"data.shards=[{shards}]",
                f"run.output_dir={run}", *MODEL, *QUIET, *over, f"train.max_steps={steps}")
            tps = [m["tokens_per_s"] for m in metrics(run)][5:]
            runs[name].append(statistics.median(tps))
    ratios = {k: [v / b for v, b in zip(runs[k], runs["baseline"], strict=True)] for k in CONFIGS}
    return {"tokens_per_s": runs, "ratio_to_baseline": {k: statistics.median(v) for k, v in ratios.items()},
            "ratios_per_round": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="a shard set (default: 200 stdlib files, pep8, vocab 8 k, made in --work)")
    ap.add_argument("--work", help="runs and shards here (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="write the results (JSON) here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(a.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        shards = a.shards or shard(str(work / "shards"), vocab=8000, max_files=200)
        res = {"bench": "heads_overhead", "shards": shards, "model": MODEL, "steps": a.steps, "rounds": a.rounds,
               "data": data_part(shards), "train": train_part(shards, work, a.steps, a.rounds)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
