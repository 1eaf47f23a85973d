"""The earlier run a continual update starts from: its checkpoint, config, memory and validation sets."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefpretrain.config import Config, ConfigError, load_config
from prefpretrain.trainer import checkpoint as ckptlib


@dataclass
class Previous:
    run_dir: Path
    ckpt: Path
    state: dict  # the checkpoint's state.json
    cfg: Config  # the earlier run's resolved config

    @property
    def tokenizer_hash(self) -> str | None:
        return self.state.get("tokenizer_hash")

    def memory_source(self) -> tuple[Path | None, list[str]]:
        """(a memory shard set to start the reservoir from, shard sets whose windows it has not seen yet).

        A finished continual run left RUN/memory (everything it saw); a continual run stopped before its end
        has only RUN/replay (what it started from) plus its own data; a plain run has its data only."""
        mem, rep = self.run_dir / "memory", self.run_dir / "replay"
        data = [s.path for s in self.cfg.data.shards]
        if (mem / "manifest.json").is_file():
            return mem, []
        if (rep / "manifest.json").is_file():
            return rep, data
        return None, data

    def val_sets(self) -> dict[str, str]:
        """Every earlier validation set: the ones the earlier run's own forgetting report used, then its own."""
        out: dict[str, str] = {}
        fg = self.run_dir / "forgetting.json"
        if fg.is_file():
            rec = json.loads(fg.read_text())
            for part in ("old", "new"):
                for name, v in rec.get(part, {}).items():
                    if v.get("path"):
                        out.setdefault(name, v["path"])
        p = self.cfg.data.shards[0].path
        if p not in out.values():
            name = Path(p).name
            while name in out:
                name += "_"
            out[name] = p
        return out


def resolve(source: str, check: bool = True) -> Previous:
    """A run directory (its newest complete checkpoint) or one checkpoint directory."""
    p = Path(source)
    if (p / "state.json").is_file():
        ckpt, run = p, p.parent.parent
        problem = ckptlib.verify(ckpt) if check else None
        if problem:
            raise ConfigError(f"continual.from: {ckpt} is damaged ({problem})")
    elif (p / "checkpoints").is_dir():
        ckpt, run = ckptlib.find_latest(p / "checkpoints", check), p
        if ckpt is None:
            raise ConfigError(f"continual.from: {source!r} has no complete checkpoint")
    else:
        raise ConfigError(f"continual.from: {source!r} is neither a run directory nor a checkpoint directory")
    if not (run / "config.yaml").is_file() or not (run / "model_config").is_dir():
        raise ConfigError(f"continual.from: {run} has no config.yaml / model_config (not a prefpretrain run?)")
    return Previous(run, ckpt, ckptlib.read_state(ckpt), load_config(run / "config.yaml"))


def check_previous(cfg: Config) -> None:
    """Before any process starts: the earlier run is usable and the new shards use its tokenizer."""
    from prefpretrain.data_shards.reader import ShardSet

    c = cfg.continual
    if Path(c.from_).resolve() in (Path(cfg.run.output_dir).resolve(), Path(cfg.run.output_dir).resolve()
                                   / "checkpoints"):
        raise ConfigError("continual.from: must be another run than run.output_dir (which holds this update)")
    prev = resolve(c.from_, check=False)
    new_hash = ShardSet(cfg.data.shards[0].path, "train", verify=False).tokenizer_hash
    if prev.tokenizer_hash != new_hash:
        raise ConfigError(
            f"continual.from: {prev.ckpt} was trained with tokenizer {prev.tokenizer_hash}, but data.shards use "
            f"{new_hash}; shard the new data with the old tokenizer (prefpretrain shard --tokenizer "
            f"{prev.cfg.data.shards[0].path}/tokenizer, or shard.tokenizer)")
    if (Path(cfg.run.output_dir) / "replay" / "manifest.json").is_file():
        return  # this update's memory was built already (a resume): the earlier corpus is not needed again
    mem, stream = prev.memory_source()
    for s in stream:
        if not (Path(s) / "manifest.json").is_file():
            raise ConfigError(f"continual.from: the memory of {prev.run_dir} must be built from its shard set {s!r}, "
                              f"which is gone (a plain run has no memory/ of its own)")
