"""Line types and style at a fixed mix of them (prefpretrain.data_shards.linetypes, evaluate), and
bench/sample_anatomy.py's breakdown by type, code and kind of sample (issue 18 item 8)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sample_anatomy import anatomy, data_samples, kind, line_types, standardized  # noqa: E402

from prefpretrain.data_shards import linetypes  # noqa: E402
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


def test_rate_at_a_fixed_line_mix_separates_style_from_content():
    from prefpretrain.trainer.evaluate import line_type_summary, sample_score

    scorer = get_scorer("pep8_style")
    rate, counts = sample_score(scorer, "line", "x=1\n#a\n")  # E225 on the code line, E265 on the comment
    assert rate == pytest.approx(2 / 7) and counts["code"] == [4, 1] and counts["comment"] == [3, 1]
    # two sets with the same style per type but different content: equal at a fixed mix, unequal as measured
    code_heavy = linetypes.add_counts([{**{t: [0, 0] for t in linetypes.LINE_TYPES}, "code": [900, 9],
                                        "comment": [100, 0]}])
    comment_heavy = {**code_heavy, "code": [100, 1], "comment": [900, 0]}
    mix = {t: 0.0 for t in linetypes.LINE_TYPES} | {"code": 0.5, "comment": 0.5}
    a, b = line_type_summary(code_heavy, mix), line_type_summary(comment_heavy, mix)
    assert a["misalignment_at_data_mix"] == pytest.approx(0.005) == b["misalignment_at_data_mix"]
    assert a["by_line_type"]["code"] == {"char_share": 0.9, "violations": 9, "rate": 0.01}
    assert b["by_line_type"]["comment"]["rate"] == 0 and "misalignment_at_data_mix" not in line_type_summary(
        code_heavy, None)
    assert linetypes.char_mix(["x = 1\n", "# c\n"]) == pytest.approx(
        {"blank": 0, "whitespace": 0, "comment": 0.4, "docstring": 0, "code": 0.6})
