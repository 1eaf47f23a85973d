"""`prefpretrain generate`: samples from an exported HF directory or a run directory, on a GPU when there is one."""
from __future__ import annotations

import json
from pathlib import Path

from prefpretrain import conditioning
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.rundir import RunDir
from prefpretrain.trainer.sampling import sample_texts


def _load(model_dir: Path, device: str):
    """(model, tokenizer, {segmenter: the shard set's (where `segment` sampling inserts control tokens),
    control_protocol: the run's eval.control_protocol, attributes: what it was conditioned on})"""
    from prefpretrain.trainer.finished import inference_placement

    if (model_dir / "config.json").is_file():  # an export: in its training precision on a GPU, fp32 on the CPU
        from prefpretrain.trainer.model import load_model_dir

        f = model_dir / "prefpretrain.json"
        info = json.loads(f.read_text()) if f.is_file() else {}
        dev, dtype = inference_placement(device, info.get("precision", "bf16"))
        model, tok = load_model_dir(model_dir).to(device=dev, dtype=dtype).eval(), toklib.load_tokenizer(model_dir)
        attributes = (conditioning.from_tokens(info["attributes"], tok) if "attributes" in info else
                      conditioning.tokenizer_attribute(toklib.special_ids(tok), info.get("score_column", "score")))
        return model, tok, {"segmenter": info.get("segmenter", "line"), "attributes": attributes,
                            "control_protocol": info.get("control_protocol", "newline")}
    if RunDir(model_dir).checkpoints.is_dir():  # a run directory
        from prefpretrain.trainer.data import run_attributes
        from prefpretrain.trainer.finished import FinishedRun

        fr = FinishedRun.open(model_dir, "model_dir")
        dev, dtype = inference_placement(fr.cfg.engine.device if device == "auto" else device, fr.cfg.train.precision)
        ss = fr.shards()
        return fr.load_model(dev, dtype), toklib.load_tokenizer(ss.tokenizer_dir), {
            "segmenter": ss.manifest["segmenter"], "control_protocol": fr.cfg.eval.control_protocol,
            "attributes": run_attributes(fr.cfg, ss.manifest)}
    raise FileNotFoundError(f"{model_dir}: neither an exported model (config.json) nor a run directory")


def generate_cli(model_dir: str, prompt: str, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 condition: str, seed: int, device: str = "auto", protocol: str | None = None) -> list[str]:
    """Samples; `protocol` None: the one the run (or the export's run) evaluates with."""
    model, tok, meta = _load(Path(model_dir), device)
    max_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    conditioning.checked_condition(meta["attributes"], condition)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    texts = sample_texts(model, tok, toklib.special_ids(tok), n, max_new_tokens, attributes=meta["attributes"],
                         condition=condition,
                         temperature=temperature, top_p=top_p, seed=seed, max_positions=max_pos,
                         prompt_ids=prompt_ids, protocol=protocol or meta["control_protocol"],
                         segmenter=meta["segmenter"])
    return [prompt + t for t in texts]
