"""The command line: one sub-parser per command. `shard`'s options come from ShardSettings' fields."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Literal, get_args, get_origin

from prefpretrain.config import config_help
from prefpretrain.data_shards.options import ShardSettings
from prefpretrain.typed import field_docs_of

DESCRIPTION = ("`prefpretrain <command>`: shard, rescore, train, launch, run, evaluate, export, generate, tensorboard, "
               "report.")
CONFIG_EPILOG = "config keys (override any as key.sub=value):\n"
FMT = argparse.RawDescriptionHelpFormatter


def _mapping(text: str) -> dict:
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not YAML: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping, got {text!r}")
    return v


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 engine.zero_stage=3")


def _add_settings(p: argparse.ArgumentParser, cls: type) -> None:
    """A flag per field of dataclass `cls`: --field-name, typed, with the field's default and comment."""
    hints, docs = typing.get_type_hints(cls), dict((k, c) for k, _, _, c in field_docs_of(cls))
    for f in dataclasses.fields(cls):
        tp, kw = hints[f.name], {"help": docs.get(f.name, "")}
        if f.default_factory is not dataclasses.MISSING:  # a mapping: given as YAML
            kw.update(type=_mapping, default=f.default_factory())
        elif get_origin(tp) is Literal:
            kw.update(choices=list(get_args(tp)), default=f.default)
        else:
            kw.update(type=next(a for a in (get_args(tp) or (tp,)) if a is not type(None)), default=f.default)
        p.add_argument(f"--{f.name.replace('_', '-')}", **kw)


def _shard(sub) -> None:
    p = sub.add_parser("shard", help="score, tokenize and write WebDataset shards", formatter_class=FMT)
    p.add_argument("--input", nargs="+", required=True, help="files, directories, globs, or @stdlib")
    p.add_argument("--output", required=True, help="output shard directory")
    _add_settings(p, ShardSettings)
    p.add_argument("--seq-len", type=int, default=0,
                   help="report how many packed samples of this length each split gives (packing itself "
                        "happens at train start, per objective; see data.seq_len)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output (default: resume "
                                                             "an interrupted run with the same inputs and options)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the job (with --executor slurm: the "
                                                           "sbatch script); write and start nothing")
    g = p.add_argument_group("SLURM (--executor slurm): an array job, one array task per shard task")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs of one array task (default: --workers, "
                                                                    "else 1)")
    g.add_argument("--gpus-per-task", type=int, default=0, help="GPUs of one array task (#SBATCH --gres=gpu:N), for "
                                                                 "a classifier scorer (device auto takes the first)")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default one)")
    g.add_argument("--time", default=None, help="time limit of one task, e.g. 04:00:00 (default: the partition's)")
    g.add_argument("--account", default=None, help="SLURM account to charge")


def _launch(sub, epilog: str) -> None:
    p = sub.add_parser("launch", help="start ranks with torchrun: this machine, several by hand, or a SLURM job",
                       formatter_class=FMT, epilog=epilog)
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
    _slurm(p.add_argument_group("SLURM (--slurm): write RUN/slurm/job.sbatch, and submit it with --submit"))


def _slurm(g) -> None:
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


def _condition(allow_auto: bool = False):
    """--condition's type: its syntax checked (prefpretrain.conditioning); the columns when the model is open."""
    def parse(text: str) -> str:
        from prefpretrain.conditioning import parse_condition

        try:
            parse_condition(text, allow_auto)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text.strip()

    return parse


def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="validation loss, perplexity, misalignment -> RUN_DIR/eval.json")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per seed for the misalignment score (default eval.samples)")
    p.add_argument("--seeds", type=int, default=1, help="sampling seeds; the samples of all seeds are pooled")
    p.add_argument("--condition", type=_condition(allow_auto=True), default=None,
                   help="conditional models: auto, aligned, misaligned, none, or COLUMN=aligned|misaligned pairs "
                        "separated by commas (default eval.condition)")
    p.add_argument("--scorer", default=None,
                   help="score the samples with this scorer instead of the shards' (e.g. pep8_style); a comma "
                        "list scores the same samples with each (the first gives the headline numbers)")
    p.add_argument("--control-protocol", choices=["newline", "prefix", "segment"], default=None,
                   help="where the control token goes when sampling (default eval.control_protocol; see "
                        "docs/objectives.md)")
    p.add_argument("--out", default=None, help="where to write the results (default RUN_DIR/eval.json)")
    p.add_argument("--samples-out", default=None, metavar="FILE",
                   help="also write every sample (text, seed, scores, whether it parses) to FILE, one JSON per line "
                        "(bench/sample_anatomy.py reads it)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to run the model (default: the run's engine.device; in its precision on a GPU)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="also run lm-evaluation-harness on the run's export (offline): builtin (tasks built from "
                        "the validation split), task names, or directories of task YAMLs, comma-separated; none: "
                        "skip (default eval.lm_eval; docs/evaluation.md)")
    p.add_argument("--lm-eval-limit", type=int, default=None, metavar="N",
                   help="the first N examples of each lm-eval task (0: all; default eval.lm_eval_limit)")
    p.add_argument("--retrieval", default=None, metavar="SOURCES",
                   help="also measure retrieval of text pairs by the model's embeddings: val (adjacent segments of "
                        "the validation split) and/or Python files or directories (docstring -> body), "
                        "comma-separated (docs/evaluation.md)")
    p.add_argument("--retrieval-limit", type=int, default=1000, metavar="N",
                   help="at most N pairs per retrieval source, a seeded sample (0: all)")


def _generate(sub) -> None:
    p = sub.add_parser("generate", help="print samples from an exported model or a run directory")
    p.add_argument("model_dir", help="a `prefpretrain export` directory or a run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--n", type=int, default=1, help="number of samples")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--condition", type=_condition(), default="none",
                   help="conditional models: the control tokens to sample under (placed by --control-protocol): "
                        "aligned, misaligned or none for every attribute, or COLUMN=aligned|misaligned pairs "
                        "separated by commas for the attributes named")
    p.add_argument("--control-protocol", choices=["newline", "prefix", "segment"], default=None,
                   help="newline: at the start and after every newline; prefix: at the start; segment: at the "
                        "start and after every segment the shards' segmenter would cut (default: the run's "
                        "eval.control_protocol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to sample (auto: a GPU if torch sees one, else the CPU)")


def _runs(sub) -> None:
    p = sub.add_parser("export", help="newest checkpoint -> HF directory (safetensors + tokenizer)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--with-heads", action="store_true",
                   help="also write the trained heads (label, value) to OUT_DIR/heads.safetensors, described in "
                        "prefpretrain.json (`--scorer learned:OUT_DIR` scores with the label head)")
    p = sub.add_parser("tensorboard", help="serve the runs' TensorBoard events (127.0.0.1 by default)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=6006)
    p = sub.add_parser("report", help="PNG plots and a markdown table comparing runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="output directory (report.md + PNGs)")


def _rescore(sub) -> None:
    p = sub.add_parser("rescore", help="add or replace a score column of a shard set (tokens untouched)",
                       formatter_class=FMT, description="Score every stored segment of SHARDS again with --scorer, "
                       "into a column beside the tars (select it with objective.attributes: [{column: NAME}]). A "
                       "threshold change needs no rescore.")
    p.add_argument("shards", help="a shard set directory (holds manifest.json)")
    p.add_argument("--scorer", required=True, help="pep8 | pep8_style | pii | classifier | lexical | none | "
                                                   "learned:PATH | module:function (not field: the records' fields "
                                                   "are not kept)")
    p.add_argument("--scorer-params", type=_mapping, default={}, help="the scorer's options as YAML")
    p.add_argument("--name", help="the column's name (default: the scorer's); the stored column's name replaces it")
    p.add_argument("--workers", type=int, default=0, help="scoring processes (0 = one per CPU)")


def build_parser(keys_help: bool = True) -> argparse.ArgumentParser:
    """The whole command line. `keys_help`: list every config key in the help of train/launch/run (building that
    text reads the config classes' source: ~1 s on a slow CPU, which every rank would pay for nothing)."""
    epilog = CONFIG_EPILOG + (config_help() if keys_help else "")
    ap = argparse.ArgumentParser(prog="prefpretrain", description=DESCRIPTION, formatter_class=FMT)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    _shard(sub)
    _rescore(sub)
    _add_config_args(sub.add_parser("train", help="train one rank (alone, or under torchrun / srun)",
                                    formatter_class=FMT, epilog=epilog))
    _launch(sub, epilog)
    _add_config_args(sub.add_parser("run", help="the whole pipeline: shard (if needed) -> launch -> evaluate -> "
                                    "export", formatter_class=FMT, epilog=epilog))
    _evaluate(sub)
    _runs(sub)
    _generate(sub)
    return ap
