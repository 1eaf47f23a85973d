"""The single-process commands: shard, train (one rank), evaluate, export, generate, tensorboard, report."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from prefpretrain.errors import EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_REFUSED, ConfigError
from prefpretrain.preflight import check_gpu_if_asked, validated


def world_from_env() -> int:
    from prefpretrain.host import placement

    return placement(os.environ).world_size


def cmd_shard(a) -> int:
    from prefpretrain.data_shards.build import build_shards, dry_run
    from prefpretrain.data_shards.engine import Cluster, EngineError
    from prefpretrain.data_shards.options import ShardOptions, ShardSettings
    from prefpretrain.data_shards.writer import MANIFEST

    settings = {f.name: getattr(a, f.name) for f in dataclasses.fields(ShardSettings)}
    opt = ShardOptions(inputs=a.input, output=a.output, overwrite=a.overwrite, progress=sys.stderr.isatty(),
                       **settings)
    cluster = Cluster(a.partition, a.time, a.account, a.cpus_per_task, a.gpus_per_task)
    try:
        if a.dry_run:
            print(dry_run(opt, cluster))
            return 0
        m = build_shards(opt, cluster)
    except (ValueError, OSError) as e:  # unknown scorer, nothing readable, an output that cannot be written...
        print(f"prefpretrain shard: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except EngineError as e:  # a task failed or was killed: which, and where its log is
        print(f"prefpretrain shard: {e}", file=sys.stderr)
        return EXIT_FAILED
    if a.seq_len:
        for split in ("train", "val"):
            s = m["splits"][split]
            print(f"{split}: {s['samples']} documents, {s['tokens']} tokens = {s['tokens'] // a.seq_len} "
                  f"MLE samples of {a.seq_len} tokens")
    print(f"wrote {a.output}/{MANIFEST}")
    return 0


def cmd_rescore(a) -> int:
    from prefpretrain.data_shards.rescore import rescore

    try:
        e = rescore(a.shards, a.scorer, a.name, a.scorer_params, a.workers)
    except (ValueError, OSError) as e:  # unknown scorer, a scorer that cannot rescore, a bad name...
        print(f"prefpretrain rescore: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    for split, sp in e["splits"].items():
        st = sp["score_stats"]
        print(f"{split}: {st['segments']} segments scored, mean per char {st.get('mean_per_char', 0):.6g}, "
              f"zero fraction {st.get('zero_fraction', 0):.3f}")
    print(f"wrote column {e['column']!r} ({e['scorer']['name']}) in {e['seconds']} s: {a.shards}/manifest.json")
    return 0


def train_hooks(cfg) -> list:
    """The extensions of this training run (the trainer knows them only as TrainHooks)."""
    if cfg.continual.from_:
        from prefpretrain.continual.update import ContinualUpdate

        return [ContinualUpdate(cfg)]
    return []


def cmd_train(a) -> int:
    cfg = validated(a.config, a.overrides, world_from_env())
    from prefpretrain.errors import Preempted, TrainingDiverged
    from prefpretrain.trainer.loop import train

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        res = train(cfg, train_hooks(cfg))
    except TrainingDiverged as e:
        if rank0:
            print(f"prefpretrain train: diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as e:
        if rank0:
            print(f"prefpretrain train: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C
        print("prefpretrain train: interrupted twice: stopped without a checkpoint of this step", file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank0:
        print(json.dumps(res))
    return 0


def cmd_evaluate(a) -> int:
    if a.lm_eval is not None:  # (refused in one line before anything is loaded)
        from prefpretrain.trainer.capability import selection

        selection(a.lm_eval)
    from prefpretrain.trainer.evaluate import evaluate_run
    from prefpretrain.trainer.retrieval import parse_sources

    if a.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {a.seeds}")
    if a.lm_eval_limit is not None and a.lm_eval_limit < 0:
        raise ConfigError(f"--lm-eval-limit: must be >= 0 (0 = all), got {a.lm_eval_limit}")
    if a.retrieval_limit < 0:
        raise ConfigError(f"--retrieval-limit: must be >= 0 (0 = all), got {a.retrieval_limit}")
    retrieval = parse_sources(a.retrieval)
    scorers = [x for x in (a.scorer or "").split(",") if x] or None
    if scorers:
        from prefpretrain.data_shards.scorers import get_scorer

        for name in scorers:
            try:
                get_scorer(name)
            except ValueError as e:
                raise ConfigError(f"--scorer: {e}") from None
    check_gpu_if_asked(a.device)
    res = evaluate_run(a.run_dir, a.samples, a.condition, a.seeds, scorers, a.out, a.device, a.control_protocol,
                       a.samples_out, a.lm_eval, a.lm_eval_limit, retrieval, a.retrieval_limit)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))
    return 0


def cmd_export(a) -> int:
    from prefpretrain.trainer.export import export_run

    print(export_run(a.run_dir, a.out_dir, a.with_heads))
    return 0


def cmd_generate(a) -> int:
    from prefpretrain.trainer.generate import generate_cli

    check_gpu_if_asked(a.device)
    for i, text in enumerate(generate_cli(a.model_dir, a.prompt, a.n, a.max_new_tokens, a.temperature, a.top_p,
                                          a.condition, a.seed, a.device, a.control_protocol)):
        print(f"----- sample {i} -----\n{text}")
    return 0


def cmd_tensorboard(a) -> int:
    from prefpretrain.launcher.tensorboard import serve

    return serve(a.run_dirs, a.host, a.port)


def cmd_report(a) -> int:
    from prefpretrain.report import build_report

    print(build_report(a.run_dirs, a.out))
    return 0
