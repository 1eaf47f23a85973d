"""The scorers on their own: lexical, PII, the local HF classifier (batched across documents, its device), and
the fallback to one document at a time when a batch fails."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prefpretrain.data_shards.build import ShardOptions, build_shards
from prefpretrain.data_shards.encode import batch_scores
from prefpretrain.data_shards.reader import ShardSet
from prefpretrain.data_shards.scorers import NoneScorer, get_scorer
from prefpretrain.data_shards.sources import Document


def test_lexical_scorer_prefers_common_usage(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("the cat sat on the mat. the dog sat on the log. " * 50)
    doc = Document("d", "d", "the cat sat on the log. zyx qwv plorp.")
    spans = [(0, 23), (23, 38)]
    rare = get_scorer("lexical", {"reference": str(ref), "top_k": 20}).score(doc, spans)
    assert rare == [0.0, 1.0]
    nll = get_scorer("lexical", {"reference": str(ref), "mode": "ngram_nll"}).score(doc, spans)
    assert 0 < nll[0] < nll[1]
    with pytest.raises(ValueError, match="mode must be"):
        get_scorer("lexical", {"reference": str(ref), "mode": "vibes"})


def test_classifier_scorer_runs_a_local_model_in_batches(tmp_path, tiny_shards):
    from transformers import BertConfig, BertForSequenceClassification

    from prefpretrain.data_shards.tokenizer import hf_tokenizer

    torch.manual_seed(0)
    clf = tmp_path / "clf"
    model = BertForSequenceClassification(BertConfig(
        vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        id2label={0: "fine", 1: "toxic"}, label2id={"fine": 0, "toxic": 1}, pad_token_id=1))
    model.save_pretrained(clf)
    hf_tokenizer(tiny_shards / "tokenizer").save_pretrained(clf)
    doc = Document("d", "d", "one line\nanother line\nthird\nfourth one\n")
    spans = [(0, 9), (9, 22), (22, 28), (28, 39)]
    big = get_scorer("classifier", {"model_dir": str(clf), "label": "toxic"}).score(doc, spans)
    small = get_scorer("classifier", {"model_dir": str(clf), "label": 1, "batch_size": 1}).score(doc, spans)
    assert all(0 <= s <= 1 for s in big) and np.allclose(big, small, atol=1e-5) and len(set(big)) > 1
    other = (Document("o", "o", "a much longer first line here\nx\n"), [(0, 30), (30, 32)])
    batched = batch_scores(get_scorer("classifier", {"model_dir": str(clf), "batch_size": 4}),
                           [other, (Document("e", "e", " "), []), (doc, spans)])  # across documents, by length
    assert batched[1] is None and np.allclose(batched[2], big, atol=1e-5) and len(batched[0]) == 2
    with pytest.raises(ValueError, match="label 'nope' not in"):
        get_scorer("classifier", {"model_dir": str(clf), "label": "nope"})


def test_a_batch_the_scorer_fails_is_scored_document_by_document():
    class Picky:
        def score(self, doc, spans):
            if "bad" in doc.text:
                raise ValueError("no")
            return [1.0] * len(spans)

        def score_many(self, items):
            return [self.score(d, s) for d, s in items]

    docs = [(Document(t, t, t), [(0, 1)]) for t in ("ok", "bad", "fine")]
    assert batch_scores(Picky(), docs) == [None, None, None]  # the block failed: each scored alone after
    assert batch_scores(Picky(), [docs[0], docs[2]], block=1) == [[1.0], [1.0]]
    assert batch_scores(NoneScorer(), docs) == [None, None, None]  # no score_many: each scored alone


def test_pii_scorer_counts_real_items_and_needs_a_literal_at(tmp_path):
    s = get_scorer("pii")
    text = ("Contact me at john.doe@example.com or call (650) 253-0000. I looked at the sky at noon.Then "
            "bob at example dot com left.")
    assert sorted(t for t, _ in s.items(text)) == ["email", "phone"]
    assert ("email", "john.doe@example.com") in s.items(text)
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("Write to ann@python.org for help. The cat sat at home.com today.\n")
    build_shards(ShardOptions(inputs=[str(d)], output=str(tmp_path / "out"), scorer="pii", vocab_size=300,
                              workers=1, val_fraction=0.0, progress=False))
    ss = ShardSet(tmp_path / "out")
    assert ss.manifest["segmenter"] == "sentence" and ss.manifest["scorer"]["params"]["email_requires_at"]
    scores = ss.read(0)["seg_score"]
    assert scores[0] == pytest.approx(1 / len("Write to ann@python.org for help.")) and scores[1] == 0


def test_classifier_scorer_device_is_chosen_and_checked(tmp_path, tiny_shards, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    from prefpretrain.data_shards.tokenizer import hf_tokenizer

    clf = tmp_path / "clf"
    BertForSequenceClassification(BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(clf)
    hf_tokenizer(tiny_shards / "tokenizer").save_pretrained(clf)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = get_scorer("classifier", {"model_dir": str(clf)})
    assert auto._device.type == "cpu" and auto.params["device"] == "auto"  # auto without a GPU
    with pytest.raises(ValueError, match="sees no GPU"):
        get_scorer("classifier", {"model_dir": str(clf), "device": "cuda"})
