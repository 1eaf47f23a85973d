"""`prefpretrain generate`: samples from an exported HF directory or a run directory, on a GPU when there is one."""
from __future__ import annotations

import json
from pathlib import Path

from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.rundir import RunDir
from prefpretrain.trainer.sampling import sample_texts


def _load(model_dir: Path, device: str):
    from prefpretrain.trainer.finished import inference_placement

    if (model_dir / "config.json").is_file():  # an export: in its training precision on a GPU, fp32 on the CPU
        from prefpretrain.trainer.model import load_model_dir

        info = model_dir / "prefpretrain.json"
        precision = json.loads(info.read_text()).get("precision", "bf16") if info.is_file() else "bf16"
        dev, dtype = inference_placement(device, precision)
        model = load_model_dir(model_dir).to(device=dev, dtype=dtype).eval()
        return model, toklib.load_tokenizer(model_dir)
    if RunDir(model_dir).checkpoints.is_dir():  # a run directory
        from prefpretrain.trainer.finished import FinishedRun

        fr = FinishedRun.open(model_dir, "model_dir")
        dev, dtype = inference_placement(fr.cfg.engine.device if device == "auto" else device, fr.cfg.train.precision)
        return fr.load_model(dev, dtype), toklib.load_tokenizer(fr.shards().tokenizer_dir)
    raise FileNotFoundError(f"{model_dir}: neither an exported model (config.json) nor a run directory")


def generate_cli(model_dir: str, prompt: str, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 condition: str, seed: int, device: str = "auto", protocol: str = "newline") -> list[str]:
    model, tok = _load(Path(model_dir), device)
    max_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    texts = sample_texts(model, tok, toklib.special_ids(tok), n, max_new_tokens, condition=condition,
                         temperature=temperature, top_p=top_p, seed=seed, max_positions=max_pos,
                         prompt_ids=prompt_ids, protocol=protocol)
    return [prompt + t for t in texts]
