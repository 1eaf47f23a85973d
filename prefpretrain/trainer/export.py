"""A run's newest checkpoint -> a HF `save_pretrained` directory (safetensors + tokenizer)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prefpretrain.trainer.finished import FinishedRun

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    from prefpretrain.data_shards.columns import scorer_of
    from prefpretrain.data_shards.tokenizer import hf_tokenizer
    from prefpretrain.objectives import eval_condition

    fr, out = FinishedRun.open(run_dir), Path(out_dir)
    model, ckpt, state, cfg = fr.load_model(), fr.ckpt, fr.state, fr.cfg
    ss = fr.shards("train")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    hf_tokenizer(ss.tokenizer_dir).save_pretrained(str(tmp))
    info = {
        "exported_from": str(ckpt), "step": state["step"], "tokens_seen": state.get("tokens_seen"),
        "objective": cfg.train.objective, "tokenizer_hash": ss.tokenizer_hash,
        "control_tokens": {"aligned": "<|aligned|>", "misaligned": "<|misaligned|>"},
        "scorer": scorer_of(ss.manifest, ss.score_column), "score_column": ss.score_column,
        "threshold": cfg.objective.threshold, "segmenter": ss.manifest["segmenter"], "precision": cfg.train.precision,
        "conditioning": (f"prefix <|aligned|> and place it by the {cfg.eval.control_protocol!r} protocol "
                         f"(docs/objectives.md)" if eval_condition(cfg.train.objective) == "aligned" else "none"),
        "control_protocol": cfg.eval.control_protocol,
    }
    (tmp / "prefpretrain.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported step %d to %s", state["step"], out)
    return out
