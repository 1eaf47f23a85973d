"""bench/sample_anatomy.py: line types, violations by type and code, the standardised rate (issue 18 item 8)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sample_anatomy import anatomy, data_samples, kind, line_types, standardized  # noqa: E402

from prefpretrain.data_shards.scorers import get_scorer  # noqa: E402

TEXT = '''def f(x):
    """Doc
    more

    """
    # comment
    y = 1  # trailing
    s = \'\'\'a
b\'\'\'
    \n
'''


def test_line_types():
    assert line_types(TEXT) == ["code", "docstring", "docstring", "docstring", "docstring", "comment", "code",
                                "code", "docstring", "whitespace", "blank"]
    # a triple quote inside a comment opens nothing; one in a string on one line closes itself
    assert line_types('# """\nx = 1\ny = """a"""\nz = 2\n') == ["comment", "code", "code", "code"]


def test_anatomy_by_type_code_and_standardisation():
    scorer = get_scorer("pep8_style")
    code = "x=1\ny = 2\n"  # E225 on line 1: 1 violation in 10 characters of code
    comments = "#a\n#b\nz = 3\n"  # E265 twice on 6 characters of comment, 6 clean characters of code
    a = anatomy([{"text": code, "parses": True}] * 2, scorer)
    b = anatomy([{"text": comments, "parses": True}] * 2, scorer)
    assert a["by_type"]["code"]["rate"] == pytest.approx(0.1) and a["per_1k_chars"] == {"E225": pytest.approx(100)}
    assert b["by_type"]["comment"]["rate"] == pytest.approx(2 / 6) and b["by_type"]["code"]["rate"] == 0
    assert b["by_type"]["comment"]["line_share"] == pytest.approx(2 / 3)
    assert a["headline"] == pytest.approx(0.1) and b["headline"] == pytest.approx(2 / 12)
    # with a's mix (all code), b's clean code makes it 0: the whole difference is its comments
    assert standardized(b, a) == 0 and standardized(a, a) == pytest.approx(a["pooled"])
    assert b["headline_parsed"] == b["headline"] and b["parse_fraction"] == 1
    assert kind({"chars": 10, "types": ["code"]}) == "short"
    assert kind({"chars": 300, "types": ["comment", "comment", "code", "blank"]}) == "mostly comment/docstring"
    assert kind({"chars": 300, "types": ["comment", "code", "code"]}) == "code"


def test_data_samples_are_document_openings_in_complete_lines():
    recs = data_samples(["a = 1\nb = 2\nc = 3\n", "\n\n"], 9)
    assert recs == [{"text": "a = 1\n", "parses": True}]
