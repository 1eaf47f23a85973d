"""Offline retrieval evaluation (prefpretrain/trainer/retrieval.py): pairs, the metric, `evaluate --retrieval`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prefpretrain.errors import InputError
from prefpretrain.trainer import retrieval
from tests.conftest import launch_tiny, run_cli
from tests.ranks import cli_forked

SNIPPET = '''\
def short_doc(x):
    """Too short."""
    a = x
    b = a
    return b


class C:
    def method(self, y):
        """Add one to y and return the result twice over."""
        z = y + 1

        z = z * 2
        return z


def no_doc(x):
    return x


async def fetch(url):
    """Fetch the url and give back its body text."""
    r = await get(url)
    text = r.body
    return text


def tiny_body(v):
    """A docstring of enough words but a one-line body."""
    return v
'''


def test_docstring_pairs_of_a_snippet():
    assert retrieval.docstring_pairs(SNIPPET) == [
        ("Add one to y and return the result twice over.", "z = y + 1\n\nz = z * 2\nreturn z"),
        ("Fetch the url and give back its body text.", "r = await get(url)\ntext = r.body\nreturn text"),
    ]


def test_source_pairs_skip_files_that_do_not_parse(tmp_path):
    (tmp_path / "a.py").write_text(SNIPPET)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("def broken(:\n")
    pairs, bad = retrieval.source_pairs(str(tmp_path))
    assert len(pairs) == 2 and bad == 1
    with pytest.raises(InputError, match="neither 'val' nor a Python file"):
        retrieval.parse_sources(f"val,{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()  # no pair to retrieve: refused before a model is loaded
    with pytest.raises(InputError, match="gives 0 docstring -> body pair"):
        retrieval.parse_sources(f"val,{tmp_path / 'empty'}")


def test_a_form_feed_does_not_shift_a_body_onto_its_docstring():
    """str.splitlines breaks at a form feed, ast does not: the body would start at the docstring."""
    pairs = retrieval.docstring_pairs("\x0c\n" + SNIPPET.replace("\ndef ", "\n\x0c\ndef "))
    assert pairs == retrieval.docstring_pairs(SNIPPET)


def test_unique_pairs_drop_repeats_and_sample_with_the_seed():
    pairs = [("q1", "c1"), ("q1", "c2"), ("q3", "c1"), ("q4", "c4"), ([1, 2], [3]), ((1, 2), (4,))]
    assert retrieval.unique_pairs(pairs, 0, 0) == [("q1", "c1"), ("q4", "c4"), ([1, 2], [3])]
    a, b = retrieval.unique_pairs(pairs, 2, 5), retrieval.unique_pairs(pairs, 2, 5)
    assert a == b and len(a) == 2


def test_identical_embeddings_retrieve_every_pair():
    q = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    res = retrieval.retrieval_metrics(q, q.clone())
    assert res["k2"] == {"accuracy": 1.0, "mrr": 1.0, "chance": 0.5}
    assert res["k10"]["accuracy"] == 1.0 and res["k10"]["chance"] == 0.1


def test_shifted_partners_and_ties_by_hand():
    q = torch.eye(3)  # candidate j is query j + 1's vector: each query's partner has similarity 0, one other has 1
    res = retrieval.retrieval_metrics(q, q.roll(-1, 0), ks=(3,))
    # query i: 1 candidate above its partner, 1 tied with it: rank 2 or 3, reciprocal rank (1/2 + 1/3) / 2
    assert res["k3"]["accuracy"] == 0.0 and res["k3"]["mrr"] == pytest.approx(5 / 12)
    const = torch.ones(20, 4) / 2  # every candidate tied: exactly the chance level
    res = retrieval.retrieval_metrics(const, const, ks=(2, 10, 50))
    assert res["k2"]["accuracy"] == pytest.approx(0.5) and res["k10"]["accuracy"] == pytest.approx(0.1)
    assert res["k10"]["mrr"] == pytest.approx(np.mean(1 / np.arange(1, 11)))
    assert "k50" not in res  # (more candidates than pairs)


def test_embed_is_the_mean_last_hidden_state_of_each_text_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    seqs = [np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12, 13]), np.arange(20, 40)]
    got = retrieval.embed(model, seqs, pad_id=1, max_positions=16, batch=2)
    for s, e in zip(seqs, got, strict=True):
        h = model(torch.tensor(s[:16])[None], output_hidden_states=True).hidden_states[-1][0].mean(0)
        assert torch.allclose(e, torch.nn.functional.normalize(h, dim=0), atol=1e-5)


@pytest.mark.cli
def test_bad_retrieval_source_is_one_line(tmp_path):
    r = run_cli("evaluate", str(tmp_path), "--retrieval", f"val,{tmp_path / 'nope.py'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--retrieval" in r.stderr


@pytest.mark.cli
def test_evaluate_retrieval_on_a_tiny_run(tiny_shards, tmp_path):
    run = tmp_path / "run"
    launch_tiny(tiny_shards, run, 1, **{"train.max_steps": 4, "eval.every_steps": 0, "checkpoint.every_steps": 0,
                                        "objective.similarity_weight": 0.1})
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "m.py").write_text(SNIPPET)
    r = cli_forked("evaluate", str(run), "--samples", "0", "--retrieval", f"val,{tmp_path / 'py'}",
                   "--retrieval-limit", "50")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((run / "eval.json").read_text())["retrieval"]
    assert ev[str(tmp_path / "py")]["pairs"] == 2 and set(ev[str(tmp_path / "py")]) >= {"k2", "what"}
    assert ev["val"]["pairs"] == 50 and 0 <= ev["val"]["k10"]["accuracy"] <= 1
    assert ev["val"]["k10"]["chance"] == 0.1
