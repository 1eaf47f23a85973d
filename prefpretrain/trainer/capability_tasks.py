"""The builtin lm-evaluation-harness tasks, built from a run's validation split (held-out text the model never
trained on): local JSON lines and the task YAMLs that read them, so that nothing is downloaded.

- `prefpretrain_cloze` (LAMBADA-style, `loglikelihood`): up to CONTEXT_LINES held-out lines and the start of the
  next one; the target is that line's last word (an identifier or word of 3+ characters ending the line).
  `acc`: the model's greedy continuation is exactly the word; `perplexity`: lm-eval's over the words' likelihoods.
- `prefpretrain_next_line` (`multiple_choice`): up to CONTEXT_LINES held-out lines, and CHOICES candidate lines:
  the real next line and distractor lines from other held-out documents (from the same document, away from the
  context, when the split holds one document), of the same indentation and about the same length where there
  are enough (then of the same indentation, then any), so that neither gives the answer away. `acc` / `acc_norm`
  (lm-eval's: the likelihood of each candidate, plain or per character); chance is 1 / CHOICES.

Examples are drawn with a generator seeded by run.seed from the first MAX_DOCS validation documents: the same run
gives the same files. Lines are text as the tokenizer decodes it (code shards: lines of code).
"""
from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

CLOZE, NEXT_LINE = "prefpretrain_cloze", "prefpretrain_next_line"
BUILTIN = (CLOZE, NEXT_LINE)
EXAMPLES = 200  # examples per builtin task (`--lm-eval-limit` evaluates the first N of them)
MAX_DOCS = 64  # validation documents read
CONTEXT_LINES = 8  # lines of context before the predicted line
CHOICES = 4  # candidate lines of a next-line example (chance: 1 / CHOICES)
MIN_LINE, MAX_LINE = 8, 100  # characters (without surrounding whitespace) of a candidate line
_WORD = re.compile(r"\b([A-Za-z_]\w{2,29})$")  # the last word of a line, 3-30 characters
_TRIES = 30  # draws per distractor and pool before falling back to the next pool


@dataclass(frozen=True)
class Line:
    doc: int
    no: int  # line number in its document
    text: str

    @property
    def indent(self) -> str:
        return self.text[: len(self.text) - len(self.text.lstrip())]


def held_out_documents(ss, tok, limit: int = MAX_DOCS) -> list[list[str]]:
    """The first `limit` documents of a shard set split (`tok`: its tokenizer), decoded, as lists of lines."""
    eos = ss.manifest["tokenizer"]["special_ids"]["eos"]
    docs = []
    for i in range(min(limit, len(ss))):
        ids = ss.read(i)["tokens"]
        if len(ids) and ids[-1] == eos:
            ids = ids[:-1]
        docs.append(tok.decode(ids.tolist(), skip_special_tokens=False).split("\n"))
    return docs


def _context(lines: list[str], no: int) -> str | None:
    """The CONTEXT_LINES lines before line `no`, each ending with a newline (None: no text in them)."""
    before = lines[max(0, no - CONTEXT_LINES): no]
    return "".join(x + "\n" for x in before) if any(x.strip() for x in before) else None


def cloze_examples(docs: list[list[str]], rng: np.random.Generator, n: int = EXAMPLES) -> list[dict]:
    """Up to n examples {context, target}: the lines before a line and that line up to its last word, the word."""
    spots = []
    for d, lines in enumerate(docs):
        for no, line in enumerate(lines):
            text = line.rstrip()
            m = _WORD.search(text)
            if m and text[: m.start()].strip() and len(text) <= MAX_LINE:
                ctx = _context(lines, no)
                if ctx is not None:
                    spots.append({"context": ctx + text[: m.start()], "target": m.group(1), "doc": d, "line": no})
    return [spots[i] for i in rng.permutation(len(spots))[:n]]


def _candidates(docs: list[list[str]]) -> list[Line]:
    return [Line(d, no, line.rstrip()) for d, lines in enumerate(docs) for no, line in enumerate(lines)
            if MIN_LINE <= len(line.strip()) <= MAX_LINE]


def _distractors(target: Line, pools: list[list[Line]], rng: np.random.Generator, k: int,
                 several_docs: bool) -> list[str] | None:
    """k distinct lines other than the target's text, from another document (several_docs) or away from the
    target's context; drawn from the first pools that have them."""
    picked: list[str] = []
    for pool in pools:
        for _ in range(_TRIES * k):
            if len(picked) == k or not pool:
                break
            c = pool[rng.integers(len(pool))]
            far = c.doc != target.doc if several_docs else abs(c.no - target.no) > CONTEXT_LINES
            if far and c.text != target.text and c.text not in picked:
                picked.append(c.text)
    return picked if len(picked) == k else None


def _size(x: Line) -> int:
    return len(x.text.strip())


def _pools(target: Line, by_indent: dict[str, list[Line]], sizes: dict[str, list[int]], lines: list[Line]):
    """Where a target's distractors come from, in order: lines of its indentation and about its length (so that
    neither gives the answer away), of its indentation, any line."""
    same, n = by_indent[target.indent], _size(target)
    tol = max(4, n // 5)
    near = same[bisect.bisect_left(sizes[target.indent], n - tol): bisect.bisect_right(sizes[target.indent], n + tol)]
    return [near, same, lines]


def next_line_examples(docs: list[list[str]], rng: np.random.Generator, n: int = EXAMPLES,
                       k: int = CHOICES) -> list[dict]:
    """Up to n examples {context, choices, label}: the lines before a line, that line among k - 1 distractors."""
    lines = _candidates(docs)
    by_indent: dict[str, list[Line]] = {}
    for x in sorted(lines, key=_size):
        by_indent.setdefault(x.indent, []).append(x)
    sizes = {i: [_size(x) for x in xs] for i, xs in by_indent.items()}
    several = len({x.doc for x in lines}) > 1
    out = []
    for i in rng.permutation(len(lines)):
        target = lines[i]
        ctx = _context(docs[target.doc], target.no)
        others = (_distractors(target, _pools(target, by_indent, sizes, lines), rng, k - 1, several)
                  if ctx else None)
        if others is None:
            continue
        choices = [target.text, *others]
        order = rng.permutation(k)
        out.append({"context": ctx, "choices": [choices[j] for j in order], "label": int(np.argmin(order)),
                    "doc": target.doc, "line": target.no})
        if len(out) == n:
            break
    return out


def _task_yaml(name: str, data: Path, cache: Path) -> dict:
    """An lm-eval task config over a local JSON-lines file (datasets' packaged `json` builder: no download)."""
    common = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
              "test_split": "test", "doc_to_text": "context", "target_delimiter": "",
              "metadata": {"version": 1.0, "source": "prefpretrain: the run's validation split"}}
    if name == CLOZE:
        return {**common, "output_type": "loglikelihood", "doc_to_target": "target", "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}
    return {**common, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}


def write_builtin_tasks(docs: list[list[str]], out_dir: str | Path, seed: int, names: tuple[str, ...] = BUILTIN,
                        n: int = EXAMPLES) -> dict[str, int]:
    """OUT/tasks/NAME.jsonl and NAME.yaml for each builtin task in `names` (OUT/cache: the datasets cache of
    their files); the number of examples of each. A task without one example is a ValueError."""
    out = Path(out_dir)
    tasks = out / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    make = {CLOZE: cloze_examples, NEXT_LINE: next_line_examples}
    counts = {}
    for name in names:
        examples = make[name](docs, np.random.default_rng([seed, BUILTIN.index(name)]), n)
        if not examples:
            raise ValueError(f"{name}: the validation split holds no line to build an example from")
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(e) + "\n" for e in examples))
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data, out / "cache"), sort_keys=False))
        counts[name] = len(examples)
    return counts
