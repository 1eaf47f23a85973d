"""Build a HF causal or masked LM from the config (any architecture), or load a local directory."""
from __future__ import annotations

import logging
from pathlib import Path

from prefpretrain.config import ModelConfig
from prefpretrain.errors import ConfigError

log = logging.getLogger(__name__)

# per-architecture names for the MLP width and dropout; width/depth/heads/positions use HF's
# common attribute names (GPT-2's config maps them onto n_embd / n_layer / n_head / n_positions)
_MLP = {"gpt2": "n_inner", "gpt_neo": "intermediate_size", "gptj": "n_inner"}
_DROPOUT = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "llama": ("attention_dropout",),
}


def hf_config(mc: ModelConfig, vocab_size: int, seq_len: int, special: dict[str, int]):
    from transformers import AutoConfig

    kw = {
        "vocab_size": vocab_size,
        "hidden_size": mc.hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_heads,
        "max_position_embeddings": seq_len if mc.kind == "causal" else seq_len + 2,
        _MLP.get(mc.arch, "intermediate_size"): mc.intermediate_size or 4 * mc.hidden_size,
        "eos_token_id": special["eos"],
        "bos_token_id": special["eos"],
        "pad_token_id": special["pad"],
    }
    if mc.arch in ("llama", "mistral", "qwen2"):
        kw["num_key_value_heads"] = mc.num_heads
    for name in _DROPOUT.get(mc.arch, ()):
        kw[name] = mc.dropout
    kw.update(mc.extra)
    try:
        return AutoConfig.for_model(mc.arch, **kw)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.arch: {e}") from None


def attention_kernel(wanted: str, cuda: bool, precision: str = "bf16") -> str:
    """model.attn_implementation, or what replaces it here: flash_attention_2 needs CUDA, bf16/fp16 training and
    a flash-attn package that imports (a build against another torch fails at import)."""
    if wanted != "flash_attention_2":
        return wanted
    why = None if cuda else "needs CUDA"
    if why is None and precision == "fp32":
        why = "takes bf16/fp16 only (train.precision is fp32)"
    if why is None:
        try:
            import flash_attn  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError, or a binary built for another torch
            why = f"cannot be used ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if why:
        log.warning("model.attn_implementation: flash_attention_2 %s; using sdpa", why)
        return "sdpa"
    return wanted


def build_model(mc: ModelConfig, vocab_size: int, seq_len: int, special: dict[str, int], cuda: bool = False,
                precision: str = "bf16"):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if mc.kind == "causal" else AutoModelForMaskedLM
    attn = attention_kernel(mc.attn_implementation, cuda, precision)
    for kernel in dict.fromkeys((attn, "eager")):
        try:
            if mc.from_pretrained:
                model = auto.from_pretrained(mc.from_pretrained, local_files_only=True, attn_implementation=kernel,
                                              trust_remote_code=False)
                if model.get_input_embeddings().num_embeddings < vocab_size:
                    raise ConfigError(
                        f"model.from_pretrained: its vocabulary ({model.get_input_embeddings().num_embeddings}) "
                        f"is smaller than the run needs ({vocab_size}: the shards' tokenizer and the control tokens of "
                        f"any attribute past the first)")
                return model
            return auto.from_config(hf_config(mc, vocab_size, seq_len, special), attn_implementation=kernel)
        except ValueError as e:  # an architecture without this kernel: HF says so when building
            if kernel == "eager" or isinstance(e, ConfigError):
                raise
            log.warning("model.attn_implementation: %s is not available for %s (%s); using eager", kernel, mc.arch,
                        str(e).splitlines()[0][:160])
    raise AssertionError("unreachable")


def lm_inputs(batch: dict, dev=None, rows=None, model=None) -> dict:
    """The inputs of `model` for a packed batch (host tensors; rows: a selection of its samples; moved to `dev` if
    given). Every forward over packed samples goes through this. The token ids and, with data.document_mask, the
    position ids that restart per document, with no KV cache: transformers derives its block-diagonal causal
    mask (SDPA, eager) from restarting positions only when there is no cache. flash-attention gets its
    variable-length arguments too: transformers infers them from position ids only for a batch of one row."""
    def sel(t):
        return t if rows is None else t[rows]

    def put(t):
        return t if dev is None else t.to(dev, non_blocking=True)

    out = {"input_ids": put(sel(batch["input_ids"]))}
    if "position_ids" in batch:
        pos = sel(batch["position_ids"])
        out.update(position_ids=put(pos), use_cache=False)
        if "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", "")):
            out.update({k: put(v) if hasattr(v, "to") else v for k, v in varlen_kwargs(pos).items()})
    return out


def varlen_kwargs(pos) -> dict:
    """flash-attention's variable-length arguments for (B, T) position ids that restart at 0 per document: the
    B x T tokens flattened, a sequence starting at every 0 (every row starts with one), as transformers'
    prepare_fa_kwargs_from_position_ids gives them for one flattened row; computed on the host."""
    import torch

    flat = pos.reshape(-1)
    cu = torch.cat([torch.nonzero(flat == 0).flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _linear_head(model):
    import torch.nn as nn

    head = nn.Linear(model.config.hidden_size, 1)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def attach_value_head(model) -> None:
    """AWR's value head: a linear map from the last hidden state to one number per position. It is a
    submodule of the model, so DeepSpeed trains, shards and checkpoints it; export leaves it out."""
    model.value_head = _linear_head(model)


def attach_label_head(model) -> None:
    """The preference-label head (objective.label_head_weight): a linear map from a segment's pooled last hidden
    state to the logit of P(preferred) (prefpretrain.auxiliary). Trained, sharded and checkpointed with the
    model like the value head; a plain export leaves it out, `export --with-heads` keeps it."""
    model.label_head = _linear_head(model)


HEADS = {"value_head": attach_value_head, "label_head": attach_label_head}  # the training heads: name -> attach
HEAD_PREFIXES = tuple(f"{name}." for name in HEADS)  # their weights' keys: not weights of the language model


def run_heads(objective: str, label_head_weight: float) -> list[str]:
    """The training heads a run of this objective and label-head weight has, sorted (checkpoints record them)."""
    from prefpretrain.objectives import get_objective

    return sorted(["value_head"] * get_objective(objective).value_head + ["label_head"] * (label_head_weight > 0))


def attach_heads(model, names) -> None:
    """Attach (untrained) the heads `names` the model does not have yet."""
    for name in names:
        if not hasattr(model, name):
            HEADS[name](model)


def heads_in(state_dict: dict) -> list[str]:
    """The training heads whose weights a state dict holds."""
    return [name for name in HEADS if any(k.startswith(f"{name}.") for k in state_dict)]


def load_model_dir(path: str | Path, kind: str = "causal"):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    return auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                use_safetensors=True)  # (weights from safetensors only: nothing is unpickled)


def has_dropout(model) -> bool:
    """Whether the built model drops anything in training (a dropout module, or a dropout rate in its config that
    its attention applies functionally): the similarity task's dropout views differ only then."""
    import torch.nn as nn

    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    conf = model.config.to_dict()  # (only attention rates: e.g. GPT-2's summary_first_dropout is not the LM's)
    return any(("attn" in k or "attention" in k) and ("dropout" in k or "pdrop" in k) and isinstance(v, float)
               and v > 0 for k, v in conf.items())


def count_params(model) -> int:
    """Parameter elements of the whole model (a ZeRO-3 partitioned parameter knows its size as `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _blocks(model):
    """The transformer's list of blocks (the ModuleList as long as the config's layer count)."""
    import torch.nn as nn

    n = model.config.num_hidden_layers
    for _name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def apply_freeze(model, spec: str) -> int:
    """Freeze parameters by strategy; returns how many parameter elements are frozen.

    embeddings: token (and position) embeddings — with tied weights that includes the LM head.
    bottom:N: embeddings and the first N blocks. all_but_top:N: everything except the top N blocks,
    the final norm and an untied head.
    """
    if spec == "none":
        return 0
    kind, _, n = spec.partition(":")
    emb = {id(p) for p in model.get_input_embeddings().parameters()}
    for name, p in model.named_parameters():
        if "position" in name or "wpe" in name:
            emb.add(id(p))
    frozen: set[int] = set()
    if kind in ("embeddings", "bottom"):
        frozen |= emb
    if kind == "bottom":
        for block in list(_blocks(model))[: int(n)]:
            frozen |= {id(p) for p in block.parameters()}
    if kind == "all_but_top":
        blocks = list(_blocks(model))
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        keep = {id(p) for b in blocks[len(blocks) - int(n):] for p in b.parameters()}
        top = {id(p) for p in model.parameters() if id(p) not in in_blocks and id(p) not in emb}  # final norm, head
        frozen = {id(p) for p in model.parameters()} - keep - top
    count = 0
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            count += getattr(p, "ds_numel", p.numel())
    return count
