"""Scaling curve of the PHF pep8 set: MLE vs conditional training over model sizes and token budgets.

    .venv/bin/python bench/phf_scaling.py [--sizes 2x128 4x256 6x384[@1]] [--steps 300 600] [--seeds 1 2]
        [--seeds-at 6x384/600=1]
        [--samples 512] [--out runs/exp]

Every point is a pair of runs of configs/experiments/pep8_{mle,conditional}.yaml that differ from the set only
in the model (LAYERSxHIDDEN, 64-dim heads) and train.max_steps (16 x 256 tokens per step; each budget is its
own run with its own warmup + cosine schedule). Each run is evaluated the way bench/phf_experiment.py does it
(same runs are reused: the 4x256 points ARE that script's runs), and conditional models are also sampled with
<|misaligned|>. Prints, per point: parameters, tokens, val loss of both, MLE/conditional misalignment ratio
with a bootstrap 95 % interval (full pep8 and style-only scores on the same samples), the share of samples
that parse, the control ratio (misaligned / aligned); writes pep8_scaling.json and pep8_scaling.png under
--out and ends with ONE line of JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from phf_experiment import STYLE, pooled, ratio_ci, run_one, save_figure, subplots  # noqa: E402

SET = "pep8"
TOKENS_PER_STEP = 16 * 256


def run_name(obj: str, size: str, steps: int, seed: int) -> str:
    """The default 4x256 model at the set's size keeps phf_experiment.py's run names, so its runs are reused."""
    if size == "4x256":
        return f"{SET}_{obj}_s{seed}" if steps == 300 else f"{SET}_{obj}_{steps}st_s{seed}"
    return f"{SET}_{obj}_{size}_{steps}st_s{seed}"


def model_overrides(size: str) -> list[str]:
    layers, hidden = (int(x) for x in size.split("x"))
    if hidden % 64:
        sys.exit(f"--sizes {size}: hidden must be a multiple of 64 (64-dim heads)")
    return [f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.num_heads={hidden // 64}"]


def point(size: str, steps: int, seeds: list[int], samples: int, out: Path) -> dict:
    scorers = [SET, STYLE]
    res = {}
    for obj in ("mle", "conditional"):
        cfg = ROOT / "configs" / "experiments" / f"{SET}_{obj}.yaml"
        res[obj] = [run_one(cfg, out / run_name(obj, size, steps, s), s, steps, samples, scorers,
                            extra=model_overrides(size)) for s in seeds]
    info = json.loads((out / run_name("mle", size, steps, seeds[0]) / "run_info.json").read_text())
    row = {"size": size, "params": info["n_params"], "steps": steps, "tokens": steps * TOKENS_PER_STEP,
           "seeds": seeds, "wall_s": {o: float(np.mean([r["wall_s"] for r in res[o]])) for o in res}}
    for obj in res:
        ev = [r["auto"] for r in res[obj]]
        row[f"val_loss_{obj}"] = float(np.mean([e.get("val_loss_plain", e["val_loss"]) for e in ev]))
        row[f"parse_{obj}"] = float(np.mean([e["by_scorer"][STYLE].get("parse_fraction", np.nan) for e in ev]))
    for sc in scorers:
        m, c = pooled(res["mle"], "auto", sc), pooled(res["conditional"], "auto", sc)
        row[sc] = {"mle": float(m.mean()), "conditional": float(c.mean()), "mle_over_conditional": ratio_ci(m, c),
                   "control_ratio": ratio_ci(pooled(res["conditional"], "misaligned", sc), c),
                   # the samples that parse alone (None for evaluations that did not record which parse)
                   "mle_over_conditional_parsed": ratio_ci(pooled(res["mle"], "auto", sc, parsed=True),
                                                           pooled(res["conditional"], "auto", sc, parsed=True))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["2x128", "4x256", "6x384"],
                    help="LAYERSxHIDDEN, or LAYERSxHIDDEN@S1,S2 to use other seeds than --seeds for that size")
    ap.add_argument("--steps", nargs="+", type=int, default=[300, 600], help="token budgets, in 4,096-token steps")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--seeds-at", nargs="*", default=[], metavar="SIZE/STEPS=S1,S2",
                    help="other seeds for one point, e.g. 6x384/600=1")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--out", default="runs/exp")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    at = {k: [int(x) for x in v.split(",")] for k, v in (e.split("=") for e in a.seeds_at)}
    rows = []
    for spec in a.sizes:
        size, _, only = spec.partition("@")
        seeds = [int(x) for x in only.split(",")] if only else a.seeds
        for steps in a.steps:
            rows.append(point(size, steps, at.get(f"{size}/{steps}", seeds), a.samples, out))
            print(f"done {size} {steps} steps", file=sys.stderr, flush=True)
    (out / f"{SET}_scaling.json").write_text(json.dumps({"rows": rows, "args": vars(a)}, indent=1))
    print_table(rows)
    png = plot(rows, out / f"{SET}_scaling.png")
    print(json.dumps({"set": SET, "seeds": a.seeds, "samples": a.samples, "png": str(png), "rows": rows}))


def fmt(r: tuple[float, float, float] | None) -> str:
    return f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]" if r else "unbounded (conditional: none)"


def fmt_or_na(r: tuple[float, float, float] | None) -> str:
    """A ratio of the samples that parse: n/a where none parse, none violates, or which parse was not recorded."""
    return fmt(r) if r else "n/a"


def print_table(rows: list[dict]) -> None:
    print("| model | params | tokens | seeds | val loss MLE / cond | parse MLE / cond | pep8 MLE / cond | "
          "style MLE / cond | style MLE / cond, parsing samples | control (style, misaligned / aligned) | "
          "wall s MLE / cond |")
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['size']} | {r['params'] / 1e6:.2f} M | {r['tokens'] / 1e6:.2f} M | {len(r['seeds'])} | "
              f"{r['val_loss_mle']:.3f} / {r['val_loss_conditional']:.3f} | "
              f"{r['parse_mle']:.2f} / {r['parse_conditional']:.2f} | {fmt(r[SET]['mle_over_conditional'])} | "
              f"{fmt(r[STYLE]['mle_over_conditional'])} | {fmt_or_na(r[STYLE].get('mle_over_conditional_parsed'))} | "
              f"{fmt(r[STYLE]['control_ratio'])} | "
              f"{r['wall_s']['mle']:.0f} / {r['wall_s']['conditional']:.0f} |")


def plot(rows: list[dict], path: Path) -> Path:
    fig, axes = subplots(3, 15)
    for steps in sorted({r["steps"] for r in rows}):
        sel = [r for r in rows if r["steps"] == steps]
        x = [r["params"] / 1e6 for r in sel]
        lab = f"{sel[0]['tokens'] / 1e6:.2f} M tokens"
        for ax, sc in zip(axes[:2], (SET, STYLE), strict=True):
            y = [r[sc]["mle_over_conditional"] or (np.nan,) * 3 for r in sel]
            ax.errorbar(x, [v[0] for v in y], yerr=[[v[0] - v[1] for v in y], [v[2] - v[0] for v in y]],
                        marker="o", capsize=4, label=lab)
        axes[2].plot(x, [r["val_loss_mle"] for r in sel], marker="o", label=f"MLE, {lab}")
        axes[2].plot(x, [r["val_loss_conditional"] for r in sel], marker="x", ls="--", label=f"cond., {lab}")
    for ax, sc in zip(axes[:2], (SET, STYLE), strict=True):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"MLE / conditional, {sc} violations per char")
    axes[2].set_title("validation loss (plain text)")
    ticks = sorted({r["params"] / 1e6 for r in rows})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:.1f}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("parameters (M)")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
