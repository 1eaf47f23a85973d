"""Forgetting: validation loss on every earlier validation set before and after an update.

RUN/forgetting.json:
  {"old": {NAME: {"path", "before", "after", "forgetting"}},   # earlier validation sets (forgetting = after - before)
   "new": {NAME: {"path", "before", "after"}},                  # the update's own validation set
   "misalignment": {"before", "after"[, "before_parsed", "after_parsed": code, the samples that parse]} (when
   eval.samples > 0), "replay_fraction", "replay_per_batch",
   "memory_size", "from", "step"}
`prefpretrain report` plots `old` (after - before); TensorBoard gets eval/forgetting/NAME (= after - before),
eval/forgetting/NAME/before and .../after, and eval/continual/new_val_loss.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from prefpretrain.data_shards.packing import Layout, MaskSpec, PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.trainer.evaluate import validation_loss

log = logging.getLogger(__name__)


def open_val_sets(named: dict[str, str], layout: Layout, seq_len: int, mlm: MaskSpec | None,
                  verify: bool = True, document_mask: bool = False) -> dict[str, tuple[str, PackedSet]]:
    """The validation split of each named shard set, packed like the update's training data."""
    out = {}
    for name, path in named.items():
        if not (Path(path) / "manifest.json").is_file():
            log.warning("forgetting: validation set %s (%s) is gone; left out of the report", name, path)
            continue
        ps = PackedSet(ShardSet(path, "val", verify=verify), layout, seq_len, mlm, document_mask=document_mask)
        if len(ps) == 0:
            log.warning("forgetting: %s has no %d-token validation sample; left out", path, seq_len)
            continue
        out[name] = (path, ps)
    return out


def losses(model, sets: dict[str, tuple[str, PackedSet]], limit: int, micro: int, rank: int, world: int,
           causal: bool) -> dict[str, dict]:
    """{name: {"path", "loss"}}, every rank taking its share of each set."""
    return {name: {"path": path, "loss": validation_loss(model, ps, limit, micro, rank, world, causal)["val_loss"]}
            for name, (path, ps) in sets.items()}


def report(before: dict, after: dict, extra: dict) -> dict:
    rec: dict = {"old": {}, "new": {}}
    for part in ("old", "new"):
        for name, b in before[part].items():
            a = after[part].get(name)
            if a is None:
                continue
            rec[part][name] = {"path": b["path"], "before": b["loss"], "after": a["loss"]}
            if part == "old":
                rec[part][name]["forgetting"] = a["loss"] - b["loss"]
    if before.get("misalignment") is not None and after.get("misalignment") is not None:
        rec["misalignment"] = {"before": before["misalignment"], "after": after["misalignment"]}
        if before.get("misalignment_parsed") is not None and after.get("misalignment_parsed") is not None:
            rec["misalignment"].update(before_parsed=before["misalignment_parsed"],
                                       after_parsed=after["misalignment_parsed"])  # (code: the samples that parse)
    rec.update(extra)
    return rec


def scalars(rec: dict) -> dict[str, float]:
    out = {}
    for name, v in rec["old"].items():
        out[f"eval/forgetting/{name}"] = v["forgetting"]
        out[f"eval/forgetting/{name}/before"] = v["before"]
        out[f"eval/forgetting/{name}/after"] = v["after"]
    for v in rec["new"].values():
        out["eval/continual/new_val_loss"] = v["after"]
        out["eval/continual/new_val_loss_before"] = v["before"]
    if "misalignment" in rec:
        out["eval/continual/misalignment_before"] = rec["misalignment"]["before"]
        out["eval/continual/misalignment_after"] = rec["misalignment"]["after"]
        if "before_parsed" in rec["misalignment"]:
            out["eval/continual/misalignment_parsed_before"] = rec["misalignment"]["before_parsed"]
            out["eval/continual/misalignment_parsed_after"] = rec["misalignment"]["after_parsed"]
    return out


def summary_lines(run_dir: Path) -> list[str]:
    """Lines for the end-of-run summary (nothing for a run without forgetting.json)."""
    p = Path(run_dir) / "forgetting.json"
    if not p.is_file():
        return []
    rec = json.loads(p.read_text())
    lines = [f"  continual update from {rec.get('from')} with {rec.get('replay_fraction', 0):.0%} replay "
             f"({rec.get('replay_per_batch')} samples per batch)"]
    for name, v in rec["old"].items():
        lines.append(f"  forgetting on {name}: val loss {v['before']:.4f} -> {v['after']:.4f} ({v['forgetting']:+.4f})")
    for name, v in rec["new"].items():
        lines.append(f"  new data {name}: val loss {v['before']:.4f} -> {v['after']:.4f}")
    if "misalignment" in rec:
        m = rec["misalignment"]
        lines.append(f"  misalignment {m['before']:.5f} -> {m['after']:.5f}" +
                     (f" (samples that parse: {m['before_parsed']:.5f} -> {m['after_parsed']:.5f})"
                      if "before_parsed" in m else ""))
    lines.append(f"  forgetting   {p}")
    return lines
