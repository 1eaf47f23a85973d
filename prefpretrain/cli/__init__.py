"""`prefpretrain <command>`: the entry point. Parsing is parser.py's; each command is a `cmd_*` function of
commands.py, launch.py or run.py; every refusal is one line on stderr and exit code 2."""
from __future__ import annotations

import logging
import os
import sys

from prefpretrain.errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, InputError, TasksFailed
from prefpretrain.logs import setup_logging

log = logging.getLogger("prefpretrain")


def _commands() -> dict:
    from prefpretrain.cli import commands, launch, run

    return {"shard": commands.cmd_shard, "rescore": commands.cmd_rescore, "train": commands.cmd_train,
            "launch": launch.cmd_launch, "run": run.cmd_run, "evaluate": commands.cmd_evaluate,
            "export": commands.cmd_export,
            "generate": commands.cmd_generate, "tensorboard": commands.cmd_tensorboard,
            "report": commands.cmd_report}


def _safe_process() -> None:
    # nothing is ever fetched from a hub: models and tokenizers are local directories
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # no file a user hands us is unpickled: every torch.load here and in child processes is weights-only
    # (prefpretrain.trainer.safe_load registers the few DeepSpeed types its checkpoints name)
    from prefpretrain.trainer.safe_load import force_weights_only

    force_weights_only()


def main(argv: list[str] | None = None) -> int:
    from prefpretrain.cli.parser import build_parser

    _safe_process()
    args = sys.argv[1:] if argv is None else argv
    ap = build_parser(keys_help=any(x == "-h" or len(x) > 2 and "--help".startswith(x) for x in args))
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
        return _commands()[a.command](a)
    except ConfigError as e:
        print(f"prefpretrain: config error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except InputError as e:
        msg = str(e).strip()  # (a DataLoader worker's error carries its traceback: its last line says it)
        print(f"prefpretrain: error: {msg.splitlines()[-1] if 'Traceback' in msg else msg}", file=sys.stderr)
        return EXIT_REFUSED
    except FileNotFoundError as e:
        print(f"prefpretrain: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except TasksFailed as e:  # (e.g. shard tasks under `run`): which, and where their logs are
        print(f"prefpretrain: {e}", file=sys.stderr)
        return EXIT_FAILED


def entry() -> None:
    """The `prefpretrain` console script and `python -m prefpretrain`. A `train` rank's work is done and on disk
    when main returns (files closed, process group destroyed): the interpreter's teardown is skipped, since C++
    destructors of background threads (gloo, DeepSpeed) abort a finished rank now and then ("terminate called
    without an active exception", SIGABRT), which torchrun or srun would report as a failed run."""
    code = main()
    if sys.argv[1:2] == ["train"]:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
