"""Document-masked packing (data.document_mask): inside a packed window a document attends to itself only and
its positions start at 0, so its logits are those it has alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prefpretrain.config import ModelConfig
from prefpretrain.data_shards.packing import PackedSet
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.objectives import layout_for
from prefpretrain.trainer.model import build_model, lm_inputs, varlen_kwargs

SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "aligned": 3, "misaligned": 4, "mask": 5}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_document_in_a_packed_window_has_the_logits_it_has_alone(arch, kernel):
    torch.manual_seed(0)
    mc = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, attn_implementation=kernel)
    model = build_model(mc, vocab_size=64, seq_len=48, special=SPECIAL, precision="fp32").eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(6, 64, (n,), generator=g) for n in (13, 20, 15)]  # the window holds 3 documents
    window = {"input_ids": torch.cat(docs)[None],
              "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}
    with torch.no_grad():
        packed = model(**lm_inputs(window)).logits[0]
        unmasked = model(input_ids=window["input_ids"]).logits[0]
        start = 0
        for d in docs:
            alone = model(input_ids=d[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, atol=1e-5, rtol=1e-5)
            if start:  # without the mask a later document reads the ones before it (so the check above can fail)
                assert (unmasked[start:start + len(d)] - alone).abs().max() > 1e-3
            start += len(d)


def test_packed_samples_restart_positions_where_documents_start(tiny_shards):
    ss = ShardSet(tiny_shards)
    sp = ss.manifest["tokenizer"]["special_ids"]
    for kind in ("mle", "conditional"):
        layout = layout_for(kind, 0.0, 0.1, 1, sp)
        masked, plain = PackedSet(ss, layout, 64, document_mask=True), PackedSet(ss, layout, 64)
        starts = set(masked.cum[:-1].tolist())
        for i in range(len(masked)):
            x, y = masked[i], plain[i]
            assert "position_ids" not in y and all((x[k] == y[k]).all() for k in y)  # same tokens, same labels
            pos = x["position_ids"]
            restart = {i * 64 + t for t in range(1, 64) if pos[t] == 0}
            # exactly at the EOS before a document's start (it opens the document's block)
            assert restart == {s - 1 for s in starts if i * 64 < s - 1 < (i + 1) * 64}
            assert all(x["input_ids"][t - i * 64] == sp["eos"] for t in restart)
            assert pos[0] == 0 and all(pos[t] in (0, pos[t - 1] + 1) for t in range(1, 64))
    mlm = PackedSet(ss, layout_for("mle", 0.0, 0.0, 1, sp), 64, mlm=object(), document_mask=True)
    assert not mlm.document_mask  # masked LMs: not applied (their bidirectional block mask is not wired)


def test_a_packed_document_starts_as_a_sample_does(tiny_shards):
    """Training and sampling see a document's start alike: sampling prompts [EOS] (MLE) or [EOS, control] and a
    packed document's block opens with the EOS before it, so the logits there equal those of the bare prompt."""
    ss = ShardSet(tiny_shards)
    sp = ss.manifest["tokenizer"]["special_ids"]
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="gpt2", hidden_size=32, num_layers=2, num_heads=2), vocab_size=512,
                        seq_len=64, special=sp, precision="fp32").eval()
    for kind in ("mle", "conditional"):
        ps = PackedSet(ss, layout_for(kind, 0.0, 0.0, 1, sp), 64, document_mask=True)
        x = next(ps[i] for i in range(len(ps)) if (ps[i]["position_ids"][1:] == 0).any())
        t = int(np.flatnonzero(x["position_ids"][1:] == 0)[0]) + 1  # a block inside the window
        assert x["input_ids"][t] == sp["eos"]
        prompt = [sp["eos"]] + ([int(x["input_ids"][t + 1])] if kind == "conditional" else [])
        if kind == "conditional":
            assert prompt[1] in (sp["aligned"], sp["misaligned"])  # (drop_prob 0: every segment has its token)
        batch = {k: torch.as_tensor(x[k])[None] for k in ("input_ids", "position_ids")}
        with torch.no_grad():
            packed = model(**lm_inputs(batch)).logits[0, t: t + len(prompt)]
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_lm_inputs_passes_positions_without_a_cache_and_selects_rows():
    b = {"input_ids": torch.arange(12).view(3, 4), "position_ids": torch.tensor([[0, 1, 0, 1]] * 3),
         "labels": torch.zeros(3, 4)}
    got = lm_inputs(b, rows=torch.tensor([True, False, True]))
    assert set(got) == {"input_ids", "position_ids", "use_cache"} and got["use_cache"] is False
    assert got["input_ids"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert set(lm_inputs({"input_ids": b["input_ids"]})) == {"input_ids"}
    assert np.array_equal(lm_inputs(b)["position_ids"].numpy(), b["position_ids"].numpy())


def test_flash_attention_gets_every_rows_documents_as_variable_length_arguments():
    """transformers infers flash-attention's variable-length call from position ids only for a batch of one row
    (else it runs dense causal attention across documents): lm_inputs gives them for every row, as transformers
    computes them for the flattened batch."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    got = varlen_kwargs(pos)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(pos.reshape(1, -1))
    assert got["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 5, 8, 14, 16]
    assert got["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert got["max_length_q"] == got["max_length_k"] == int(max_q) == int(max_k) == 6

    class Flash:
        config = type("C", (), {"_attn_implementation": "flash_attention_2"})()

    batch = {"input_ids": torch.zeros_like(pos), "position_ids": pos}
    assert set(lm_inputs(batch, model=Flash())) == {"input_ids", "position_ids", "use_cache", *got}
    sdpa = type("M", (), {"config": type("C", (), {"_attn_implementation": "sdpa"})()})()
    assert set(lm_inputs(batch, model=sdpa)) == {"input_ids", "position_ids", "use_cache"}
