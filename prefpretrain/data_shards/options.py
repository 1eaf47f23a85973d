"""How a corpus is sharded: one dataclass, the single source of `prefpretrain shard`'s flags and of the run
config's `shard:` section (which adds its inputs; the output is data.shards[0])."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefpretrain.host import cpus_available


@dataclass
class ShardSettings:
    scorer: str = "pep8"  # pep8 | pep8_style | pii | classifier | lexical | field | none | learned:RUN | module:fn
    scorer_params: dict[str, Any] = field(default_factory=dict)  # the scorer's options, e.g. {model_dir: clf/}
    segmenter: Literal["auto", "line", "sentence", "document"] = "auto"  # auto: line for code, sentence for prose
    tokenizer: str = "train"  # train (byte-level BPE on the input) | PATH to a tokenizer directory
    vocab_size: int = 8192  # BPE vocabulary (when training a tokenizer)
    val_fraction: float = 0.05  # share of documents held out for validation
    shard_size_mb: float = 64.0  # bound on one tar shard
    workers: int = 0  # scoring processes per task (0 = one per CPU this process may use)
    tasks: int = 1  # independent shard tasks (each writes its own chunks; the result does not depend on it)
    executor: Literal["local", "slurm", "ray"] = "local"  # where the tasks run: this machine, a SLURM array, Ray
    tokenizer_sample_mb: float = 1024.0  # train the tokenizer on at most this much input (a fixed sample); 0 = all
    max_files: int = 0  # keep only the first N input files (0 = all)
    text_field: str = "text"  # JSONL, Parquet, Arrow: the field (column) with the text
    score_field: str | None = None  # JSONL, Parquet, Arrow: the field with a score (scorer 'field')

    def worker_count(self) -> int:
        """`workers`, or one per CPU this process may run on."""
        return self.workers or cpus_available()


@dataclass(kw_only=True)
class ShardOptions(ShardSettings):
    """One `prefpretrain shard` job: the settings plus where from and where to."""

    inputs: list[str]  # files, directories, globs, or @stdlib
    output: str  # the shard set's directory
    overwrite: bool = False  # replace shards already there (default: resume an interrupted run)
    progress: bool = True  # a progress bar on stderr
