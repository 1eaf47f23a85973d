"""Continual updates with memory replay on a real time-like split: forgetting vs replay fraction.

Part 1 = the CPython standard library's top-level modules A-M. Part 2 depends on --shift (both sharded with
part 1's tokenizer):

  strong (default)  part 2 = English prose: the Python documentation's reST sources (data/raw/python-docs:
                    tutorial, reference, howto, faq, using; fetched by bench/get_python_docs.sh if missing)
  weak              part 2 = stdlib modules N-Z (more Python code; shard `inputs` globs)

A small GPT-2 is trained on part 1, then updated on part 2 three times from the same checkpoint with 0 %, 5 %
and 25 % of every batch replayed from the memory (a reservoir over part 1's windows), LR re-warmed and
re-decayed. Forgetting = validation loss on part 1 after the update minus before it; the cost = validation
loss on part 2 against the update without replay.

    .venv/bin/python bench/continual_replay.py [--shift strong] [--base-steps 800] [--update-steps 300]
    .venv/bin/python bench/continual_replay.py --shift weak [--base-steps 1200] [--update-steps 400]

(default --out: runs/continual_bench_strong / runs/continual_bench). Prints a table and ends with ONE line of
JSON. Strong: about 6-7 minutes on 2 CPU cores (nice 15, beside another job); weak: about 9-10 minutes.
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


# the strong shift's part 2: the docs' prose sections (≈ 1.8 MB), not the 6.8 MB library reference
DOC_DIRS = ("tutorial", "reference", "howto", "faq", "using")


def sh(*args: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    r = subprocess.run([sys.executable, "-m", "prefpretrain", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): prefpretrain {' '.join(args)}\n{r.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shift", choices=["weak", "strong"], default="strong",
                    help="part 2: weak = stdlib modules N-Z, strong = the Python docs' reST prose")
    ap.add_argument("--out", default=None, help="default runs/continual_bench[_strong]")
    ap.add_argument("--base-steps", type=int, default=None, help="default 1200 (weak) / 800 (strong)")
    ap.add_argument("--update-steps", type=int, default=None, help="default 400 (weak) / 300 (strong)")
    ap.add_argument("--fractions", default="0,0.05,0.25")
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args()
    strong = a.shift == "strong"
    a.out = a.out or ("runs/continual_bench_strong" if strong else "runs/continual_bench")
    a.base_steps = a.base_steps or (800 if strong else 1200)
    a.update_steps = a.update_steps or (300 if strong else 400)
    from prefpretrain.data_shards.sources import stdlib_root

    t0 = time.time()
    out = (ROOT / a.out).resolve()
    lib = stdlib_root()
    p1 = out / "shards_a_m"
    # (output, inputs, tokenizer, extra shard options)
    parts = [(p1, [str(lib / "[a-mA-M]*.py")], "train", [])]
    if strong:
        docs = ROOT / "data" / "raw" / "python-docs"
        if not docs.is_dir():
            subprocess.run(["bash", str(ROOT / "bench" / "get_python_docs.sh"), str(docs)], cwd=ROOT, check=True)
        p2, name1, name2 = out / "shards_docs", "A-M code", "docs prose"
        parts.append((p2, [str(docs / d) for d in DOC_DIRS], str(p1 / "tokenizer"),
                      ["--scorer", "none", "--segmenter", "document"]))
    else:
        p2, name1, name2 = out / "shards_n_z", "A-M", "N-Z"
        parts.append((p2, [str(lib / "[n-zN-Z]*.py")], str(p1 / "tokenizer"), []))
    for path, inputs, tok, extra in parts:
        if not (path / "manifest.json").is_file():
            sh("shard", "--input", *inputs, "--output", str(path), "--tokenizer", tok, "--vocab-size", "2048",
               "--workers", "2", "--val-fraction", "0.1", *extra)
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
    print(f"| replay | per batch | part 1 ({name1}) val loss before -> after | forgetting | part 2 ({name2}) val "
          "loss before -> after | cost on part 2 vs no replay |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replay_fraction']:.0%} | {r['replay_per_batch']}/20 | {r['old_before']:.4f} -> "
              f"{r['old_after']:.4f} | {r['forgetting']:+.4f} | {r['new_before']:.4f} -> {r['new_after']:.4f} | "
              f"{r['new_after'] - base_new:+.4f} |")
    falls = all(b["forgetting"] < a_["forgetting"] for a_, b in zip(rows, rows[1:], strict=False))
    print(f"forgetting falls as replay rises: {falls}")
    print(json.dumps({"bench": "continual_replay", "shift": a.shift, "base_steps": a.base_steps,
                      "update_steps": a.update_steps,
                      "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                      "forgetting_falls_with_replay": falls, "shard_seconds": round(t_shard, 1),
                      "total_seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
