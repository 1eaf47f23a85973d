"""The sampler against an earlier revision's, side by side: same model, same prompt, same device and threads.

    .venv/bin/python bench/sampler_speed.py [--baseline c8b564b] [--n 64] [--tokens 128] [--rounds 3] [--device cpu]

The model is the demo's size (GPT-2, 4 x 256, vocab 8192, 256 positions, 5.3 M parameters) with random
weights: sampling speed does not depend on what the weights say, only on how many tokens are drawn, so both
samplers run all `--tokens` steps (no EOS is ever drawn: it is banned). The baseline is the file
prefpretrain/trainer/sampling.py at `--baseline` (git show), loaded as its own module. Rounds alternate
(baseline, current, baseline, ...); the medians and their ratio are printed as ONE line of JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str, tmp: Path):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:prefpretrain/trainer/sampling.py"],
                         capture_output=True, text=True, check=True).stdout
    f = tmp / "sampling_baseline.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("sampling_baseline", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="c8b564b")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefpretrain.trainer import sampling

    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=4, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).to(dev).eval()
    kw = {"bos_id": 0, "eos_id": 0, "banned": [0, 1, 2, 3], "temperature": 0.7, "top_p": 0.9,
          "seed": 1, "max_positions": 256}
    with tempfile.TemporaryDirectory() as tmp:
        base = load_revision(a.baseline, Path(tmp))
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        for _ in range(a.rounds):
            for name, mod in (("baseline", base), ("current", sampling)):
                t0 = time.perf_counter()
                seqs = mod.sample(model, a.n, a.tokens, **kw)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[name].append(time.perf_counter() - t0)
                assert len(seqs) == a.n and all(len(s) == a.tokens for s in seqs), name
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"bench": "sampler_speed", "baseline_rev": a.baseline, "device": str(dev),
                      "threads": torch.get_num_threads(), "samples": a.n, "tokens": a.tokens,
                      "n_params": sum(p.numel() for p in model.parameters()),
                      "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                      "median_s": {k: round(v, 3) for k, v in med.items()},
                      "current_over_baseline_speed": round(med["baseline"] / med["current"], 3),
                      "python": sys.version.split()[0], "torch": torch.__version__}))


if __name__ == "__main__":
    main()
