"""Capability: lm-evaluation-harness on a run's exported model, offline (docs/evaluation.md).

`--lm-eval` / eval.lm_eval names what to run, as a comma-separated list of
- `builtin`: the tasks built from the run's validation split (capability_tasks.py), or one of their names;
- a directory of the user's own lm-eval task YAMLs: every task in it, or, when the list also names tasks, the
  place to find them;
- a task name found in one of those directories.
Anything else (an lm-eval task of its own registry, which downloads its data set) is refused in one line before
any work: evaluation is offline. Results: eval.json's `lm_eval` ({task: {metric: value}}) and `capability` (the
mean over the tasks of each one's main accuracy metric, CAPABILITY_METRICS), TensorBoard eval/lm_eval/TASK/METRIC.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from prefpretrain.errors import InputError
from prefpretrain.rundir import EXPORT, LM_EVAL
from prefpretrain.trainer.capability_tasks import BUILTIN, held_out_documents, write_builtin_tasks

log = logging.getLogger(__name__)
MISSING = "--lm-eval needs lm-evaluation-harness: pip install 'prefpretrain[lm_eval]'"
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# a task's main metric, the one `capability` averages: the first of these it reports, else its first metric
# that is higher-is-better and within [0, 1]
CAPABILITY_METRICS = ("acc", "exact_match")
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap draws for the stderr of metrics that are not means (perplexity)


@dataclass(frozen=True)
class TaskSelection:
    builtin: tuple[str, ...]  # builtin tasks to build and run
    dirs: tuple[Path, ...]  # the user's task directories (lm-eval's include paths)
    names: tuple[str, ...]  # the user's tasks to run

    @property
    def tasks(self) -> list[str]:
        return [*self.builtin, *self.names]


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads an lm-eval task YAML for its names only: its tags (`!function module.fn`) are left unresolved."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_tasks(d: Path) -> list[str]:
    """The task names (`task:` keys) of the YAMLs under directory d, and its groups' and tags' names after them."""
    tasks, groups = [], []
    for p in sorted(d.rglob("*.yaml")):
        try:
            cfg = yaml.load(p.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 - a SafeLoader subclass
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # (lm-eval skips what it cannot read, too)
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str) and "group" not in cfg:
            tasks.append(cfg["task"])
            tags = cfg.get("tag") or []
            groups += [tags] if isinstance(tags, str) else [t for t in tags if isinstance(t, str)]
        elif isinstance(cfg, dict) and isinstance(cfg.get("group"), str):
            groups.append(cfg["group"])
    return list(dict.fromkeys(tasks)) + [g for g in dict.fromkeys(groups) if g not in tasks]


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def selection(text: str | None, key: str = "--lm-eval") -> TaskSelection | None:
    """What `text` asks for (None: nothing, for "" or "none"); what cannot run here is an InputError naming `key`,
    one line, before any work."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items or items == ["none"]:
        return None
    if not lm_eval_installed():
        raise InputError(MISSING)
    builtin, dirs, names = [], [], []
    for x in items:
        if x == "builtin":
            builtin += BUILTIN
        elif x in BUILTIN:
            builtin.append(x)
        elif Path(x).expanduser().is_dir():
            dirs.append(Path(x).expanduser().resolve())
        elif "/" in x or x.startswith(("~", ".")):
            raise InputError(f"{key}: {x}: not a task directory")
        else:
            names.append(x)
    found = {d: local_tasks(d) for d in dirs}
    for d, have in found.items():
        if not have:
            raise InputError(f"{key}: {d} holds no lm-eval task YAML (a file with a `task:` key)")
    known = {n for have in found.values() for n in have}
    for n in names:
        if n not in known:
            where = f"builtin tasks {', '.join(BUILTIN)}" + "".join(f"; {d}: {', '.join(h)}" for d, h in found.items())
            raise InputError(f"{key}: {n!r} is not a local task ({where}); evaluation is offline and lm-eval's own "
                             f"tasks download their data: see docs/evaluation.md for running one offline")
    if dirs and not names:  # directories alone: all their tasks
        names = [n for have in found.values() for n in have if n not in builtin]
    return TaskSelection(tuple(dict.fromkeys(builtin)), tuple(dict.fromkeys(dirs)), tuple(dict.fromkeys(names)))


def force_offline() -> None:
    """Nothing is downloaded: the hub, datasets and transformers offline, also where they were imported already
    (each reads its switch at import)."""
    for k in OFFLINE:
        os.environ[k] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        cfg = sys.modules["datasets"].config
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


@contextlib.contextmanager
def exported_model(fr) -> Iterator[Path]:
    """The HF directory of the checkpoint `fr` opened: RUN/export when it holds that checkpoint's export; else
    written there when it is the run's newest checkpoint; else (an older checkpoint) a temporary export."""
    from prefpretrain.trainer import checkpoint as ckptlib
    from prefpretrain.trainer.export import export_matches, export_run

    current = fr.path / EXPORT
    if not export_matches(current, fr.ckpt):
        newest = ckptlib.find_latest(fr.dir.checkpoints, check=False)
        if newest is None or newest.resolve() != fr.ckpt.resolve():
            (fr.path / LM_EVAL).mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="export-", dir=fr.path / LM_EVAL) as d:
                yield export_run(fr.ckpt, Path(d) / "model")
            return
        export_run(fr.ckpt, current)
    yield current


def _main_metric(nums: dict[str, float], higher_is_better: dict[str, bool]) -> str | None:
    """The first of CAPABILITY_METRICS the task reports, else its first higher-is-better metric within [0, 1] (a
    metric under a filter, `exact_match/strict-match`, counts as the metric)."""
    for m in (*CAPABILITY_METRICS, *(m for m, up in higher_is_better.items() if up)):
        for k in (k for k in nums if k == m or k.startswith(f"{m}/")):
            if m in CAPABILITY_METRICS or 0.0 <= nums[k] <= 1.0:
                return k
    return None


def summarize(results: dict) -> dict:
    """lm-eval's results as eval.json keeps them: {task: {metric: value}} (numbers only; a filter other than
    `none` named after the metric, `acc/strict-match`), the main metric of each task and their mean."""
    per_task = {}
    for task, metrics in results["results"].items():
        nums = {}
        for key, v in metrics.items():
            if "," in key and isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                metric, filt = key.split(",", 1)
                nums[metric if filt == "none" else f"{metric}/{filt}"] = float(v)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        per_task[task] = {**nums, **({"samples": int(n)} if n is not None else {})}
    groups = {g for g, subs in results.get("group_subtasks", {}).items() if subs}
    main = {t: _main_metric(per_task[t], results.get("higher_is_better", {}).get(t, {}))
            for t in per_task if t not in groups}
    out = {"lm_eval": per_task, "capability_metric": main}
    scored = [per_task[t][m] for t, m in main.items() if m is not None]
    if scored:
        out["capability"] = float(np.mean(scored))
    return out


def capability_scalars(res: dict) -> dict[str, float]:
    """TensorBoard scalars of the lm-eval results: eval/lm_eval/TASK/METRIC for every metric, and eval/capability."""
    out = {f"eval/lm_eval/{t}/{m}": v for t, ms in res.get("lm_eval", {}).items() for m, v in ms.items()
           if m != "samples"}
    if "capability" in res:
        out["eval/capability"] = res["capability"]
    return out


class _CutContexts(logging.Filter):
    """Counts lm-eval's one warning per request whose context is longer than the model's positions (cut from the
    left, as lm-eval does), instead of printing each."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Combined length of context"):
            self.n += 1
            return False
        return True


def _simple_evaluate(model_dir: Path, sel: TaskSelection, include: list[Path], device: str, dtype: str,
                     limit: int | None) -> dict:
    """lm-eval's `simple_evaluate` with the `hf` model on the export; only the tasks of `include` are known to its
    TaskManager (none of lm-eval's own). Batches: lm-eval's largest that fits on a GPU, 32 on the CPU."""
    force_offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    cut, hf_log = _CutContexts(), logging.getLogger("lm_eval.models.huggingface")
    hf_log.addFilter(cut)
    try:
        return lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype}, tasks=sel.tasks,
            task_manager=tm, device=device, batch_size="auto" if device.startswith("cuda") else 32,
            limit=limit or None, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
    except (KeyError, FileNotFoundError, ConnectionError) as e:  # a task that is not there, data not on disk
        raise InputError(f"--lm-eval: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''} "
                         f"(evaluation is offline: a task's data must be local files)") from None
    finally:
        hf_log.removeFilter(cut)
        if cut.n:
            log.info("lm-eval: %d requests longer than the model's positions were cut from the left", cut.n)


def run_capability(fr, sel: TaskSelection, ss, *, device: str, dtype: str, limit: int | None) -> dict:
    """lm-eval's `sel` tasks on the exported model of `fr` (a FinishedRun) on `device` in `dtype` ("float32",
    "bfloat16"...); the builtin tasks written first from `ss` (the run's validation split) under RUN/lm_eval."""
    from prefpretrain.data_shards import tokenizer as toklib

    t0 = time.time()
    out, include, info = fr.path / LM_EVAL, list(sel.dirs), {}
    if sel.builtin:
        docs = held_out_documents(ss, toklib.load_tokenizer(ss.tokenizer_dir))
        try:
            info["builtin_examples"] = write_builtin_tasks(docs, out, fr.cfg.run.seed, sel.builtin)
        except ValueError as e:
            raise InputError(f"--lm-eval: {e}") from None
        include.insert(0, out / "tasks")
    with exported_model(fr) as model_dir:
        results = _simple_evaluate(model_dir, sel, include, device, dtype, limit)
    res = summarize(results)
    import lm_eval

    res["lm_eval_info"] = {**info, "version": getattr(lm_eval, "__version__", "?"), "tasks": sel.tasks,
                           "task_dirs": [str(p) for p in include], "limit": limit or None,
                           "condition": "none", "seconds": round(time.time() - t0, 1)}
    return res
