"""Byte-level BPE trained offline with HF `tokenizers`, or loaded from a local directory.

The pre-tokenizer splits after every newline, so no token spans two lines: a line segment
starts at a token boundary and the evaluation can re-insert a control token after any token
that ends a line.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ALIGNED = "<|aligned|>"
MISALIGNED = "<|misaligned|>"
MASK = "[MASK]"
SPECIAL_TOKENS = [EOS, PAD, ALIGNED, MISALIGNED, MASK]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> str:
    """Write tokenizer.json and HF wrapper files (AutoTokenizer loads the dir offline); return hash."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=PAD,
        mask_token=MASK, additional_special_tokens=[ALIGNED, MISALIGNED],
    )
    fast.save_pretrained(str(out))
    return tokenizer_hash(out)


def load_tokenizer(path: str | Path):
    """Load `tokenizer.json` from a directory (ours or any HF fast-tokenizer dir)."""
    from tokenizers import Tokenizer

    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(f))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def tokenizer_hash(path: str | Path) -> str:
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16]


def special_ids(tok) -> dict[str, int]:
    return {name: tok.token_to_id(t) for name, t in
            [("eos", EOS), ("pad", PAD), ("aligned", ALIGNED), ("misaligned", MISALIGNED), ("mask", MASK)]}


def hf_tokenizer(path: str | Path):
    """The transformers wrapper, for export and generation."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
