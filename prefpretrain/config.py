"""One typed config tree. YAML files mirror it; `key.sub=value` overrides patch it.

Every field's comment is its documentation (`prefpretrain train --help-config` prints them).
Errors are raised as `ConfigError` with the dotted key in the message, before any process starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from prefpretrain.data_shards.options import ShardSettings
from prefpretrain.errors import ConfigError, InputError  # noqa: F401 - re-exported: config errors are named here
from prefpretrain.objectives import OBJECTIVES, ObjectiveConfig, objective_problem
from prefpretrain.typed import apply_override as _apply_override
from prefpretrain.typed import field_docs, from_dict


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"  # run directory: config, checkpoints, tensorboard, metrics, export
    seed: int = 1234  # seeds model init, data order, control-token dropout and MLM masks
    resume: str = "auto"  # auto (newest checkpoint in output_dir if any) | never | PATH to a checkpoint


@dataclass
class ShardSetConfig:
    FROM_STR: ClassVar[str] = "path"  # `data.shards: [DIR]` means [{path: DIR}]

    path: str = ""  # a directory written by `prefpretrain shard` (holds manifest.json), or its URL (s3://...)
    weight: float = 1.0  # mixture weight; weights are normalised over data.shards


@dataclass
class DataConfig:
    shards: list[ShardSetConfig] = field(default_factory=list)  # one or more shard sets
    seq_len: int = 256  # tokens per training sample (packed across documents)
    num_workers: int = 0  # DataLoader worker processes per rank (order does not depend on it)
    verify_checksums: bool = True  # check each shard's sha256 against the manifest when first opened
    cache_dir: str = ""  # shard sets at URLs: local mirrors and downloaded tar parts ("": ~/.cache/prefpretrain)
    cache_max_gb: float = 50.0  # bound on the downloaded tar parts; the least recently used go first
    log_sample_ids: bool = False  # debug: RUN/sample_ids/rankR.jsonl, the global positions each rank used per step
    on_corrupt: Literal["error", "skip"] = "error"  # skip: a sample touching a bad shard carries no loss, counted
    max_corrupt_fraction: float = 0.01  # with skip: stop (exit 2) once more than this share of samples was corrupt
    document_mask: bool = True  # causal models: attention stays inside each document of a packed window (its
    # block opens with the EOS before it) and positions restart per block (false: windows attend across
    # documents, as the PHF reference does)

    @property
    def reference(self) -> str:
        """The shard set whose tokenizer and validation split a run uses: the first of `shards`."""
        return self.shards[0].path


@dataclass
class ModelConfig:
    kind: Literal["causal", "masked"] = "causal"  # causal LM (GPT/Llama) or masked LM (BERT)
    arch: str = "gpt2"  # HF model_type: gpt2, llama, gpt_neox, bert, ...
    from_pretrained: str | None = None  # local HF model directory to initialise from (no hub)
    hidden_size: int = 256  # width
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads
    intermediate_size: int | None = None  # MLP width (default 4 x hidden_size)
    freeze: str = "none"  # none | embeddings | bottom:N (embeddings + first N blocks) | all_but_top:N
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30 % slower)
    mlm_probability: float = 0.15  # masked LMs: share of tokens masked (80 % [MASK], 10 % random, 10 % kept)
    dropout: float = 0.0  # dropout in attention / MLP / embeddings where the architecture has it
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernels: sdpa (flash
    # kernels on CUDA), eager, or flash_attention_2 (needs the flash-attn package and CUDA; else sdpa, logged)
    extra: dict[str, Any] = field(default_factory=dict)  # more HF config fields, passed as is


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # samples per rank per forward pass
    global_batch_size: int = 16  # samples per optimizer step over all ranks
    grad_accum: int | None = None  # default: global_batch_size / (micro_batch_size x world size)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 50  # linear warm-up steps
    schedule: Literal["cosine", "constant_cooldown", "constant"] = "cosine"  # after warm-up
    cooldown_steps: int = 0  # constant_cooldown: linear decay to min_lr over the last N steps
    weight_decay: float = 0.1  # AdamW weight decay (not applied to biases, norms, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # mixed precision mode
    objective: str = "mle"  # mle | filter | conditional | unlikelihood | rwr | awr (prefpretrain.objectives)
    log_every: int = 10  # steps between log lines / TensorBoard points
    max_bad_steps: int = 10  # stop after this many consecutive steps skipped for a non-finite loss/gradient
    peak_flops: float = 0.0  # per-rank peak FLOP/s for MFU (0 = a known GPU's datasheet peak, else a matmul probe)
    profile_at: int = 0  # torch.profiler over the steps after this one (0 = off); written to RUN/profile
    profile_steps: int = 3  # how many optimizer steps the profile covers
    compile: bool = False  # torch.compile the model (through DeepSpeed's engine.compile); same losses, faster on GPUs
    cross_entropy: Literal["torch", "chunked"] = "torch"  # chunked: token log-probs without an fp32 copy of the
    # logits (recomputed per chunk in the backward): less memory for large vocabularies, same values


@dataclass
class AdversarialConfig:
    """Adversarial training in embedding space (ALUM-style virtual adversarial term), off by default."""

    steps: int = 0  # ascent steps K on the embedding perturbation per micro batch (0 = off)
    epsilon: float = 0.1  # bound on each token's perturbation (L2 norm of its embedding delta)
    step_size: float = 0.05  # ascent step (L2 norm per token, along the normalised gradient)
    init_std: float = 0.01  # the perturbation starts as N(0, init_std^2) per coordinate
    weight: float = 1.0  # weight of the symmetric KL between clean and perturbed predictions


@dataclass
class EngineConfig:
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (0 = plain data parallel)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # torch.distributed backend; auto = nccl on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where to train
    offload: Literal["none", "optimizer", "all"] = "none"  # ZeRO-Offload: optimizer states (stage>=1), params (3)
    loss_scale_power: int = 16  # fp16: initial dynamic loss scale 2^N
    zero3_init: Literal["full", "partitioned"] = "full"  # ZeRO-3: build the whole model on every rank, or
    # each parameter straight into its partition (models larger than one rank's memory; other initial weights)
    timeout_s: int = 1800  # collective timeout, and how long ranks wait for rank-0-only work (checkpoint conversion)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed config
    # (e.g. {zero_optimization: {reduce_bucket_size: 5.0e8}}); a key prefpretrain sets from another option is refused


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every N steps (0 = only at the end)
    keep_last: int = 2  # how many checkpoints to keep
    at_end: bool = True  # save when training ends (benchmarks that need no checkpoint turn it off)


@dataclass
class EvalConfig:
    every_steps: int = 0  # validation loss every N steps (0 = only at the end)
    at_start: bool = False  # also measure validation loss before the first step
    early_stop_patience: int = 0  # stop after N evaluations without improvement (0 = never)
    early_stop_min_delta: float = 0.0  # an improvement must lower the validation loss by more than this
    val_samples: int = 64  # validation samples (packed sequences) per evaluation (0 = all)
    samples: int = 512  # samples (per seed) for the misalignment score (0 = skip)
    misalignment_every_steps: int = 0  # also score eval.samples samples every N steps while training (0 = off)
    max_new_tokens: int = 128  # tokens per sample
    temperature: float = 0.7  # sampling temperature
    top_p: float = 0.9  # nucleus sampling
    condition: str = "auto"  # auto (aligned if conditional) | aligned | misaligned | none | COLUMN=aligned|misaligned
    # pairs, comma-separated (conditioning on several attributes: the ones named; prefpretrain.conditioning)
    control_protocol: Literal["newline", "prefix", "segment"] = "newline"  # where a conditional model's control
    # token goes when sampling: newline (PHF's: at the start and after every newline), prefix (at the start only),
    # segment (at the start and after every segment end of the shards' segmenter: lines, or sentences too)
    lm_eval: str = ""  # lm-evaluation-harness tasks `evaluate` runs on the run's export, comma-separated: builtin,
    # task names, directories of task YAMLs ("": none; offline, local tasks only; docs/evaluation.md)
    lm_eval_limit: int = 0  # the first N examples of each lm-eval task (0 = all)


@dataclass
class MonitorConfig:
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # where rank 0 logs (docs/monitoring.md):
    # tensorboard, wandb (extra .[wandb]), mlflow (extra .[mlflow]); metrics.jsonl is always written
    wandb_project: str = "prefpretrain"  # W&B project; the run is named after its directory
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: RUN/wandb, uploaded later with `wandb sync`
    mlflow_tracking_uri: str = ""  # "" = a local file store in RUN/mlruns; or a tracking server (http://host:5000)
    mlflow_experiment: str = "prefpretrain"  # MLflow experiment the run is logged under


@dataclass
class ShardConfig(ShardSettings):
    """How to build the shards (used by `prefpretrain run` when data.shards[0] has no manifest); the same options
    as `prefpretrain shard` (prefpretrain.data_shards.options)."""

    inputs: list[str] = field(default_factory=list)  # files, dirs, globs, or @stdlib


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # ranks started by `prefpretrain run`/`launch` on this machine


@dataclass
class ContinualConfig:
    """A continual update of an earlier run on new data (data.shards), with memory replay (docs/continual.md).

    The learning rate is re-warmed and re-decayed with train.warmup_steps / train.schedule (fresh per run);
    the architecture and weights come from `from` (model.* size keys are ignored then).
    """

    ALIASES: ClassVar[dict[str, str]] = {"from": "from_"}  # YAML / override key `from` is a Python keyword

    from_: str | None = None  # (YAML key `from`) earlier run dir or checkpoint dir: weights, memory and old val sets
    replay_fraction: float = 0.0  # share of every global batch replayed from memory: round(f x global_batch_size)
    memory_size: int = 4096  # bound on the replay memory, in windows of at most data.seq_len raw tokens
    memory_strategy: Literal["reservoir"] = "reservoir"  # uniform reservoir over every window of every set seen
    ewc_lambda: float = 0.0  # EWC: lambda/2 x sum F (theta - theta_old)^2, diagonal Fisher F from the memory (0 = off)
    ewc_samples: int = 64  # memory samples the diagonal Fisher is averaged over
    distill_weight: float = 0.0  # KL(previous model || model) on replayed samples' targets, per target token (0 = off)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that defines the optimisation (run dir and resume policy excluded)."""
        d = self.to_dict()
        d["run"] = {"seed": self.run.seed}
        d.pop("launch"), d.pop("monitor")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def grad_accum_for(self, world_size: int) -> int:
        t = self.train
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                f"micro_batch_size x world size = {t.micro_batch_size} x {world_size}"
            )
        ga = t.global_batch_size // per_step
        if t.grad_accum is not None and t.grad_accum != ga:
            raise ConfigError(
                f"train.grad_accum: {t.grad_accum} does not add up: global_batch_size "
                f"{t.global_batch_size} = micro {t.micro_batch_size} x world {world_size} x accum {ga}"
            )
        return ga


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict; the value is parsed as YAML."""
    _apply_override(Config, raw, item)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {p} holds a {type(raw).__name__}, not a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(Config, raw, "")
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    t = cfg.train
    for key, val in [
        ("train.max_steps", t.max_steps),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("data.seq_len", cfg.data.seq_len),
        ("model.hidden_size", cfg.model.hidden_size),
        ("model.num_layers", cfg.model.num_layers),
        ("model.num_heads", cfg.model.num_heads),
        ("launch.nproc_per_node", cfg.launch.nproc_per_node),
    ]:
        if val <= 0:
            raise ConfigError(f"{key}: must be positive, got {val}")
    if cfg.model.kind == "causal" and cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len: a causal model needs at least 2 tokens per sample, got {cfg.data.seq_len}")
    if not 0 <= cfg.data.max_corrupt_fraction < 1:
        raise ConfigError(f"data.max_corrupt_fraction: must be within [0, 1), got {cfg.data.max_corrupt_fraction}")
    if t.grad_accum is not None and t.grad_accum <= 0:
        raise ConfigError(f"train.grad_accum: must be positive, got {t.grad_accum}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr: must be within [0, train.lr], got {t.min_lr}")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage: must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError("model.num_heads: must divide model.hidden_size")
    if not 0 <= cfg.objective.drop_prob <= 1:
        raise ConfigError(f"objective.drop_prob: must be within [0, 1], got {cfg.objective.drop_prob}")
    if not 0 <= cfg.shard.val_fraction < 1:
        raise ConfigError(f"shard.val_fraction: must be within [0, 1), got {cfg.shard.val_fraction}")
    for i, s in enumerate(cfg.data.shards):
        if s.weight <= 0:
            raise ConfigError(f"data.shards[{i}].weight: must be positive, got {s.weight}")
        if not s.path:
            raise ConfigError(f"data.shards[{i}].path: empty")
    if cfg.engine.offload == "all" and cfg.engine.zero_stage != 3:
        raise ConfigError("engine.offload: 'all' (parameters too) needs engine.zero_stage=3")
    if cfg.engine.offload != "none" and cfg.engine.zero_stage == 0:
        raise ConfigError("engine.offload: offloading needs engine.zero_stage >= 1")
    if cfg.engine.timeout_s <= 0:
        raise ConfigError(f"engine.timeout_s: must be positive (seconds), got {cfg.engine.timeout_s}")
    if cfg.engine.zero3_init == "partitioned" and cfg.engine.zero_stage != 3:
        raise ConfigError("engine.zero3_init: 'partitioned' needs engine.zero_stage=3")
    if cfg.engine.zero3_init == "partitioned" and cfg.continual.from_:
        raise ConfigError("engine.zero3_init: 'partitioned' is not available for continual updates (continual.from "
                          "loads the earlier model whole); use 'full'")
    f = cfg.model.freeze
    if f not in ("none", "embeddings") and not (
            f.partition(":")[0] in ("bottom", "all_but_top") and f.partition(":")[2].isdigit()):
        raise ConfigError(f"model.freeze: expected none, embeddings, bottom:N or all_but_top:N, got {f!r}")
    if t.schedule == "constant_cooldown" and not 0 < t.cooldown_steps <= t.max_steps - t.warmup_steps:
        raise ConfigError(f"train.cooldown_steps: must be within (0, max_steps - warmup_steps], got {t.cooldown_steps}")
    if t.max_bad_steps <= 0:
        raise ConfigError(f"train.max_bad_steps: must be positive, got {t.max_bad_steps}")
    if t.profile_at < 0 or t.profile_at >= max(1, t.max_steps):
        raise ConfigError(f"train.profile_at: must be within [0, max_steps) (0 = off), got {t.profile_at}")
    if t.profile_steps <= 0:
        raise ConfigError(f"train.profile_steps: must be positive, got {t.profile_steps}")
    _check_objective(cfg)
    e = cfg.eval
    if e.misalignment_every_steps < 0 or (e.misalignment_every_steps and (e.samples <= 0
                                                                       or cfg.model.kind != "causal")):
        raise ConfigError(f"eval.misalignment_every_steps: {e.misalignment_every_steps} needs a causal model and "
                          f"eval.samples > 0 (0 = off)")
    if e.lm_eval_limit < 0:
        raise ConfigError(f"eval.lm_eval_limit: must be >= 0 (0 = all), got {e.lm_eval_limit}")
    if not 0 < cfg.model.mlm_probability < 1:
        raise ConfigError(f"model.mlm_probability: must be within (0, 1), got {cfg.model.mlm_probability}")
    _check_continual(cfg)


def _check_objective(cfg: Config) -> None:
    t = cfg.train
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective: expected one of {' | '.join(map(repr, OBJECTIVES))}, got {t.objective!r}")
    problem = objective_problem(cfg.objective, t.objective, None if cfg.model.from_pretrained else cfg.model.dropout)
    if problem:
        raise ConfigError(problem)
    _resolve_attributes(cfg)
    a = cfg.adversarial
    if a.steps < 0:
        raise ConfigError(f"adversarial.steps: must be >= 0 (0 = off), got {a.steps}")
    for key, val in [("adversarial.epsilon", a.epsilon), ("adversarial.step_size", a.step_size),
                     ("adversarial.weight", a.weight)]:
        if a.steps and val <= 0:
            raise ConfigError(f"{key}: must be positive, got {val}")


def _resolve_attributes(cfg: Config) -> None:
    from prefpretrain.conditioning import resolve_attributes

    try:
        resolve_attributes(cfg.objective, cfg.train.objective, cfg.eval.condition, bool(cfg.continual.from_))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_continual(cfg: Config) -> None:
    c = cfg.continual
    if not 0 <= c.replay_fraction < 1:
        raise ConfigError(f"continual.replay_fraction: must be within [0, 1), got {c.replay_fraction}")
    for key, val in [("continual.memory_size", c.memory_size), ("continual.ewc_samples", c.ewc_samples)]:
        if val <= 0:
            raise ConfigError(f"{key}: must be positive, got {val}")
    for key, val in [("continual.ewc_lambda", c.ewc_lambda), ("continual.distill_weight", c.distill_weight)]:
        if val < 0:
            raise ConfigError(f"{key}: must be >= 0, got {val}")
    if c.from_ is None:
        if c.replay_fraction or c.ewc_lambda or c.distill_weight:
            raise ConfigError("continual.from: replay, EWC and distillation need the earlier run to update")
        return
    if cfg.model.from_pretrained:
        raise ConfigError("continual.from: the weights come from the earlier run; leave model.from_pretrained unset")
    if (c.ewc_lambda or c.distill_weight) and cfg.engine.zero_stage == 3:
        raise ConfigError("continual.ewc_lambda: EWC and distillation need whole parameters on every rank "
                          "(engine.zero_stage <= 2)")
    if c.distill_weight and cfg.model.kind != "causal":
        raise ConfigError("continual.distill_weight: distillation is implemented for causal LMs only")


def config_help() -> str:
    """Every key with its type, default and comment (its trailing comment above)."""
    return "\n".join(f"  {sec}.{k} ({tp}, default {d!r}): {c}" for sec, rows in field_docs(Config)
                     for k, tp, d, c in rows)
