"""A run's data: the shard sets of `data.shards` opened and checked, packed for the objective, mixed; and its
validation data. The first shard set is the run's reference: its tokenizer and its validation split."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefpretrain import auxiliary, conditioning
from prefpretrain.conditioning import Attribute
from prefpretrain.config import Config
from prefpretrain.data_shards import remote
from prefpretrain.data_shards.columns import stats_of, stored_column
from prefpretrain.data_shards.loader import MixtureDataset
from prefpretrain.data_shards.packing import Layout, MaskSpec, PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.errors import ConfigError, InputError
from prefpretrain.objectives import layout_for


def open_split(cfg: Config, path: str, split: str, verify: bool | None = None) -> ShardSet:
    """A split of a shard set with the score columns the run's objective reads."""
    o = cfg.objective
    remote.configure(cfg.data.cache_dir or None, cfg.data.cache_max_gb)
    return ShardSet(path, split, verify=cfg.data.verify_checksums if verify is None else verify, column=o.column,
                    extra_columns=o.extra_columns)


def open_val(cfg: Config, verify: bool | None = None) -> ShardSet:
    return open_split(cfg, cfg.data.reference, "val", verify)


def open_data(cfg: Config) -> tuple[list[ShardSet], ShardSet, dict]:
    """Train shard sets, their shared tokenizer facts, and the validation set of the reference one."""
    sets = [open_split(cfg, s.path, "train") for s in cfg.data.shards]
    hashes = {s.tokenizer_hash for s in sets}
    if len(hashes) > 1:
        raise ConfigError(f"data.shards: shard sets use different tokenizers ({', '.join(sorted(hashes))})")
    return sets, open_val(cfg), sets[0].manifest


def mask_spec(cfg: Config, manifest: dict) -> MaskSpec | None:
    """Masking for masked LMs (None for causal ones)."""
    if cfg.model.kind != "masked":
        return None
    return MaskSpec.for_tokenizer(manifest["tokenizer"], cfg.model.mlm_probability, cfg.run.seed)


def run_attributes(cfg: Config, manifest: dict) -> tuple[Attribute, ...]:
    """The attributes the run conditions on (or scores by) and their control tokens, for its shard set."""
    return conditioning.run_attributes(cfg.objective, manifest["tokenizer"], stored_column(manifest))


def run_layout(cfg: Config, manifest: dict) -> Layout:
    o, more = cfg.objective, tuple(a.control() for a in run_attributes(cfg, manifest)[1:])
    return layout_for(cfg.train.objective, o.threshold, o.drop_prob, cfg.run.seed, manifest["tokenizer"]["special_ids"],
                      more)


def validation_layout(layout: Layout, cfg: Config, special: dict) -> Layout:
    """Validation judges the model on all held-out text: filtering selects what it trains on, not what it is
    judged on (conditional models read their control tokens, so they keep their layout)."""
    return layout_for("mle", 0.0, 0.0, cfg.run.seed, special) if layout.kind == "filter" else layout


@dataclass
class TrainData:
    sets: list[ShardSet]
    manifest: dict  # the reference shard set's
    layout: Layout
    mlm: MaskSpec | None
    packed: list[PackedSet]
    ds: MixtureDataset
    val: PackedSet
    attributes: tuple[Attribute, ...]  # what the run conditions on (or scores by), with their control tokens

    @property
    def tokenizer_hash(self) -> str:
        return self.sets[0].tokenizer_hash

    @property
    def scores_digest(self) -> str | None:
        """What the training scores depend on beyond the tars (a score column's files); None: the tars alone."""
        keys = [s.score_key() for s in self.sets]
        if not any(keys):
            return None
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def score_stats(self) -> dict:
        """Score statistics of the reference set's train split in the selected column (rwr/awr's auto scale)."""
        return stats_of(self.manifest, self.sets[0].score_column, "train")

    @property
    def special(self) -> dict:
        return self.manifest["tokenizer"]["special_ids"]

    @property
    def vocab_size(self) -> int:
        """The model's: the tokenizer's vocabulary and any further attributes' control tokens."""
        return conditioning.model_vocab_size(self.manifest["tokenizer"], self.attributes)


def training_data(cfg: Config, sets: list[ShardSet], val_set: ShardSet, manifest: dict) -> TrainData:
    """The opened shard sets (open_data) packed and checked; an objective or a split that leaves no sample is
    one line."""
    L, sp = cfg.data.seq_len, manifest["tokenizer"]["special_ids"]
    layout, mlm = run_layout(cfg, manifest), mask_spec(cfg, manifest)
    dm, seg = cfg.data.document_mask, auxiliary.active(cfg.objective)  # (the heads pool by segment)
    packed = [PackedSet(s, layout, L, mlm, cfg.data.on_corrupt == "skip", document_mask=dm, segments=seg)
              for s in sets]
    for s, p in zip(cfg.data.shards, packed, strict=True):
        if len(p) == 0:
            raise ConfigError(f"data.shards: {s.path} yields no {L}-token sample for objective "
                              f"{cfg.train.objective!r}")
    val = PackedSet(val_set, validation_layout(layout, cfg, sp), L, mlm, document_mask=dm, segments=seg)
    if len(val) == 0:
        raise ConfigError(f"data.shards[0]: the validation split of {cfg.data.reference} yields no {L}-token "
                          f"sample ({len(val_set)} documents): shard with a larger --val-fraction or a lower "
                          f"data.seq_len")
    ds = MixtureDataset(packed, [s.weight for s in cfg.data.shards], cfg.run.seed)
    return TrainData(sets, manifest, layout, mlm, packed, ds, val, run_attributes(cfg, manifest))


class DataQuality:
    """Samples of the run so far (resumes included) and how many touched a corrupt shard (data.on_corrupt=skip).

    A step with no target token (every sample corrupt, or empty) is an error, not a loss of 0; so is more than
    data.max_corrupt_fraction of corrupt samples (the shards are named in the log), judged once 10 / fraction
    samples were seen, so that one early corrupt sample does not stop a run that tolerates a few."""

    def __init__(self, max_fraction: float, state: dict | None = None):
        q = (state or {}).get("data_quality", {})
        self.max_fraction, self.samples, self.corrupt = max_fraction, q.get("samples", 0), q.get("corrupt", 0.0)

    def add(self, step: int, samples: int, targets: float, corrupt: float) -> None:
        self.samples, self.corrupt = self.samples + samples, self.corrupt + corrupt
        if targets == 0:
            raise InputError(f"step {step + 1}: the global batch holds no target token ({int(self.corrupt)} of "
                             f"{self.samples} samples so far touched corrupt shards): nothing to train on")
        f = self.max_fraction
        if self.corrupt > f * self.samples and self.samples >= (10 / f if f > 0 else 0):
            raise InputError(f"data.max_corrupt_fraction: {int(self.corrupt)} of the {self.samples} samples of this "
                             f"run touched corrupt shards ({self.corrupt / self.samples:.1%} > {f:.1%}); the shards "
                             f"are named in the log. Re-shard them, or raise data.max_corrupt_fraction")

    def state(self) -> dict:
        return {"samples": self.samples, "corrupt": self.corrupt}
