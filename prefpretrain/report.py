"""`prefpretrain report RUN_DIR... --out DIR`: PNG plots and a markdown table comparing runs.

Reads what runs already write (metrics.jsonl, eval.json, run_info.json, config.yaml, forgetting.json if
any); draws misalignment against capability (one point per run), loss curves, misalignment vs tokens,
objective comparison bars and forgetting; tabulates capability (lm-eval tasks, `evaluate --lm-eval`) next to
misalignment.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from prefpretrain.rundir import CONFIG, EVAL, FORGETTING, METRICS, RUN_INFO, RunDir


def load_run(run: Path) -> dict:
    rd = RunDir(run)
    if not (rd / METRICS).is_file():
        raise FileNotFoundError(f"{run}: no {METRICS} (not a run directory?)")
    recs = [json.loads(x) for x in (rd / METRICS).read_text().splitlines() if x.strip()]
    cfg = yaml.safe_load((rd / CONFIG).read_text()) if (rd / CONFIG).is_file() else {}  # as written, unchecked
    info, ev, fg = rd.read_json(RUN_INFO) or {}, rd.read_json(EVAL) or {}, rd.read_json(FORGETTING)
    tokens_per_step = cfg.get("train", {}).get("global_batch_size", 0) * cfg.get("data", {}).get("seq_len", 0)
    train = [r for r in recs if r["kind"] == "train"]
    return {
        "name": run.name, "path": str(run), "objective": cfg.get("train", {}).get("objective", "?"),
        "train": train, "val": [r for r in recs if r["kind"] == "eval"],
        "evaluations": [r for r in recs if r["kind"] == "evaluate"], "eval": ev, "forgetting": fg,
        "tokens_per_step": tokens_per_step, "params": info.get("n_params"),
        "seconds": (train[-1]["time"] - train[0]["time"]) if len(train) > 1 else None,
    }


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line_axes(ax, title: str, ylabel: str) -> None:
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_losses(runs: list[dict], out: Path) -> Path:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        tps = r["tokens_per_step"] or 1
        line, = ax.plot([m["step"] * tps for m in r["train"]], [m["loss"] for m in r["train"]],
                        label=f"{r['name']} train", alpha=0.8)
        if r["val"]:
            ax.plot([m["step"] * tps for m in r["val"]], [m["eval/val_loss"] for m in r["val"]], "o--",
                    color=line.get_color(), label=f"{r['name']} val")
    _line_axes(ax, "Loss curves", "loss (nats/token)")
    return _save(plt, fig, out / "loss_curves.png")


def plot_misalignment(runs: list[dict], out: Path) -> Path | None:
    pts = [(r["name"], e["tokens_seen"], e["eval/misalignment"]) for r in runs for e in r["evaluations"]
           if e.get("eval/misalignment") is not None and e.get("tokens_seen") is not None]
    if not pts:
        return None
    plt = _fig()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in dict.fromkeys(n for n, _, _ in pts):
        xs = sorted((t, m) for n, t, m in pts if n == name)
        line, = ax.plot([t for t, _ in xs], [m for _, m in xs], "o-", label=name)
        run = next(r for r in runs if r["name"] == name)  # code: the samples that parse, judged alone (dashed)
        ps = sorted((e["tokens_seen"], e["eval/misalignment_parsed"]) for e in run["evaluations"]
                    if e.get("eval/misalignment_parsed") is not None and e.get("tokens_seen") is not None)
        if ps:
            ax.plot([t for t, _ in ps], [m for _, m in ps], "x--", color=line.get_color(),
                    label=f"{name} (samples that parse)")
    _line_axes(ax, "Misalignment of samples vs tokens", "misalignment (score per char, lower is better)")
    return _save(plt, fig, out / "misalignment.png")


def plot_objectives(runs: list[dict], out: Path) -> Path | None:
    have = [r for r in runs if r["eval"]]
    if not have:
        return None
    plt = _fig()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    names = [f"{r['name']}\n({r['objective']})" for r in have]
    axes[0].bar(names, [r["eval"].get("misalignment", 0) or 0 for r in have], color="tab:red")
    axes[0].set_title("misalignment (lower is better)")
    axes[1].bar(names, [r["eval"].get("val_loss", 0) for r in have], color="tab:blue")
    axes[1].set_title("validation loss")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, out / "objectives.png")


OBJECTIVE_COLOURS = {"mle": "tab:gray", "filter": "tab:blue", "conditional": "tab:green",
                     "unlikelihood": "tab:red", "rwr": "tab:purple", "awr": "tab:orange"}


def tradeoff_points(runs: list[dict]) -> tuple[str, list[tuple]]:
    """(the x axis's label, [(run, objective, capability, misalignment, its 95 % interval low, high)]) of the runs
    with a misalignment score. Capability: lm-evaluation-harness's `capability` (mean task accuracy, higher is
    better) when every such run has it, else validation loss (lower is better; said on the axis)."""
    have = [r for r in runs if r["eval"].get("misalignment") is not None]
    lm = bool(have) and all(r["eval"].get("capability") is not None for r in have)
    pts = []
    for r in have:
        ev = r["eval"]
        lo, hi = ev.get("misalignment_ci95") or (ev["misalignment"], ev["misalignment"])
        pts.append((r["name"], r["objective"], ev["capability"] if lm else ev.get("val_loss"), ev["misalignment"],
                    lo, hi))
    label = ("capability: lm-eval mean accuracy (higher is better)" if lm
             else "validation loss (lower is better; no lm-eval results)")
    return label, pts


def plot_tradeoff(runs: list[dict], out: Path) -> Path | None:
    """Misalignment against capability, one point per run, objective as colour (PHF's figure: what alignment
    cost in capability); bars: the misalignment's 95 % interval."""
    label, pts = tradeoff_points(runs)
    if not pts:
        return None
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seen = set()
    for name, obj, x, y, lo, hi in pts:
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=OBJECTIVE_COLOURS.get(obj, "black"),
                    capsize=3, label=None if obj in seen else obj)
        seen.add(obj)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("misalignment (lower is better)")
    ax.set_title("Alignment vs capability")
    ax.legend(title="objective", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "tradeoff.png")


def plot_forgetting(runs: list[dict], out: Path) -> Path | None:
    """From RUN/forgetting.json: {"old": {NAME: {"before": loss, "after": loss, ...}, ...}, "new": {...}, ...}
    (written by a continual update, prefpretrain/continual/forgetting.py)."""
    have = [r for r in runs if r["forgetting"]]
    if not have:
        return None
    plt = _fig()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in have:
        sets = r["forgetting"].get("old", {})
        ax.bar([f"{r['name']}:{k}" for k in sets], [v["after"] - v["before"] for v in sets.values()])
    ax.set_ylabel("loss increase on old validation sets")
    ax.set_title("Forgetting")
    ax.tick_params(axis="x", labelsize=7)
    return _save(plt, fig, out / "forgetting.png")


def _forgetting_table(runs: list[dict]) -> list[str]:
    """Continual updates (forgetting.json): each earlier validation set before -> after, and the new one."""
    have = [r for r in runs if r["forgetting"]]
    if not have:
        return []
    lines = ["", "| run | replay | validation set | before | after | change |", "|---|---|---|---|---|---|"]
    for r in have:
        fg = r["forgetting"]
        for part in ("old", "new"):
            for name, v in fg.get(part, {}).items():
                lines.append(f"| {r['name']} | {_fmt(fg.get('replay_fraction'), '.0%')} | {name} ({part}) "
                             f"| {v['before']:.4f} | {v['after']:.4f} | {v['after'] - v['before']:+.4f} |")
    return lines


def _capability_table(runs: list[dict]) -> list[str]:
    """lm-evaluation-harness tasks (eval.json's `lm_eval`): each task's main metric, the one `capability` averages."""
    have = [r for r in runs if r["eval"].get("lm_eval")]
    lines = ["", "| run | lm-eval task | metric | value | stderr | examples |", "|---|---|---|---|---|---|"]
    for r in have:
        for task, m in r["eval"].get("capability_metric", {}).items():
            v = r["eval"]["lm_eval"][task]
            if m is not None:
                lines.append(f"| {r['name']} | {task} | {m} | {v[m]:.4f} | {_fmt(v.get(f'{m}_stderr'), '.4f')} "
                             f"| {_fmt(v.get('samples'), 'd')} |")
    return lines if have else []


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _number(v):
    """None for a missing value or NaN (no sample parsed)."""
    return None if v is None or v != v else v


def build_report(run_dirs: list[str], out_dir: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(Path(r)) for r in run_dirs]
    plots = [p for p in (plot_tradeoff(runs, out), plot_losses(runs, out), plot_misalignment(runs, out),
                         plot_objectives(runs, out), plot_forgetting(runs, out)) if p is not None]
    lines = ["# prefpretrain report", "",
             "| run | objective | params | steps | tokens | val loss | perplexity | misalignment | clean samples "
             "| samples that parse | their misalignment | capability | train time (s) |", "|---" * 13 + "|"]
    for r in runs:
        ev, last = r["eval"], (r["train"][-1] if r["train"] else {})
        steps = last.get("step")
        params = r["params"] / 1e6 if r["params"] else None
        lines.append(
            f"| {r['name']} | {r['objective']} | {_fmt(params, '.2f')} M | {_fmt(steps, 'd')} "
            f"| {_fmt(steps and steps * r['tokens_per_step'], ',d')} | {_fmt(ev.get('val_loss'), '.4f')} "
            f"| {_fmt(ev.get('perplexity'), '.2f')} | {_fmt(ev.get('misalignment'), '.5f')} "
            f"| {_fmt(ev.get('misalignment_zero_fraction'), '.0%')} | {_fmt(ev.get('parse_fraction'), '.0%')} "
            f"| {_fmt(_number(ev.get('misalignment_parsed')), '.5f')} | {_fmt(ev.get('capability'), '.4f')} "
            f"| {_fmt(r['seconds'], '.0f')} |")
    lines += _capability_table(runs) + _forgetting_table(runs)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md
