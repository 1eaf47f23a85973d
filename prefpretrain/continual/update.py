"""A continual update (`continual.from` set) as training hooks (prefpretrain.trainer.hooks), passed in by the CLI.

start():  the replay memory for this update (RUN/replay, built once by rank 0: the earlier run's memory, or
          a reservoir over its shard sets), the model (architecture and weights of the earlier run), the
          EWC anchor + Fisher and the distillation teacher (RUN/continual/start.pt, written once, so a resume
          neither recomputes them nor needs the earlier checkpoint's weights), and the validation losses
          *before* the update (RUN/continual/before.json).
initial_model(): the earlier model, to train on.
wrap_dataset(): the dataset that puts round(replay_fraction x G) memory samples in every global batch.
extra_loss(): EWC and distillation terms for one micro batch.
checkpoint_state() / check_resume(): what a checkpoint records about the update, checked at a resume.
finish(): the forgetting report and the memory after this update (RUN/memory = reservoir over RUN/replay
          and every window of data.shards), for the next update.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch

from prefpretrain import auxiliary, distributed
from prefpretrain.config import Config
from prefpretrain.continual import forgetting
from prefpretrain.continual.memory import build_memory
from prefpretrain.continual.previous import resolve
from prefpretrain.continual.regularizers import diagonal_fisher, distill_kl, ewc_penalty
from prefpretrain.continual.replay import ReplayMixDataset, replay_per_batch
from prefpretrain.data_shards.loader import MixtureDataset
from prefpretrain.data_shards.packing import PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.writer import MANIFEST
from prefpretrain.errors import ConfigError
from prefpretrain.objectives import eval_condition
from prefpretrain.rundir import CONTINUAL, FORGETTING, MEMORY, MODEL_CONFIG, REPLAY
from prefpretrain.trainer.hooks import TrainContext, TrainHooks
from prefpretrain.trainer.model import lm_inputs

log = logging.getLogger(__name__)

MEMORY_SEED_SALT = 0x5EED  # the memory's own sample order differs from the new data's


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


class ContinualUpdate(TrainHooks):
    """The training hooks of a continual update (see prefpretrain.trainer.hooks for when each is called)."""

    name = "continual"  # its record in a checkpoint's state.json

    def __init__(self, cfg: Config):
        self.cfg, self.c = cfg, cfg.continual
        self.causal = cfg.model.kind == "causal"
        self.G = cfg.train.global_batch_size
        self.R = replay_per_batch(self.c.replay_fraction, self.G)
        self.model = self.teacher = None
        self.anchor: dict = {}
        self.fisher: dict = {}

    # ------------------------------------------------------------------ set-up
    def start(self, ctx: TrainContext) -> None:
        cfg = self.cfg
        self.run_dir, self.rank, self.world, self.dev = ctx.run_dir, ctx.rank, ctx.world, ctx.device
        self.layout, self.mlm = ctx.layout, ctx.mlm
        self.replay_dir, self.memory_dir, self.dir = (ctx.run_dir / REPLAY, ctx.run_dir / MEMORY,
                                                      ctx.run_dir / CONTINUAL)
        # replayed, samples, ewc sum, ewc n, kl sum, kl tokens: on the device, read once per log window
        self._w = torch.zeros(6, dtype=torch.float64, device=self.dev)
        # long single-rank work (checksums, the memory) on rank 0 while the others wait on the store
        self.prev = distributed.broadcast_object(distributed.rank0_does(
            "verifying the earlier checkpoint", lambda: resolve(cfg.continual.from_)))
        self.dir.mkdir(parents=True, exist_ok=True)
        if "label_head" in self.prev.state.get("heads", ()) and ctx.rank == 0:
            log.warning("continual: the label head of %s is not carried over: the update starts from its language "
                        "model (a new head is trained when objective.label_head_weight > 0)", self.prev.ckpt)
        distributed.rank0_does("building the replay memory", self._build_replay)
        self.memory_packed = PackedSet(ShardSet(self.replay_dir, "train", verify=cfg.data.verify_checksums),
                                       self.layout, cfg.data.seq_len, self.mlm, document_mask=cfg.data.document_mask,
                                       segments=auxiliary.active(cfg.objective))
        if self.R and len(self.memory_packed) == 0:
            raise ConfigError(f"continual.memory_size: the memory {self.replay_dir} yields no {cfg.data.seq_len}-token "
                              f"sample to replay")
        self._load_start(ctx.vocab_size)
        self._measure_before()
        log.info("continual update of %s: %d of %d samples per batch replayed from %d memory samples; EWC lambda "
                 "%g, distillation weight %g", self.prev.ckpt, self.R, self.G, len(self.memory_packed),
                 self.c.ewc_lambda, self.c.distill_weight)

    def initial_model(self):
        return self.model

    def _build_replay(self) -> None:
        if (self.replay_dir / MANIFEST).is_file():
            return
        start, stream = self.prev.memory_source()
        log.info("continual: replay memory from %s + %s (reservoir of %d windows)", start, stream, self.c.memory_size)
        build_memory(self.replay_dir, start, stream, self.c.memory_size, self.cfg.data.seq_len, self.cfg.run.seed,
                     self.cfg.data.verify_checksums)

    def _write_start(self, start: Path) -> None:
        """RUN/continual/start.pt: the earlier weights (the EWC anchor) and, for EWC, their diagonal Fisher."""
        if start.is_file():
            return
        from prefpretrain.trainer.finished import load_run_model

        # on this rank's device (a GPU is free before the engine exists): the Fisher pass is forwards and backwards
        model, _, _ = load_run_model(self.prev.run_dir, self.prev.ckpt, device=self.dev)
        blob: dict = {"anchor": {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}}
        if self.c.ewc_lambda:
            n = min(self.c.ewc_samples, len(self.memory_packed))
            order = MixtureDataset([self.memory_packed], [1.0], self.cfg.run.seed ^ MEMORY_SEED_SALT).order
            samples = [self.memory_packed.get(i, e) for _, i, e in (order(j) for j in range(n))]
            blob["fisher"] = {k: f.cpu() for k, f in diagonal_fisher(model, samples, self.causal).items()}
            log.info("continual: diagonal Fisher over %d memory samples (mean %.3g)", n,
                     float(sum(f.sum() for f in blob["fisher"].values()) /
                           sum(f.numel() for f in blob["fisher"].values())))
        tmp = start.with_name("start.pt.tmp")
        torch.save(blob, tmp)
        tmp.replace(start)

    def _load_start(self, vocab_size: int) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

        start = self.dir / "start.pt"
        distributed.rank0_does("loading the earlier weights", lambda: self._write_start(start))
        blob = torch.load(start, map_location="cpu", weights_only=True)
        hf = AutoConfig.from_pretrained(str(self.prev.run_dir / MODEL_CONFIG), local_files_only=True,
                                        trust_remote_code=False)
        auto = AutoModelForCausalLM if self.causal else AutoModelForMaskedLM
        model = auto.from_config(hf)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError("continual.from: the earlier model's vocabulary is smaller than the tokenizer's")
        missing, unexpected = model.load_state_dict(blob["anchor"], strict=False)
        if unexpected or any("lm_head" not in k and "decoder" not in k for k in missing):
            raise RuntimeError(f"{start}: weights do not match the earlier model ({missing}, {unexpected})")
        model.tie_weights()
        self.model = model
        if self.c.ewc_lambda:
            # on the training device once (the penalty reads them every micro step)
            self.anchor = {n: blob["anchor"][n].to(self.dev) for n, _ in model.named_parameters()
                           if n in blob["anchor"]}
            self.fisher = {n: f.to(self.dev) for n, f in blob["fisher"].items()}
        if self.c.distill_weight:  # in the training precision on a GPU (it only runs forwards)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision, torch.float32)
            self.teacher = copy.deepcopy(model).to(device=self.dev,
                                                   dtype=dtype if self.dev.type == "cuda" else torch.float32).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def _val_sets(self) -> tuple[dict, dict]:
        old = self.prev.val_sets()
        new_path = self.cfg.data.reference
        old = {k: v for k, v in old.items() if Path(v).resolve() != Path(new_path).resolve()}
        mk = lambda named: forgetting.open_val_sets(named, self.layout, self.cfg.data.seq_len, self.mlm,  # noqa: E731
                                                   self.cfg.data.verify_checksums, self.cfg.data.document_mask)
        return mk(old), mk({Path(new_path).name: new_path})

    def _measure(self, model) -> dict:
        old, new = self._val_sets()
        e, t = self.cfg.eval, self.cfg.train
        out = {part: forgetting.losses(model, sets, e.val_samples, t.micro_batch_size, self.rank, self.world,
                                       self.causal) for part, sets in (("old", old), ("new", new))}
        out.update(self._misalignment(model))  # every rank samples its share (in lockstep at ZeRO-3)
        return out

    def _misalignment(self, model) -> dict:
        """{"misalignment": mean, "misalignment_parsed": the mean over the samples that parse (code; else None)}."""
        e = self.cfg.eval
        if e.samples <= 0 or not self.causal:
            return {"misalignment": None}
        from prefpretrain.data_shards import tokenizer as toklib
        from prefpretrain.trainer.evaluate import misalignment

        ss = ShardSet(self.cfg.data.reference, "val", verify=False)
        cond = eval_condition(self.cfg.train.objective, e.condition)
        was = model.training
        res = misalignment(model, toklib.load_tokenizer(ss.tokenizer_dir), ss.manifest, n=e.samples,
                           max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, condition=cond,
                           seed=self.cfg.run.seed, max_positions=self.cfg.data.seq_len, rank=self.rank,
                           world=self.world, lockstep=self.cfg.engine.zero_stage == 3, protocol=e.control_protocol)
        model.train(was)
        parsed = res.get("misalignment_parsed")
        return {"misalignment": res["misalignment"], "misalignment_parsed": None if parsed != parsed else parsed}

    def _measure_before(self) -> None:
        p = self.dir / "before.json"
        if not p.is_file():
            self.model.to(self.dev)
            rec = self._measure(self.model)  # the whole earlier model on every rank (not yet partitioned)
            if self.rank == 0:
                p.write_text(json.dumps(rec, indent=1))
            distributed.barrier()
        self.before = json.loads(p.read_text())

    # ------------------------------------------------------------------ training
    def wrap_dataset(self, ds: MixtureDataset) -> ReplayMixDataset:
        mem = MixtureDataset([self.memory_packed], [1.0], self.cfg.run.seed ^ MEMORY_SEED_SALT) if self.R else None
        return ReplayMixDataset(ds, mem, self.G, self.R)

    def extra_loss(self, module, batch: dict, logits: torch.Tensor, scale: float) -> torch.Tensor | None:
        """EWC penalty (once per micro batch: DeepSpeed's 1/accumulation and rank mean make it once per step)
        plus distill_weight x summed KL on replayed targets x the step's per-target-token scale."""
        rep = batch["replay"]
        self._w[0] += int(rep.sum())  # (a host tensor)
        self._w[1] += len(rep)
        total = None
        if self.c.ewc_lambda:
            total = ewc_penalty(module, self.anchor, self.fisher, self.c.ewc_lambda)
            self._w[2] += total.detach().double()
            self._w[3] += 1
        if self.c.distill_weight and bool(rep.any()):
            with torch.no_grad():
                t_logits = self.teacher(**lm_inputs(batch, self.dev, rows=rep, model=self.teacher)).logits
            rows = torch.nonzero(rep).squeeze(1).to(self.dev)  # the replayed rows, picked on the host
            kl, n = distill_kl(logits.index_select(0, rows), t_logits, batch["labels"][rep].to(self.dev),
                               torch.ones(len(rows), dtype=torch.bool, device=self.dev), self.causal)
            self._w[4] += kl.detach().double()
            self._w[5] += n
            term = self.c.distill_weight * kl * scale
            total = term if total is None else total + term
        return total

    def window_values(self) -> dict[str, float]:
        """Since the last call, over all ranks (every rank calls it at the same step)."""
        w = distributed.all_sum(self._w)
        self._w.zero_()
        out = {"data/replay_fraction": w[0] / max(1.0, w[1])}
        if self.c.ewc_lambda:
            out["train/ewc_penalty"] = w[2] / max(1.0, w[3])
        if self.c.distill_weight:
            out["train/distill_kl"] = w[4] / max(1.0, w[5])
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, step: int) -> dict:
        res = json.loads((self.replay_dir / "reservoir.json").read_text())
        return {"from": str(self.prev.ckpt), "replay_memory": _sha(self.replay_dir / MANIFEST),
                "start": _sha(self.dir / "start.pt"), "replay_per_batch": self.R,
                "replay_position": step * self.R, "new_position": step * (self.G - self.R),
                "reservoir": {"capacity": res["capacity"], "seen": res["seen"], "windows": res["windows"]}}

    def check_resume(self, st: dict, ckpt: Path) -> None:
        c = st.get("continual")
        if c is None:
            raise ConfigError(f"run.resume: {ckpt} is not a checkpoint of a continual update, but continual.from is "
                              f"set; use another run.output_dir")
        if c["replay_memory"] != _sha(self.replay_dir / MANIFEST) or c["start"] != _sha(self.dir / "start.pt"):
            raise ConfigError(f"run.resume: {ckpt} was trained with another replay memory or start weights than "
                              f"{self.replay_dir} / {self.dir / 'start.pt'} hold now")
        if c["replay_per_batch"] != self.R:
            raise ConfigError(f"continual.replay_fraction: {ckpt} replayed {c['replay_per_batch']} samples per batch, "
                              f"now {self.R} (it defines the data order; keep it when resuming)")

    # ------------------------------------------------------------------ the end
    def finish(self, module, step: int, mon) -> None:
        """The forgetting report (every rank measures; rank 0 writes it) and the memory for the next update
        (rank 0, the others waiting on the store)."""
        after = self._measure(module)
        rec = forgetting.report(self.before, after, {
            "from": str(self.prev.ckpt), "replay_fraction": self.c.replay_fraction, "replay_per_batch": self.R,
            "memory_size": self.c.memory_size, "ewc_lambda": self.c.ewc_lambda,
            "distill_weight": self.c.distill_weight, "step": step})

        def write() -> None:
            (self.run_dir / FORGETTING).write_text(json.dumps(rec, indent=1))
            mon.scalars(step, forgetting.scalars(rec), kind="forgetting")
            for line in forgetting.summary_lines(self.run_dir):
                log.info("%s", line.strip())
            if not (self.memory_dir / MANIFEST).is_file():
                cfg = self.cfg
                build_memory(self.memory_dir, self.replay_dir, [s.path for s in cfg.data.shards], self.c.memory_size,
                             cfg.data.seq_len, cfg.run.seed, cfg.data.verify_checksums)

        distributed.rank0_does("writing the forgetting report and the memory", write)
