"""The earlier run a continual update starts from: its checkpoint, config, memory and validation sets."""
from __future__ import annotations

import json
from pathlib import Path

from prefpretrain.config import Config
from prefpretrain.data_shards.writer import MANIFEST
from prefpretrain.errors import ConfigError
from prefpretrain.rundir import CHECKPOINTS, FORGETTING, MEMORY, REPLAY
from prefpretrain.trainer.finished import FinishedRun


class Previous(FinishedRun):
    """The earlier run a continual update starts from."""

    @property
    def run_dir(self) -> Path:
        return self.path

    @property
    def tokenizer_hash(self) -> str | None:
        return self.state.get("tokenizer_hash")

    def memory_source(self) -> tuple[Path | None, list[str]]:
        """(a memory shard set to start the reservoir from, shard sets whose windows it has not seen yet).

        A finished continual run left RUN/memory (everything it saw); a continual run stopped before its end
        has only RUN/replay (what it started from) plus its own data; a plain run has its data only."""
        mem, rep = self.run_dir / MEMORY, self.run_dir / REPLAY
        data = [s.path for s in self.cfg.data.shards]
        if (mem / MANIFEST).is_file():
            return mem, []
        if (rep / MANIFEST).is_file():
            return rep, data
        return None, data

    def val_sets(self) -> dict[str, str]:
        """Every earlier validation set: the ones the earlier run's own forgetting report used, then its own."""
        out: dict[str, str] = {}
        fg = self.run_dir / FORGETTING
        if fg.is_file():
            rec = json.loads(fg.read_text())
            for part in ("old", "new"):
                for name, v in rec.get(part, {}).items():
                    if v.get("path"):
                        out.setdefault(name, v["path"])
        p = self.cfg.data.reference
        if p not in out.values():
            name = Path(p).name
            while name in out:
                name += "_"
            out[name] = p
        return out


def resolve(source: str, check: bool = True) -> Previous:
    """A run directory (its newest complete checkpoint) or one checkpoint directory."""
    return Previous.open(source, "continual.from", check)


def check_previous(cfg: Config) -> None:
    """Before any process starts: the earlier run is usable and the new shards use its tokenizer."""
    from prefpretrain.data_shards.reader import ShardSet

    c = cfg.continual
    if Path(c.from_).resolve() in (Path(cfg.run.output_dir).resolve(), Path(cfg.run.output_dir).resolve()
                                   / CHECKPOINTS):
        raise ConfigError("continual.from: must be another run than run.output_dir (which holds this update)")
    prev = resolve(c.from_, check=False)
    new_hash = ShardSet(cfg.data.reference, "train", verify=False).tokenizer_hash
    if prev.tokenizer_hash != new_hash:
        raise ConfigError(
            f"continual.from: {prev.ckpt} was trained with tokenizer {prev.tokenizer_hash}, but data.shards use "
            f"{new_hash}; shard the new data with the old tokenizer (prefpretrain shard --tokenizer "
            f"{prev.cfg.data.reference}/tokenizer, or shard.tokenizer)")
    if prev.cfg.objective.column is not None:
        raise ConfigError(f"continual.from: {prev.run_dir} was trained on score column "
                          f"{prev.cfg.objective.column!r}; continual updates read the stored column only (their "
                          f"replay memory keeps that one)")
    if (Path(cfg.run.output_dir) / REPLAY / MANIFEST).is_file():
        return  # this update's memory was built already (a resume): the earlier corpus is not needed again
    mem, stream = prev.memory_source()
    for s in stream:
        if not (Path(s) / MANIFEST).is_file():
            raise ConfigError(f"continual.from: the memory of {prev.run_dir} must be built from its shard set {s!r}, "
                              f"which is gone (a plain run has no memory/ of its own)")
