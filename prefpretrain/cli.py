"""`prefpretrain <command>`: shard, train, launch, evaluate, export, generate, run."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from prefpretrain.config import Config, ConfigError, InputError, check_device, check_paths, config_help, load_config
from prefpretrain.logs import setup_logging

log = logging.getLogger("prefpretrain")

CONFIG_EPILOG = "config keys (override any as key.sub=value):\n"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 engine.zero_stage=3")


def _mapping(text: str) -> dict:
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not YAML: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="prefpretrain", description=__doc__, formatter_class=fmt)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shard", help="score, tokenize and write WebDataset shards", formatter_class=fmt)
    p.add_argument("--input", nargs="+", required=True, help="files, directories, globs, or @stdlib")
    p.add_argument("--output", required=True, help="output shard directory")
    p.add_argument("--scorer", default="pep8",
                   help="pep8 | pep8_style | pii | classifier | lexical | field | none | module:function")
    p.add_argument("--scorer-params", default="{}", type=_mapping,
                   help="the scorer's options as a YAML/JSON mapping, e.g. '{model_dir: clf/, label: toxic}'")
    p.add_argument("--segmenter", default="auto", choices=["auto", "line", "sentence", "document"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scoring processes")
    p.add_argument("--tokenizer", default="train", help="'train' (byte-level BPE on the input) or a directory")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="bound on one tar shard")
    p.add_argument("--seq-len", type=int, default=0,
                   help="report how many packed samples of this length each split gives (packing itself "
                        "happens at train start, per objective; see data.seq_len)")
    p.add_argument("--max-files", type=int, default=0, help="keep only the first N input files")
    p.add_argument("--text-field", default="text", help="JSONL field with the text")
    p.add_argument("--score-field", default=None, help="JSONL field with a score (scorer 'field')")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output (default: resume "
                                                             "an interrupted run with the same inputs and options)")

    p = sub.add_parser("train", help="train one rank (alone, or under torchrun / srun)", formatter_class=fmt,
                       epilog=CONFIG_EPILOG + config_help())
    _add_config_args(p)

    p = sub.add_parser("launch", help="start ranks with torchrun: this machine, several by hand, or a SLURM job",
                       formatter_class=fmt, epilog=CONFIG_EPILOG + config_help())
    _add_config_args(p)
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per machine (default launch.nproc_per_node; with --slurm and GPUs: --gpus-per-node)")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts")
    p.add_argument("--nnodes", type=int, default=None, help="machines in the job (run this command on each)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this machine's index, 0..nnodes-1 (default 0, or SLURM_NODEID inside a SLURM job step)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT every node can reach (the first node's address); needed with --nnodes > 1")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command line of every node (with --slurm: the sbatch script) and start nothing")
    p.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun",
                   help="process launcher: torchrun (default), or `accelerate launch` with a generated config "
                        "(GPU only: on CPU Accelerate starts one process per machine)")
    g = p.add_argument_group("SLURM (--slurm): write RUN/slurm/job.sbatch, and submit it with --submit")
    g.add_argument("--slurm", action="store_true", help="make a SLURM batch job: one srun task (a torchrun) per node")
    g.add_argument("--nodes", type=int, default=None, help="nodes of the job (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one rank each (0: --nproc-per-node CPU ranks per node; default 0)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per node's task (default: one per rank without GPUs, --cpus-per-gpu x GPUs with them)")
    g.add_argument("--cpus-per-gpu", type=int, default=None,
                   help="with GPUs: CPUs per GPU, not with --cpus-per-task (default: the partition's DefCpuPerGPU, "
                        "else the fewest CPUs per GPU of its nodes; 8 when no SLURM controller answers)")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default one)")
    g.add_argument("--time", default=None, help="time limit, e.g. 04:00:00 (default: the partition's)")
    g.add_argument("--account", default=None, help="SLURM account to charge")
    g.add_argument("--signal-grace", type=int, default=None,
                   help="seconds before the time limit at which SLURM sends SIGUSR1 (checkpoint, requeue; default 180)")
    g.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    g.add_argument("--wait", action="store_true",
                   help="with --submit: follow the job (through requeues) to its end and exit with its status")

    p = sub.add_parser("run", help="the whole pipeline: shard (if needed) -> launch -> evaluate -> export",
                       formatter_class=fmt, epilog=CONFIG_EPILOG + config_help())
    _add_config_args(p)

    p = sub.add_parser("evaluate", help="validation loss, perplexity, misalignment -> RUN_DIR/eval.json")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per seed for the misalignment score (default eval.samples)")
    p.add_argument("--seeds", type=int, default=1, help="sampling seeds; the samples of all seeds are pooled")
    p.add_argument("--condition", choices=["auto", "aligned", "misaligned", "none"], default=None,
                   help="control token for conditional models (default eval.condition)")
    p.add_argument("--scorer", default=None,
                   help="score the samples with this scorer instead of the shards' (e.g. pep8_style); a comma "
                        "list scores the same samples with each (the first gives the headline numbers)")
    p.add_argument("--out", default=None, help="where to write the results (default RUN_DIR/eval.json)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to run the model (default: the run's engine.device; in its precision on a GPU)")

    p = sub.add_parser("export", help="newest checkpoint -> HF directory (safetensors + tokenizer)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")

    p = sub.add_parser("generate", help="print samples from an exported model or a run directory")
    p.add_argument("model_dir", help="a `prefpretrain export` directory or a run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--n", type=int, default=1, help="number of samples")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--condition", choices=["aligned", "misaligned", "none"], default="none",
                   help="conditional models: control token to prefix and re-insert after each newline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to sample (auto: a GPU if torch sees one, else the CPU)")

    p = sub.add_parser("tensorboard", help="serve the runs' TensorBoard events (127.0.0.1 by default)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=6006)

    p = sub.add_parser("report", help="PNG plots and a markdown table comparing runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="output directory (report.md + PNGs)")
    return ap


def world_from_env() -> int:
    from prefpretrain.distributed import placement

    return placement(os.environ).world_size


def check_engine(cfg: Config, world: int) -> None:
    """The DeepSpeed config the options imply, with engine.deepspeed merged (conflicts are one line, here)."""
    from prefpretrain.trainer.engine import ds_config

    cfg.grad_accum_for(world)
    check_device(cfg)
    ds_config(cfg, world)


def validated(config: str, overrides: list[str], world: int, need_paths: bool = True) -> Config:
    cfg = load_config(config, overrides)
    check_engine(cfg, world)
    if need_paths:
        check_paths(cfg)
    return cfg


def cmd_shard(a) -> int:
    from prefpretrain.data_shards.writer import ShardOptions, build_shards

    try:
        m = build_shards(ShardOptions(
            inputs=a.input, output=a.output, scorer=a.scorer, scorer_params=a.scorer_params,
            segmenter=a.segmenter, tokenizer=a.tokenizer, overwrite=a.overwrite,
            vocab_size=a.vocab_size, val_fraction=a.val_fraction, shard_size_mb=a.shard_size_mb,
            workers=a.workers, max_files=a.max_files, text_field=a.text_field, score_field=a.score_field,
            progress=sys.stderr.isatty()))
    except (ValueError, OSError) as e:  # unknown scorer, nothing readable, an output that cannot be written...
        print(f"prefpretrain shard: error: {e}", file=sys.stderr)
        return 2
    if a.seq_len:
        for split in ("train", "val"):
            s = m["splits"][split]
            print(f"{split}: {s['samples']} documents, {s['tokens']} tokens = {s['tokens'] // a.seq_len} "
                  f"MLE samples of {a.seq_len} tokens")
    print(f"wrote {a.output}/manifest.json")
    return 0


def cmd_train(a) -> int:
    cfg = validated(a.config, a.overrides, world_from_env())
    from prefpretrain.trainer.loop import EXIT_DIVERGED, EXIT_PREEMPTED, Preempted, TrainingDiverged, train

    try:
        res = train(cfg)
    except TrainingDiverged as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"prefpretrain train: diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"prefpretrain train: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C
        print("prefpretrain train: interrupted twice: stopped without a checkpoint of this step", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res))
    return 0


SLURM_ONLY = ("nodes", "gpus_per_node", "cpus_per_task", "cpus_per_gpu", "partition", "time", "account",
              "signal_grace", "submit", "wait")


def cmd_launch(a) -> int:
    if a.slurm:
        return cmd_launch_slurm(a)
    import signal

    # in a SLURM job step SIGUSR1 (pre-emption) may come at any time: hold it until launch_local forwards it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    given = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(a, k) not in (None, False)]
    if given:
        raise ConfigError(f"{given[0]}: only with --slurm")
    cfg = load_config(a.config, a.overrides)
    n = cfg.launch.nproc_per_node if a.nproc_per_node is None else a.nproc_per_node
    if n < 1 or a.max_restarts < 0:
        raise ConfigError(f"--nproc-per-node: {n}; at least 1" if n < 1 else
                          f"--max-restarts: {a.max_restarts}; 0 or more")
    a.nnodes = 1 if a.nnodes is None else a.nnodes
    if a.node_rank is None:  # inside a SLURM job step every node runs the same command line
        a.node_rank = int(os.environ.get("SLURM_NODEID", "0")) if a.nnodes > 1 else 0
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        raise ConfigError(f"--node-rank: {a.node_rank} is not within 0..{a.nnodes - 1} (--nnodes {a.nnodes})")
    if a.nnodes > 1 and not a.rdzv_endpoint:
        raise ConfigError("--rdzv-endpoint: HOST:PORT of the first node is needed with --nnodes > 1")
    check_engine(cfg, n * a.nnodes)
    from prefpretrain.launcher.local import launch_local, torchrun_argv

    node = {"nnodes": a.nnodes, "rdzv_endpoint": a.rdzv_endpoint, "rdzv_id": Path(cfg.run.output_dir).name}
    if a.launcher == "accelerate":
        return _launch_accelerate(a, cfg, n)
    if a.dry_run:
        for r in range(a.nnodes):
            print(f"# node {r}:", shlex.join(torchrun_argv(a.config, a.overrides, n, a.max_restarts, node_rank=r,
                                                          **node)))
        return 0
    check_paths(cfg)
    return launch_local(a.config, a.overrides, n, a.max_restarts, cfg.run.output_dir, node_rank=a.node_rank, **node)


def _launch_accelerate(a, cfg: Config, n: int) -> int:
    """`launch --launcher accelerate`: a generated Accelerate config per node, then `accelerate launch`."""
    import torch

    from prefpretrain.distributed import free_port
    from prefpretrain.launcher.accelerate import accelerate_argv, accelerate_config, config_text
    from prefpretrain.launcher.local import launch_local

    endpoint = a.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    conf_dir = Path(cfg.run.output_dir) / "accelerate"
    if a.dry_run:
        for r in range(a.nnodes):
            f = conf_dir / f"node{r}.yaml"
            print(f"# node {r}: {f}\n" + "".join(f"#   {x}\n" for x in config_text(accelerate_config(
                n, a.nnodes, r, endpoint)).splitlines()), end="")
            print(f"# node {r}:", shlex.join(accelerate_argv(str(f), a.config, a.overrides, a.max_restarts)))
        return 0
    cuda = torch.cuda.is_available() if cfg.engine.device == "auto" else cfg.engine.device == "cuda"
    if not cuda:
        raise ConfigError("--launcher: accelerate needs GPUs (on CPU `accelerate launch` starts one process per "
                          "machine and the ranks train apart); use the default torchrun launcher")
    check_paths(cfg)
    conf_dir.mkdir(parents=True, exist_ok=True)
    f = conf_dir / f"node{a.node_rank}.yaml"
    f.write_text(config_text(accelerate_config(n, a.nnodes, a.node_rank, endpoint)))
    return launch_local(a.config, a.overrides, n, a.max_restarts, cfg.run.output_dir,
                        argv=accelerate_argv(str(f), a.config, a.overrides, a.max_restarts))


def cmd_launch_slurm(a) -> int:
    from prefpretrain.launcher import slurm

    for flag, v in (("--node-rank", a.node_rank), ("--rdzv-endpoint", a.rdzv_endpoint), ("--nnodes", a.nnodes)):
        if v is not None:
            raise ConfigError(f"{flag}: not with --slurm (SLURM places the nodes; use --nodes)")
    if a.wait and not a.submit:
        raise ConfigError("--wait: only with --submit")
    if a.dry_run and a.submit:
        raise ConfigError("--submit: not with --dry-run (which submits nothing)")
    cfg = load_config(a.config, a.overrides)
    gpus = a.gpus_per_node or 0
    n = a.nproc_per_node or (gpus if gpus else cfg.launch.nproc_per_node)
    job = slurm.SlurmJob(config=str(Path(a.config).resolve()), overrides=list(a.overrides),
                         run_dir=Path(cfg.run.output_dir).resolve(), workdir=Path.cwd(), nodes=a.nodes or 1,
                         nproc_per_node=n, gpus_per_node=gpus, cpus_per_task=a.cpus_per_task,
                         cpus_per_gpu=a.cpus_per_gpu, partition=a.partition,
                         time=a.time, account=a.account, signal_grace=a.signal_grace or 180,
                         max_restarts=a.max_restarts)
    slurm.check_request(job)
    cfg.grad_accum_for(n * job.nodes)
    from prefpretrain.trainer.engine import ds_config

    ds_config(cfg, n * job.nodes)  # engine.deepspeed conflicts, before anything is written
    if not gpus:  # CPU ranks; GPU nodes are judged by SLURM, not by this (login) machine
        check_device(cfg)
    if not a.dry_run:
        check_paths(cfg)
    if slurm.reachable():
        slurm.check_cluster(job)  # with the partition's CPUs per GPU (slurm.settle_cpus)
    elif a.submit:
        raise ConfigError("--submit: no SLURM controller answers here (`scontrol ping` fails or is not installed)")
    else:
        slurm.settle_cpus(job)
    if a.dry_run:
        print(f"# would be written to {job.script_path}", file=sys.stderr)
        print(slurm.sbatch_script(job), end="")
        return 0
    script = slurm.write_script(job)
    if not a.submit:
        print(f"wrote {script}\nsubmit it with: sbatch {shlex.quote(str(script))}")
        return 0
    slurm.sbatch_test_only(script)
    job_id = slurm.submit(script)
    print(f"submitted job {job_id}: {script}; logs {job.run_dir}/slurm/job-{job_id}*.out", flush=True)
    if not a.wait:
        return 0
    try:
        rc = slurm.wait(job_id)
    except KeyboardInterrupt:
        print(f"stopped following job {job_id}; it keeps running (scancel {job_id} stops it)", file=sys.stderr)
        return 130
    print(f"job {job_id} finished with exit status {rc}")
    return rc


def ensure_shards(cfg: Config) -> None:
    """Build data.shards[0] from the config's `shard` section if it has no manifest yet."""
    from prefpretrain.data_shards.writer import ShardOptions, build_shards

    target = Path(cfg.data.shards[0].path) if cfg.data.shards else None
    if target is None:
        raise ConfigError("data.shards: no shard set given")
    if (target / "manifest.json").is_file():
        log.info("shards: using %s", target)
        return
    s = cfg.shard
    if not s.inputs:
        raise ConfigError(f"shard.inputs: {target} has no manifest.json and the config says nothing to build it from")
    build_shards(ShardOptions(inputs=s.inputs, output=str(target), scorer=s.scorer, scorer_params=s.scorer_params,
                              segmenter=s.segmenter,
                              tokenizer=s.tokenizer, vocab_size=s.vocab_size, val_fraction=s.val_fraction,
                              shard_size_mb=s.shard_size_mb, workers=s.workers, max_files=s.max_files,
                              progress=sys.stderr.isatty()))


def cmd_run(a) -> int:
    t0 = time.time()
    cfg = load_config(a.config, a.overrides)
    check_engine(cfg, cfg.launch.nproc_per_node)
    ensure_shards(cfg)
    for s in cfg.data.shards[1:]:
        if not (Path(s.path) / "manifest.json").is_file():
            raise ConfigError(f"data.shards: no manifest.json in {s.path!r}")
    check_paths(cfg)
    t_shard = time.time() - t0
    from prefpretrain.launcher.local import launch_local

    rc = launch_local(a.config, a.overrides, cfg.launch.nproc_per_node, 0, cfg.run.output_dir)
    if rc != 0:
        log.error("training failed with exit code %d", rc)
        return rc
    t_train = time.time() - t0 - t_shard
    from prefpretrain.trainer.evaluate import evaluate_run
    from prefpretrain.trainer.export import export_run

    run = Path(cfg.run.output_dir)
    ev = evaluate_run(run)
    out = export_run(run, run / "export")
    t_all = time.time() - t0
    summary = {
        "run_dir": str(run), "config": str(run / "config.yaml"), "checkpoint": ev["checkpoint"],
        "tensorboard": str(run / "tensorboard"), "metrics": str(run / "metrics.jsonl"),
        "eval": str(run / "eval.json"), "export": str(out), "step": ev["step"], "tokens_seen": ev["tokens_seen"],
        "val_loss": round(ev["val_loss"], 4), "perplexity": round(ev["perplexity"], 2),
        "misalignment": ev.get("misalignment"), "condition": ev.get("condition"),
        "seconds": {"shard": round(t_shard, 1), "train": round(t_train, 1), "total": round(t_all, 1)},
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
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
    lines += [
        f"  run dir      {s['run_dir']}", f"  checkpoint   {s['checkpoint']}", (f"  tensorboard  {s['tensorboard']}"
        f"   (prefpretrain tensorboard {s['run_dir']})"), f"  metrics      {s['metrics']}",
        f"  eval         {s['eval']}", f"  HF export    {s['export']}",
        (f"  try it       prefpretrain generate {s['export']} --condition "
        f"{'aligned' if s.get('condition') == 'aligned' else 'none'} --n 2"),
    ]
    from prefpretrain.continual.forgetting import summary_lines

    lines += summary_lines(Path(s["run_dir"])) + ["=" * 72]  # a continual update: forgetting before -> after
    print("\n".join(lines))


def _gpu_if_asked(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda asked for, but torch sees no GPU")


def cmd_evaluate(a) -> int:
    from prefpretrain.trainer.evaluate import evaluate_run

    if a.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {a.seeds}")
    scorers = [x for x in (a.scorer or "").split(",") if x] or None
    if scorers:
        from prefpretrain.data_shards.scorers import get_scorer

        for name in scorers:
            try:
                get_scorer(name)
            except ValueError as e:
                raise ConfigError(f"--scorer: {e}") from None
    _gpu_if_asked(a.device)
    res = evaluate_run(a.run_dir, a.samples, a.condition, a.seeds, scorers, a.out, a.device)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))
    return 0


def cmd_export(a) -> int:
    from prefpretrain.trainer.export import export_run

    print(export_run(a.run_dir, a.out_dir))
    return 0


def cmd_generate(a) -> int:
    from prefpretrain.trainer.generate import generate_cli

    _gpu_if_asked(a.device)

    for i, text in enumerate(generate_cli(a.model_dir, a.prompt, a.n, a.max_new_tokens, a.temperature, a.top_p,
                                          a.condition, a.seed, a.device)):
        print(f"----- sample {i} -----\n{text}")
    return 0


def cmd_tensorboard(a) -> int:
    from prefpretrain.launcher.tensorboard import serve

    return serve(a.run_dirs, a.host, a.port)


def cmd_report(a) -> int:
    from prefpretrain.report import build_report

    print(build_report(a.run_dirs, a.out))
    return 0


COMMANDS = {"shard": cmd_shard, "train": cmd_train, "launch": cmd_launch, "run": cmd_run,
            "evaluate": cmd_evaluate, "export": cmd_export, "generate": cmd_generate,
            "tensorboard": cmd_tensorboard, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    # nothing is ever fetched from a hub: models and tokenizers are local directories
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # no file a user hands us is unpickled: every torch.load here and in child processes is weights-only
    # (prefpretrain.trainer.safe_load registers the few DeepSpeed types its checkpoints name)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # (torch refuses every load when both are set)
    ap = build_parser()
    a, extra = ap.parse_known_args(argv)
    # overrides may follow options (`launch CONFIG --nproc-per-node 2 train.max_steps=5`)
    if hasattr(a, "overrides"):
        late = [x for x in extra if "=" in x and not x.startswith("-")]
        a.overrides += late
        extra = [x for x in extra if x not in late]
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(verbose=a.verbose)
    try:
        return COMMANDS[a.command](a)
    except ConfigError as e:
        print(f"prefpretrain: config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        msg = str(e).strip()  # (a DataLoader worker's error carries its traceback: its last line says it)
        print(f"prefpretrain: error: {msg.splitlines()[-1] if 'Traceback' in msg else msg}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"prefpretrain: error: {e}", file=sys.stderr)
        return 2
