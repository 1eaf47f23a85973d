"""Capability with lm-evaluation-harness (`evaluate --lm-eval`): the builtin tasks built from the validation split,
what `--lm-eval` selects and refuses, lm-eval's results as eval.json / TensorBoard / the report keep them, and a
trained run evaluated on the builtin tasks and a task directory of the user's."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from prefpretrain.errors import InputError
from prefpretrain.trainer import capability
from prefpretrain.trainer.capability_tasks import (
    BUILTIN,
    CHOICES,
    CLOZE,
    CONTEXT_LINES,
    EXAMPLES,
    NEXT_LINE,
    held_out_documents,
    write_builtin_tasks,
)
from tests.conftest import launch_tiny, run_cli
from tests.ranks import cli_forked

USER_TASK = """\
task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
process_results: !function utils.process  # (read for its name only: never resolved when indexing)
metadata:
  version: 1.0
"""


def _user_tasks(d: Path, n: int = 5, with_function: bool = False) -> Path:
    d.mkdir(parents=True)
    data = d / "my_task.jsonl"
    data.write_text("".join(json.dumps({"context": f"x = {i}\n", "choices": ["y = x\n", "%%%\n"], "label": i % 2})
                            + "\n" for i in range(n)))
    text = USER_TASK.format(data=data)
    (d / "my_task.yaml").write_text(text if with_function else text.replace(
        "process_results: !function utils.process  # (read for its name only: never resolved when indexing)\n", ""))
    return d


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_builtin_tasks_are_deterministic_and_well_formed(tiny_shards, tmp_path):
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.data_shards.tokenizer import load_tokenizer

    ss = ShardSet(tiny_shards, "val")
    docs = held_out_documents(ss, load_tokenizer(ss.tokenizer_dir))
    counts = write_builtin_tasks(docs, tmp_path / "a", seed=1)
    assert write_builtin_tasks(docs, tmp_path / "b", seed=1) == counts and set(counts) == set(BUILTIN)
    write_builtin_tasks(docs, tmp_path / "c", seed=2)
    for name in BUILTIN:
        a, b, c = (tmp_path / x / "tasks" / f"{name}.jsonl" for x in "abc")
        assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
        assert 0 < counts[name] == len(_read_jsonl(a)) <= EXAMPLES
        cfg = yaml.safe_load((tmp_path / "a" / "tasks" / f"{name}.yaml").read_text())
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == a
    for e in _read_jsonl(tmp_path / "a" / "tasks" / f"{NEXT_LINE}.jsonl"):
        lines = docs[e["doc"]]
        assert e["context"] == "".join(x + "\n" for x in lines[max(0, e["line"] - CONTEXT_LINES): e["line"]])
        assert len(set(e["choices"])) == len(e["choices"]) == CHOICES and 0 <= e["label"] < CHOICES
        assert e["choices"][e["label"]] == lines[e["line"]].rstrip()  # the real next line
    for e in _read_jsonl(tmp_path / "a" / "tasks" / f"{CLOZE}.jsonl"):
        line = docs[e["doc"]][e["line"]].rstrip()
        assert line.endswith(e["target"]) and e["target"].isidentifier() and len(e["target"]) >= 3
        assert e["context"].endswith(line[: -len(e["target"])]) and line[: -len(e["target"])].strip()


def test_what_lm_eval_selects_and_refuses(tmp_path, monkeypatch):
    mine = _user_tasks(tmp_path / "mine", with_function=True)
    assert capability.selection("") is None and capability.selection("none") is None
    assert capability.selection("builtin").tasks == list(BUILTIN)
    assert capability.selection(NEXT_LINE).tasks == [NEXT_LINE]
    both = capability.selection(f"builtin,{mine}")
    assert both.tasks == [*BUILTIN, "my_task"] and both.dirs == (mine.resolve(),)
    assert capability.selection(f"my_task,{mine}").tasks == ["my_task"]
    (tmp_path / "empty").mkdir()
    for text, says in [("hellaswag", "'hellaswag' is not a local task"), (f"mmlu,{mine}", "'mmlu' is not a local"),
                       ("./no/such/dir", "not a task directory"), (str(tmp_path / "empty"), "holds no lm-eval task")]:
        with pytest.raises(InputError, match="^--lm-eval: ") as e:
            capability.selection(text)
        assert says in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(capability, "lm_eval_installed", lambda: False)
    with pytest.raises(InputError) as e:
        capability.selection("builtin")
    assert str(e.value) == "--lm-eval needs lm-evaluation-harness: pip install 'prefpretrain[lm_eval]'"


def test_lm_eval_results_as_eval_json_and_tensorboard_keep_them():
    results = {  # the shape of lm-eval 0.4's simple_evaluate results (a group, a filter, a metric not computed)
        "results": {"grp": {"acc,none": 0.5, "acc_stderr,none": 0.1},
                    "a": {"alias": "a", "acc,none": 0.25, "acc_stderr,none": 0.05, "acc_norm,none": 0.5},
                    "b": {"exact_match,strict-match": 0.75, "exact_match_stderr,strict-match": "N/A"},
                    "c": {"perplexity,none": 12.0}},
        "group_subtasks": {"grp": ["a", "b"], "a": [], "b": [], "c": []},
        "higher_is_better": {"a": {"acc": True, "acc_norm": True}, "b": {"exact_match": True},
                             "c": {"perplexity": False}},
        "n-samples": {"a": {"original": 9, "effective": 4}},
    }
    res = capability.summarize(results)
    assert res["lm_eval"]["a"] == {"acc": 0.25, "acc_stderr": 0.05, "acc_norm": 0.5, "samples": 4}
    assert res["lm_eval"]["b"] == {"exact_match/strict-match": 0.75}
    # the first of acc / exact_match (under a filter too); none for a task without an accuracy; groups not twice
    assert res["capability_metric"] == {"a": "acc", "b": "exact_match/strict-match", "c": None}
    assert res["capability"] == 0.5
    scalars = capability.capability_scalars(res)
    assert scalars["eval/lm_eval/a/acc"] == 0.25 and scalars["eval/capability"] == 0.5
    assert "eval/lm_eval/a/samples" not in scalars and "eval/lm_eval/b/exact_match/strict-match" in scalars


@pytest.mark.cli
def test_hub_task_is_refused_in_one_line_before_any_work(tmp_path):
    r = run_cli("evaluate", str(tmp_path / "no_run_here"), "--lm-eval", "builtin,hellaswag")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("prefpretrain: error: --lm-eval: 'hellaswag' is not a local task")


@pytest.mark.cli
def test_evaluate_runs_builtin_and_user_tasks_offline(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefpretrain.report import build_report
    from prefpretrain.trainer.export import export_matches

    run = tmp_path / "run"
    launch_tiny(tiny_shards, run, 1, **{"train.max_steps": 4, "eval.every_steps": 0, "checkpoint.every_steps": 0})
    mine = _user_tasks(tmp_path / "mine", n=5)
    r = cli_forked("evaluate", str(run), "--samples", "0", "--lm-eval", f"builtin,{mine}", "--lm-eval-limit", "20")
    assert r.returncode == 0, r.stderr[-5000:]
    ev = json.loads((run / "eval.json").read_text())
    lm = ev["lm_eval"]
    assert set(lm) == {*BUILTIN, "my_task"} and ev["capability_metric"] == dict.fromkeys(lm, "acc")
    for name in BUILTIN:  # the limit: the first 20 examples of each
        assert lm[name]["samples"] == min(20, ev["lm_eval_info"]["builtin_examples"][name])
    assert lm["my_task"]["samples"] == 5
    assert all(0 <= v["acc"] <= 1 for v in lm.values()) and 0 <= lm[NEXT_LINE]["acc_norm"] <= 1
    assert ev["capability"] == pytest.approx(sum(v["acc"] for v in lm.values()) / 3)
    assert math.isfinite(lm[CLOZE]["perplexity"])
    assert export_matches(run / "export", Path(ev["checkpoint"]))  # (the export the tasks ran on, kept)

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"eval/lm_eval/{NEXT_LINE}/acc", f"eval/lm_eval/{CLOZE}/acc", "eval/lm_eval/my_task/acc",
            "eval/capability"} <= tags
    assert acc.Scalars("eval/capability")[-1].value == pytest.approx(ev["capability"])

    md = build_report([str(run)], str(tmp_path / "report")).read_text()
    assert "| capability |" in md and f"| {NEXT_LINE} | acc | {lm[NEXT_LINE]['acc']:.4f} |" in md
