"""Run a PHF experiment set (configs/experiments/SET_*.yaml) over seeds and print the comparison table.

    .venv/bin/python bench/phf_experiment.py --set pep8_style [--objectives mle conditional ...]
        [--seeds 1 2] [--steps 600] [--samples 512] [--out runs/exp] [--control-protocol newline|prefix|segment]

Per (objective, seed): `prefpretrain run CONFIG run.seed=S` (shards built once per set, equal token budgets),
then `prefpretrain evaluate` with N samples scored by the set's scorer and by the style-only scorer on the same
samples. Conditional models sample with <|aligned|> re-inserted after every newline, or as --control-protocol
says, and also with <|misaligned|> to check that the control token works. Runs trained by an earlier invocation
are only evaluated, so `--control-protocol segment` re-evaluates a finished set. Samples of all seeds are pooled;
intervals are two-level percentile bootstraps of the mean (training seeds resampled, then samples within each
seed), so they cover seed-to-seed variation; with one seed they cover sampling noise only, and the output says
so. Validation loss is on the plain held-out text (no control tokens, no filtering), so it is comparable across
objectives. Writes SET_results[_PROTOCOL].json and SET_misalignment[_PROTOCOL].png under --out, prints a table
and ends with ONE line of JSON. Every evaluation also writes its samples (RUN/eval_*.samples.jsonl), which
bench/sample_anatomy.py breaks down by code, line type and kind of sample.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["mle", "filter", "conditional", "unlikelihood", "rwr", "awr"]
STYLE = "pep8_style"


def sh(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "prefpretrain", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): prefpretrain {' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def run_one(cfg: Path, run: Path, seed: int, steps: int | None, samples: int, scorers: list[str],
            extra: list[str] = (), protocol: str = "newline") -> dict:
    over = [f"run.seed={seed}", f"run.output_dir={run}", "eval.samples=0", *extra]
    if steps:
        over += [f"train.max_steps={steps}", f"checkpoint.every_steps={steps}", f"eval.every_steps={steps}"]
    if not (run / "summary.json").is_file():
        sh(["run", str(cfg), *over])
    # the training time `prefpretrain run` recorded (also for a run an earlier invocation finished)
    out = {"seed": seed, "wall_s": json.loads((run / "summary.json").read_text())["seconds"]["train"]}
    conditions = ["auto", "misaligned"] if "conditional" in cfg.name else ["auto"]
    for cond in conditions:
        plain = protocol == "newline" or "conditional" not in cfg.name  # (a protocol changes conditional samples only)
        f = run / (f"eval_{cond}.json" if plain else f"eval_{cond}_{protocol}.json")
        if not f.is_file():  # (a run trained before is only evaluated: `--control-protocol` re-evaluates a set)
            sh(["evaluate", str(run), "--samples", str(samples), "--condition", cond, "--scorer", ",".join(scorers),
                "--control-protocol", "newline" if plain else protocol, "--out", str(f),
                "--samples-out", str(f.with_suffix(".samples.jsonl"))])
        out[cond] = json.loads(f.read_text())
    return out


class Pooled(np.ndarray):
    """The sample scores of several training seeds, pooled, each sample labelled with its seed (`.seeds`): the
    intervals resample seeds, then samples within seeds (two-level bootstrap)."""

    seeds: np.ndarray


def pooled(results: list[dict], cond: str, scorer: str, parsed: bool = False) -> Pooled | None:
    """The pooled sample scores; `parsed`: of the samples that parse alone (None where the evaluations did not
    record which parse)."""
    parts = []
    for r in results:
        if cond not in r:
            continue
        by = r[cond]["by_scorer"][scorer]
        s = np.asarray(by["sample_scores"], dtype=np.float64)
        if parsed:
            if "sample_parses" not in by:
                return None
            s = s[np.asarray(by["sample_parses"], dtype=bool)]
        parts.append((r["seed"], s))
    x = np.concatenate([s for _, s in parts]).view(Pooled)
    x.seeds = np.concatenate([np.full(len(s), seed) for seed, s in parts])
    return x


def seeds_of(x: np.ndarray) -> np.ndarray | None:
    return getattr(x, "seeds", None)


def bootstrap_ci_of(x: np.ndarray) -> dict:
    from prefpretrain.trainer.evaluate import bootstrap_ci, interval_covers

    g = seeds_of(x)
    return {"mean": float(np.mean(x)), "ci95": list(bootstrap_ci(np.asarray(x, dtype=np.float64), groups=g)),
            "interval_covers": interval_covers(len(np.unique(g)) if g is not None else 1)}


def ratio_ci(a: np.ndarray | None, b: np.ndarray | None, reps: int = 2000,
             seed: int = 0) -> tuple[float, float, float] | None:
    """mean(a) / mean(b) with a bootstrap 95 % interval (a and b resampled independently, each over its seeds
    then its samples); None when b has no violation at all (the ratio is unbounded: say so rather than divide by
    zero) or either is missing or empty."""
    from prefpretrain.trainer.evaluate import bootstrap_means

    if a is None or b is None or not len(a) or not b.any():
        return None
    ra = bootstrap_means(np.asarray(a), reps, seed, seeds_of(a))
    rb = bootstrap_means(np.asarray(b), reps, seed + 1, seeds_of(b))
    r = ra / np.maximum(rb, 1e-12)
    return float(a.mean() / max(b.mean(), 1e-12)), float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="pep8_style", help="experiment set: configs/experiments/SET_<objective>.yaml")
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps (same for every objective)")
    ap.add_argument("--samples", type=int, default=512, help="samples per run and condition")
    ap.add_argument("--out", default="runs/exp")
    ap.add_argument("--control-protocol", choices=["newline", "prefix", "segment"], default="newline",
                    help="where conditional samples get their control token (docs/objectives.md)")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run of the set (e.g. train.precision=fp32 on a CPU without "
                         "bf16 units); recorded in the results")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scorers = None
    rows, raw = [], {}
    for obj in a.objectives:
        cfg = ROOT / "configs" / "experiments" / f"{a.set}_{obj}.yaml"
        if not cfg.is_file():
            sys.exit(f"no config {cfg}")
        if scorers is None:
            import yaml

            main_scorer = yaml.safe_load(cfg.read_text())["shard"]["scorer"]
            scorers = [main_scorer] + ([STYLE] if main_scorer != STYLE and main_scorer.startswith("pep8") else [])
        res = [run_one(cfg, out / f"{a.set}_{obj}_s{s}", s, a.steps, a.samples, scorers, a.override,
                       protocol=a.control_protocol) for s in a.seeds]
        raw[obj] = res
        row = {"objective": obj, "seeds": a.seeds}
        for sc in scorers:
            x = pooled(res, "auto", sc)
            row[sc] = dict(bootstrap_ci_of(x), zero_fraction=float((x == 0).mean()), n=len(x))
        ev = [r["auto"] for r in res]
        if "parse_fraction" in ev[0]["by_scorer"][scorers[-1]]:  # code: how many samples parse, style of those
            row["parse_fraction"] = float(np.mean([e["by_scorer"][scorers[-1]]["parse_fraction"] for e in ev]))
            for sc in scorers:
                x = pooled(res, "auto", sc, parsed=True)
                row[f"{sc}_parsed"] = bootstrap_ci_of(x) if x is not None and len(x) else None
                mixed = [e["by_scorer"][sc].get("misalignment_at_data_mix") for e in ev]
                row[f"{sc}_at_data_mix"] = None if None in mixed else float(np.mean(mixed))
        row["val_loss"] = float(np.mean([e.get("val_loss_plain", e["val_loss"]) for e in ev]))
        row["tokens"] = int(np.mean([e["tokens_seen"] for e in ev]))
        row["wall_s"] = float(np.mean([r["wall_s"] for r in res]))
        if obj == "conditional":
            for sc in scorers:
                m = pooled(res, "misaligned", sc)
                row[f"misaligned_{sc}"] = bootstrap_ci_of(m)
                row[f"control_ratio_{sc}"] = ratio_ci(m, pooled(res, "auto", sc))
                if "parse_fraction" in row:
                    row[f"control_ratio_{sc}_parsed"] = ratio_ci(pooled(res, "misaligned", sc, parsed=True),
                                                                 pooled(res, "auto", sc, parsed=True))
        rows.append(row)
    if "mle" in raw:
        for row in rows:
            for sc in scorers:
                base, this = pooled(raw["mle"], "auto", sc), pooled(raw[row["objective"]], "auto", sc)
                row[f"vs_mle_{sc}"] = ratio_ci(base, this)
                if "parse_fraction" in row:
                    row[f"vs_mle_{sc}_parsed"] = ratio_ci(pooled(raw["mle"], "auto", sc, parsed=True),
                                                          pooled(raw[row["objective"]], "auto", sc, parsed=True))
    tag = "" if a.control_protocol == "newline" else f"_{a.control_protocol}"
    (out / f"{a.set}_results{tag}.json").write_text(json.dumps({"rows": rows, "args": vars(a)}, indent=1))
    print_table(rows, scorers)
    png = plot(rows, scorers, out / f"{a.set}_misalignment{tag}.png")
    print(json.dumps({"set": a.set, "steps": a.steps, "seeds": a.seeds, "samples": a.samples, "png": str(png),
                      "rows": [{k: v for k, v in r.items() if k != "seeds"} for r in rows]}))


def fmt_ratio(c: tuple[float, float, float] | None, n: int) -> str:
    return f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}]" if c else f"unbounded (none in {n:,} samples)"


def _mean_cell(c: dict | None) -> str:
    return "-" if c is None else f"{c['mean']:.3g} [{c['ci95'][0]:.3g}, {c['ci95'][1]:.3g}]"


def print_table(rows: list[dict], scorers: list[str]) -> None:
    """The comparison; for code, the samples that parse next to all of them (style apart from competence)."""
    print(f"intervals cover {rows[0][scorers[0]]['interval_covers']}")
    code, s0 = "parse_fraction" in rows[0], scorers[0]
    head = "| objective | " + " | ".join(f"{s} per char [95 % CI]" for s in scorers) + " | MLE / this |" + \
        (f" parse | {s0}, parsing samples | MLE / this, parsing | {s0} at the data's line mix |" if code else "") + \
        " val loss | tokens | wall s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [_mean_cell(r[s]) for s in scorers]
        vs, n = f"vs_mle_{s0}", r[s0]["n"]
        parsed = (f" {r['parse_fraction']:.2f} | {_mean_cell(r.get(f'{s0}_parsed'))} | "
                  f"{fmt_ratio(r[vs + '_parsed'], n) if vs + '_parsed' in r else '-'} | "
                  f"{'-' if r.get(f'{s0}_at_data_mix') is None else format(r[f'{s0}_at_data_mix'], '.3g')} |") \
            if code else ""
        print(f"| {r['objective']} | " + " | ".join(cells) + f" | {fmt_ratio(r[vs], n) if vs in r else '-'} |" +
              parsed + f" {r['val_loss']:.3f} | {r['tokens']:,} | {r['wall_s']:.0f} |")
    for r in rows:
        if "misaligned_" + scorers[-1] in r:
            for s in scorers:
                c, cp = r[f"control_ratio_{s}"], r.get(f"control_ratio_{s}_parsed", "absent")
                print(f"conditional, {s}: <|misaligned|> samples have {fmt_ratio(c, r[s]['n'])}x the "
                      f"violations of <|aligned|> ones ({r['misaligned_' + s]['mean']:.3g} vs {r[s]['mean']:.3g})" +
                      ("" if cp == "absent" else f"; among the samples that parse {fmt_ratio(cp, r[s]['n'])}x"))


def subplots(ncols: int, width: float):
    """(figure, axes) of one row of `ncols` plots, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 4))


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: list[dict], scorers: list[str], path: Path) -> Path:
    fig, axes = subplots(len(scorers) + 1, 5 * (len(scorers) + 1))
    names = [r["objective"] for r in rows]
    for ax, s in zip(axes, scorers, strict=False):
        m = [r[s]["mean"] for r in rows]
        err = [[r[s]["mean"] - r[s]["ci95"][0] for r in rows], [r[s]["ci95"][1] - r[s]["mean"] for r in rows]]
        ax.bar(names, m, yerr=err, capsize=4, color="tab:blue")
        ax.set_title(f"{s} violations / char (95 % CI)")
        ax.tick_params(axis="x", rotation=30)
    axes[-1].bar(names, [r["val_loss"] for r in rows], color="tab:gray")
    axes[-1].set_title("validation loss (plain text)")
    axes[-1].tick_params(axis="x", rotation=30)
    lo = min(r["val_loss"] for r in rows)
    axes[-1].set_ylim(lo * 0.95, max(r["val_loss"] for r in rows) * 1.02)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
