"""Continual updates with memory replay on a real time-like split: forgetting vs replay fraction.

The CPython standard library's top-level modules are split by name: part 1 = modules A-M, part 2 = N-Z
(shard `inputs` globs; part 2 uses part 1's tokenizer). A small GPT-2 is trained on part 1, then updated on
part 2 three times from the same checkpoint with 0 %, 5 % and 25 % of every batch replayed from the memory
(a reservoir over part 1's windows), LR re-warmed and re-decayed. Forgetting = validation loss on part 1
after the update minus before it; the cost = validation loss on part 2 against the update without replay.

    .venv/bin/python bench/continual_replay.py [--out runs/continual_bench] [--base-steps 1200] [--update-steps 400]

Prints a table and ends with ONE line of JSON. About 9-10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    "model.arch=gpt2", "model.hidden_size=128", "model.num_layers=2", "model.num_heads=2",
    "data.seq_len=128", "train.objective=mle", "train.precision=bf16", "train.micro_batch_size=10",
    "train.global_batch_size=20", "train.lr=3e-3", "train.min_lr=3e-4", "train.log_every=25",
    "engine.zero_stage=2", "checkpoint.every_steps=0", "eval.every_steps=0", "eval.val_samples=256",
    "eval.samples=16", "eval.max_new_tokens=64", "run.seed=7",
]


def sh(*args: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    r = subprocess.run([sys.executable, "-m", "prefpretrain", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): prefpretrain {' '.join(args)}\n{r.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/continual_bench")
    ap.add_argument("--base-steps", type=int, default=1200)
    ap.add_argument("--update-steps", type=int, default=400)
    ap.add_argument("--fractions", default="0,0.05,0.25")
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args()
    from prefpretrain.data_shards.sources import stdlib_root

    t0 = time.time()
    out = (ROOT / a.out).resolve()
    lib = stdlib_root()
    p1, p2 = out / "shards_a_m", out / "shards_n_z"
    for path, glob, tok in ((p1, "[a-mA-M]*.py", "train"), (p2, "[n-zN-Z]*.py", str(p1 / "tokenizer"))):
        if not (path / "manifest.json").is_file():
            sh("shard", "--input", str(lib / glob), "--output", str(path), "--tokenizer", tok, "--vocab-size", "2048",
               "--workers", "2", "--val-fraction", "0.1")
    t_shard = time.time() - t0
    base = out / "base"
    if not (base / "checkpoints" / "latest").is_file():
        shutil.rmtree(base, ignore_errors=True)
        sh("launch", "configs/tiny.yaml", "--nproc-per-node", str(a.nproc), *COMMON, f"data.shards=[{p1}]",
           f"run.output_dir={base}", f"train.max_steps={a.base_steps}", f"train.warmup_steps={a.base_steps // 10}")
    rows = []
    for f in (float(x) for x in a.fractions.split(",")):
        run = out / f"update_replay{int(round(f * 100)):02d}"
        shutil.rmtree(run, ignore_errors=True)
        t1 = time.time()
        sh("launch", "configs/tiny.yaml", "--nproc-per-node", str(a.nproc), *COMMON, f"data.shards=[{p2}]",
           f"run.output_dir={run}", f"train.max_steps={a.update_steps}", f"train.warmup_steps={a.update_steps // 10}",
           f"continual.from={base}", f"continual.replay_fraction={f}", "continual.memory_size=2000")
        rec = json.loads((run / "forgetting.json").read_text())
        (old_name, old), = rec["old"].items()
        (new_name, new), = rec["new"].items()
        rows.append({"replay_fraction": f, "replay_per_batch": rec["replay_per_batch"],
                     "old_before": old["before"], "old_after": old["after"], "forgetting": old["forgetting"],
                     "new_before": new["before"], "new_after": new["after"],
                     "misalignment_after": rec.get("misalignment", {}).get("after"), "seconds": time.time() - t1})
    base_new = rows[0]["new_after"]
    print(f"\nbase: {a.base_steps} steps on {p1.name}; each update: {a.update_steps} steps on {p2.name}, "
          f"global batch 20 x 128 tokens, LR re-warmed ({a.update_steps // 10} steps) and re-decayed")
    print("| replay | per batch | part 1 (A-M) val loss before -> after | forgetting | part 2 (N-Z) val loss before "
          "-> after | cost on part 2 vs no replay |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replay_fraction']:.0%} | {r['replay_per_batch']}/20 | {r['old_before']:.4f} -> "
              f"{r['old_after']:.4f} | {r['forgetting']:+.4f} | {r['new_before']:.4f} -> {r['new_after']:.4f} | "
              f"{r['new_after'] - base_new:+.4f} |")
    falls = all(b["forgetting"] < a_["forgetting"] for a_, b in zip(rows, rows[1:], strict=False))
    print(f"forgetting falls as replay rises: {falls}")
    print(json.dumps({"bench": "continual_replay", "base_steps": a.base_steps, "update_steps": a.update_steps,
                      "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                      "forgetting_falls_with_replay": falls, "shard_seconds": round(t_shard, 1),
                      "total_seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
