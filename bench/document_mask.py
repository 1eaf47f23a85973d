"""The cost of document-masked packing (data.document_mask), side by side with the unmasked run.

    .venv/bin/python bench/document_mask.py [--steps 20] [--repeats 3] [--shards data/stdlib_pep8]
                                            [--precision fp32] [--out docs/results/document_mask.json]

Both runs are `prefpretrain launch` on 2 ranks with the same model, tokens, precision and I/O (GPT-2 6 x 320,
~10 M parameters, seq 256, 16 x 256 tokens per step, ZeRO-2, no checkpoints or evaluation); the only difference
is data.document_mask. Steady-state tokens/s from metrics.jsonl (first log window dropped). --repeats N
alternates the two N times and reports the median of the per-pair ratios (masked / unmasked) with their range.
On CPU the masked run goes through SDPA with a block-diagonal boolean mask instead of its causal fast path; on a
GPU with flash_attention_2 transformers calls the variable-length kernel instead (not measured here).
Prints ONE line of JSON (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.hidden_size=320", "model.num_layers=6", "model.num_heads=5"]


def run(shards: str, steps: int, precision: str, masked: bool, out: Path) -> dict:
    from prefpretrain.launcher.local import child_env

    cmd = [sys.executable, "-m", "prefpretrain", "launch", str(ROOT / "configs" / "demo.yaml"), "--nproc-per-node",
           "2", f"data.shards=[{shards}]", f"run.output_dir={out}", f"train.max_steps={steps}", "train.log_every=5",
           f"train.precision={precision}", "checkpoint.every_steps=0", "eval.every_steps=0", "eval.val_samples=2",
           f"data.document_mask={str(masked).lower()}", *MODEL]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=child_env(2))
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in ms if m["kind"] == "train"][1:]
    return {"tokens_per_s": sum(m["tokens_per_s"] for m in train) / len(train),
            "final_loss": train[-1]["loss"] if train else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=str(ROOT / "data" / "stdlib_pep8"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", help="also write the JSON line here")
    a = ap.parse_args()
    if not (Path(a.shards) / "manifest.json").is_file():
        sys.exit(f"{a.shards}: no shard set (make demo shards data/stdlib_pep8)")
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.repeats):
            plain = run(a.shards, a.steps, a.precision, False, Path(tmp) / f"plain{k}")
            masked = run(a.shards, a.steps, a.precision, True, Path(tmp) / f"masked{k}")
            pairs.append({"unmasked": plain, "masked": masked,
                          "ratio": masked["tokens_per_s"] / plain["tokens_per_s"]})
            print(f"pair {k}: {json.dumps(pairs[-1])}", file=sys.stderr, flush=True)
    ratios = [p["ratio"] for p in pairs]
    res = {"bench": "document_mask", "precision": a.precision, "steps": a.steps, "model": MODEL, "seq_len": 256,
           "ranks": 2, "pairs": pairs, "ratio_median": statistics.median(ratios),
           "ratio_range": [min(ratios), max(ratios)],
           "unmasked_tokens_per_s_median": statistics.median(p["unmasked"]["tokens_per_s"] for p in pairs),
           "masked_tokens_per_s_median": statistics.median(p["masked"]["tokens_per_s"] for p in pairs)}
    line = json.dumps(res)
    if a.out:
        Path(a.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
