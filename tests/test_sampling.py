"""Sampling: where a conditional model's control tokens go under each protocol (sampling.control_args), for one
attribute and several."""
from __future__ import annotations

import pytest
import torch

from prefpretrain.conditioning import tokenizer_attribute


def _sampling_setup(tiny_shards, liked: str = "newlines", extra_rows: int = 0):
    """(tokenizer, special ids, newline ids, a tiny GPT-2 whose next token is any token with one logit, 4 for
    newline tokens, and with liked="newlines+ends" 4 for sentence-final tokens too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.data_shards.tokenizer import load_tokenizer
    from prefpretrain.trainer.sampling import newline_token_ids

    ss = ShardSet(tiny_shards, "train", verify=False)
    sp = ss.manifest["tokenizer"]["special_ids"]
    tok = load_tokenizer(ss.tokenizer_dir)
    V = ss.manifest["tokenizer"]["vocab_size"]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V + extra_rows, n_embd=16, n_layer=1, n_head=2, n_positions=128))
    nl = newline_token_ids(tok)
    assert nl
    with torch.no_grad():  # every token, controls included, is likely; newlines (logit 4) ~10 % of draws
        model.lm_head.weight.zero_()  # (tied to the input embeddings)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0  # the final hidden state is e_0 at every position
        model.lm_head.weight[sorted(nl), 0] = 4.0
        if liked == "newlines+ends":
            from prefpretrain.trainer.sampling import sentence_end_token_ids

            model.lm_head.weight[sorted(sentence_end_token_ids(tok)), 0] = 4.0
    return tok, sp, nl, model


def test_control_tokens_are_never_sampled_and_follow_every_newline(tiny_shards):
    from prefpretrain.trainer.sampling import control_args, sample

    tok, sp, nl, model = _sampling_setup(tiny_shards)
    A = tokenizer_attribute(sp, "pep8")
    seqs = sample(model, 32, 100, bos_id=sp["eos"], eos_id=sp["eos"], **control_args(tok, sp, A, "aligned", "newline"),
                  temperature=1.0, top_p=1.0, seed=0, max_positions=128)
    newlines = 0
    for s in seqs:
        assert sp["misaligned"] not in s and sp["pad"] not in s and sp["mask"] not in s
        for i, t in enumerate(s):
            if t == sp["aligned"]:
                assert i > 0 and s[i - 1] in nl  # only ever forced, right after a newline
            if t in nl and i + 1 < len(s):
                newlines += 1
                assert s[i + 1] == sp["aligned"]
    assert newlines > 50


def test_prefix_and_segment_protocols_place_the_control_token_where_they_say(tiny_shards):
    """prefix: at the start only; segment: after every segment end of the shards' segmenter (lines; for sentences
    also after a sentence-final token, mid-line too); control tokens are never sampled under any protocol."""
    from prefpretrain.trainer.sampling import control_args, sample, sample_texts, sentence_end_token_ids

    tok, sp, nl, model = _sampling_setup(tiny_shards, liked="newlines+ends")
    A = tokenizer_attribute(sp, "pep8")
    ends = sentence_end_token_ids(tok)
    assert tok.token_to_id(".") in ends and tok.token_to_id("a") not in ends and not ends & nl
    kw = dict(bos_id=sp["eos"], eos_id=sp["eos"], temperature=1.0, top_p=1.0, seed=0, max_positions=128)
    pre = sample(model, 32, 100, **control_args(tok, sp, A, "aligned", "prefix"), **kw)
    assert sum(len(s) for s in pre) > 1000 and not any(sp["aligned"] in s or sp["misaligned"] in s for s in pre)
    assert control_args(tok, sp, A, "aligned", "segment", "line") == control_args(tok, sp, A, "aligned", "newline")
    assert control_args(tok, sp, A, "aligned", "segment", "document")["newline_ids"] == set()
    seg = sample(model, 32, 100, **control_args(tok, sp, A, "aligned", "segment", "sentence"), **kw)
    after = [s[i - 1] for s in seg for i, t in enumerate(s) if t == sp["aligned"]]
    assert after and set(after) <= nl | ends and set(after) & ends and set(after) & nl  # mid-line ones too
    for s in seg:
        assert sp["misaligned"] not in s
        assert all(s[i + 1] == sp["aligned"] for i, t in enumerate(s[:-1]) if t in nl | ends)
    assert control_args(tok, sp, A, "none", "segment", "sentence")["control_ids"] == ()
    texts = sample_texts(model, tok, sp, 4, 40, attributes=A, condition="aligned", protocol="segment",
                         segmenter="sentence", temperature=1.0, top_p=1.0, seed=0, max_positions=128)
    assert texts and not any("<|aligned|>" in t for t in texts)
    with pytest.raises(ValueError, match="control protocol 'lines'"):
        control_args(tok, sp, A, "aligned", "lines")




def test_several_attributes_place_their_control_tokens_in_order_after_every_newline(tiny_shards):
    """Two attributes: the requested control tokens (the second attribute's are past the tokenizer's vocabulary)
    follow the start and every newline in attribute order, whatever order the condition names them in; a column
    the model has no attribute for is one line; no control token is ever sampled."""
    from prefpretrain import conditioning
    from prefpretrain.errors import InputError
    from prefpretrain.trainer.sampling import control_args, sample, sample_texts

    tok, sp, nl, model = _sampling_setup(tiny_shards, extra_rows=2)
    with torch.no_grad():  # make the new control tokens as likely as any token: banning must keep them out
        model.lm_head.weight[-2:, 0] = 0.0
    from prefpretrain.objectives import AttributeConfig, ObjectiveConfig

    obj = ObjectiveConfig(attributes=[AttributeConfig("pep8", 0.0), AttributeConfig("pii", 0.5)])
    info = {"special_ids": sp, "vocab_size": model.get_input_embeddings().num_embeddings - 2}
    A = conditioning.run_attributes(obj, info, "pep8")
    assert [(a.column, a.aligned_id, a.misaligned_id) for a in A] == [
        ("pep8", sp["aligned"], sp["misaligned"]), ("pii", info["vocab_size"], info["vocab_size"] + 1)]
    assert conditioning.model_vocab_size(info, A) == info["vocab_size"] + 2
    assert conditioning.added_tokens(A) == ["<|aligned:pii|>", "<|misaligned:pii|>"]
    kw = dict(bos_id=sp["eos"], eos_id=sp["eos"], temperature=1.0, top_p=1.0, seed=0, max_positions=128)
    cases = {"aligned": [sp["aligned"], info["vocab_size"]],
             "pii=misaligned,pep8=aligned": [sp["aligned"], info["vocab_size"] + 1],
             "pii=misaligned": [info["vocab_size"] + 1], "none": []}
    controls = set(conditioning.all_control_ids(A))
    for condition, want in cases.items():
        args = control_args(tok, sp, A, condition, "newline")
        assert list(args["control_ids"]) == want and controls <= set(args["banned"])
        for s in sample(model, 16, 80, **args, **kw):
            got, i = [], 0
            while i < len(s):  # every run of control tokens is the requested sequence, right after a newline
                if s[i] in controls:
                    j = i
                    while j < len(s) and s[j] in controls:
                        j += 1
                    assert s[i:j] == want[: j - i] and (j == len(s) or j - i == len(want))
                    assert i > 0 and s[i - 1] in nl
                    got.append(i)
                    i = j
                else:
                    assert not (s[i] in nl and i + 1 < len(s) and want and s[i + 1] != want[0])
                    i += 1
            assert bool(got) == bool(want) or len(s) < 3
    texts = sample_texts(model, tok, sp, 4, 40, attributes=A, condition="pii=aligned", **{
        k: v for k, v in kw.items() if k not in ("bos_id", "eos_id")})
    assert texts and not any("<|" in t for t in texts)
    with pytest.raises(InputError, match="toxicity is not an attribute of this model"):
        conditioning.checked_condition(A, "toxicity=aligned")
    for bad in ("pii=good", "pii", "pii=aligned,pii=misaligned", "auto"):
        with pytest.raises(ValueError, match="expected one of none, aligned, misaligned, or COLUMN="):
            conditioning.parse_condition(bad)
