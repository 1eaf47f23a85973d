"""`prefpretrain run`: the whole pipeline on one machine: shard (if needed) -> launch -> evaluate -> export."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from prefpretrain.config import Config, load_config
from prefpretrain.data_shards.writer import MANIFEST
from prefpretrain.errors import ConfigError
from prefpretrain.preflight import check_engine, check_paths
from prefpretrain.rundir import CONFIG, EVAL, EXPORT, METRICS, REPORT, SUMMARY, TENSORBOARD

log = logging.getLogger("prefpretrain")


def ensure_shards(cfg: Config) -> None:
    """Build data.shards[0] from the config's `shard` section if it has no manifest yet."""
    from prefpretrain.data_shards import storage
    from prefpretrain.data_shards.build import build_shards
    from prefpretrain.data_shards.options import ShardOptions, ShardSettings

    if not cfg.data.shards:
        raise ConfigError("data.shards: no shard set given")
    target = cfg.data.reference
    exists = (storage.filesystem(target).exists(f"{target.rstrip('/')}/{MANIFEST}") if storage.is_url(target)
              else (Path(target) / MANIFEST).is_file())
    if exists:
        log.info("shards: using %s", target)
        return
    s = cfg.shard
    if not s.inputs:
        raise ConfigError(f"shard.inputs: {target} has no {MANIFEST} and the config says nothing to build it from")
    settings = {f.name: getattr(s, f.name) for f in dataclasses.fields(ShardSettings)}
    try:
        build_shards(ShardOptions(inputs=s.inputs, output=str(target), progress=sys.stderr.isatty(), **settings))
    except (ValueError, OSError) as e:  # an input, output or store that cannot be used: one line
        raise ConfigError(f"shard: {e}") from None


def cmd_run(a) -> int:
    t0 = time.time()
    cfg = load_config(a.config, a.overrides)
    check_engine(cfg, cfg.launch.nproc_per_node)
    from prefpretrain.trainer.capability import selection

    selection(cfg.eval.lm_eval, "eval.lm_eval")  # (lm-eval tasks that cannot run here: refused before training)
    ensure_shards(cfg)
    check_paths(cfg)  # every shard set (also at a URL) has a readable manifest
    t_shard = time.time() - t0
    from prefpretrain.launcher.local import launch_local

    rc = launch_local(a.config, a.overrides, cfg.launch.nproc_per_node, 0, cfg.run.output_dir)
    if rc != 0:
        log.error("training failed with exit code %d", rc)
        return rc
    t_train = time.time() - t0 - t_shard
    from prefpretrain.report import build_report
    from prefpretrain.trainer.evaluate import evaluate_run
    from prefpretrain.trainer.export import export_matches, export_run

    run = Path(cfg.run.output_dir)
    ev = evaluate_run(run)
    out = run / EXPORT  # (evaluate's lm-eval tasks exported the checkpoint already)
    if not export_matches(out, Path(ev["checkpoint"])):
        export_run(run, out)
    report = build_report([str(run)], str(run / REPORT))
    t_all = time.time() - t0
    summary = {
        "run_dir": str(run), "config": str(run / CONFIG), "checkpoint": ev["checkpoint"],
        "tensorboard": str(run / TENSORBOARD), "metrics": str(run / METRICS),
        "eval": str(run / EVAL), "export": str(out), "report": str(report), "step": ev["step"],
        "tokens_seen": ev["tokens_seen"],
        "val_loss": round(ev["val_loss"], 4), "perplexity": round(ev["perplexity"], 2),
        "misalignment": ev.get("misalignment"), "condition": ev.get("condition"),
        "parse_fraction": ev.get("parse_fraction"),
        "misalignment_parsed": None if ev.get("misalignment_parsed") != ev.get("misalignment_parsed") else
        ev.get("misalignment_parsed"),  # (NaN where no sample parses: JSON has no NaN)
        "misalignment_at_data_mix": ev.get("misalignment_at_data_mix"), "capability": ev.get("capability"),
        "seconds": {"shard": round(t_shard, 1), "train": round(t_train, 1), "total": round(t_all, 1)},
    }
    (run / SUMMARY).write_text(json.dumps(summary, indent=1))
    _print_summary(summary, ev)
    return 0


def _print_summary(s: dict, ev: dict) -> None:
    lines = [
        "", "=" * 72, (f"prefpretrain run finished in {s['seconds']['total']:.0f}s "
        f"(shard {s['seconds']['shard']:.0f}s, train {s['seconds']['train']:.0f}s)"),
        f"  steps {s['step']}, tokens {s['tokens_seen']:,}",
        f"  validation loss {s['val_loss']:.4f}, perplexity {s['perplexity']:.2f}",
    ]
    if s.get("misalignment") is not None:
        lines.append(f"  misalignment ({ev['scorer']} score per char of {ev['samples']} samples, condition "
                     f"{s['condition']}): {s['misalignment']:.5f}; {ev['misalignment_zero_fraction']:.0%} clean")
        if s.get("parse_fraction") is not None:  # code: the samples that parse, judged alone too
            parsed = s["misalignment_parsed"]
            lines.append(f"  of which {s['parse_fraction']:.0%} parse; their misalignment "
                         f"{'n/a' if parsed is None else f'{parsed:.5f}'}")
        if s.get("misalignment_at_data_mix") is not None:  # code: at the data's mix of line types
            lines.append(f"  at the data's mix of code, comment, docstring and blank lines: "
                         f"{s['misalignment_at_data_mix']:.5f}")
    if s.get("capability") is not None:  # lm-eval tasks (eval.lm_eval)
        lines.append(f"  capability (mean accuracy over {', '.join(ev['lm_eval'])}): {s['capability']:.4f}")
    lines += [
        f"  run dir      {s['run_dir']}", f"  checkpoint   {s['checkpoint']}", (f"  tensorboard  {s['tensorboard']}"
        f"   (prefpretrain tensorboard {s['run_dir']})"), f"  metrics      {s['metrics']}",
        f"  eval         {s['eval']}", f"  HF export    {s['export']}", f"  report       {s['report']}",
        (f"  try it       prefpretrain generate {s['export']} --condition "
        f"{'aligned' if s.get('condition') == 'aligned' else 'none'} --n 2"),
    ]
    from prefpretrain.continual.forgetting import summary_lines

    lines += summary_lines(Path(s["run_dir"])) + ["=" * 72]  # a continual update: forgetting before -> after
    print("\n".join(lines))
