"""`prefpretrain generate`: samples from an exported HF directory or a run directory."""
from __future__ import annotations

from pathlib import Path

from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.trainer.sampling import sample_texts


def _load(model_dir: Path):
    if (model_dir / "config.json").is_file():  # an export
        from prefpretrain.trainer.model import load_model_dir

        return load_model_dir(model_dir).float().eval(), toklib.load_tokenizer(model_dir)
    if (model_dir / "checkpoints").is_dir():  # a run directory
        from prefpretrain.config import load_config
        from prefpretrain.data_shards.reader import ShardSet
        from prefpretrain.trainer.export import load_run_model

        cfg = load_config(model_dir / "config.yaml")
        model, _, _ = load_run_model(model_dir)
        return model, toklib.load_tokenizer(ShardSet(cfg.data.shards[0].path, verify=False).tokenizer_dir)
    raise FileNotFoundError(f"{model_dir}: neither an exported model (config.json) nor a run directory")


def generate_cli(model_dir: str, prompt: str, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 condition: str, seed: int) -> list[str]:
    model, tok = _load(Path(model_dir))
    max_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    texts = sample_texts(model, tok, toklib.special_ids(tok), n, max_new_tokens, condition=condition,
                         temperature=temperature, top_p=top_p, seed=seed, max_positions=max_pos,
                         prompt_ids=prompt_ids)
    return [prompt + t for t in texts]

