"""Line types of Python text, and style rates at a fixed mix of them.

A conditional model's control token says something about content as well as style when the labels' base rate
differs by line type (a corpus whose comment lines are often too long labels comments misaligned more often than
code): conditioning then shifts the mix of comment, docstring, code and blank lines, and a violations-per-character
average mixes that shift with the style within each type. `at_mix` gives the rate a set of samples would have with
a fixed mix of line types (direct standardisation by characters), so that two sets compare on style alone.
"""
from __future__ import annotations

LINE_TYPES = ("blank", "whitespace", "comment", "docstring", "code")


def line_types(text: str) -> list[str]:
    """The type of every line of a (possibly broken) Python text: `docstring` for a line inside or opening a
    triple-quoted string, `comment` for one whose first non-blank character is `#`, blank, whitespace-only, else
    `code` (a heuristic: triple quotes inside comments are ignored)."""
    out, quote = [], ""  # quote: the triple quote of the string the line starts in, if any
    for line in text.splitlines():
        s = line.strip()
        if quote:
            out.append("docstring")
        elif not s:
            out.append("whitespace" if line else "blank")
        elif s.startswith("#"):
            out.append("comment")
            continue
        else:
            out.append("docstring" if s.lstrip("rRbBuUfF").startswith(('"""', "'''")) else "code")
        q = quote or min(('"""', "'''"), key=lambda x: (line.find(x) < 0, line.find(x)))
        if line.count(q) % 2:  # an odd number of the triple quote opens or closes a string
            quote = "" if quote else q
    return out


def type_counts(text: str, violation_lines: list[int]) -> dict[str, list[int]]:
    """{type: [characters, violations]} of one text, given the (1-based) line of each violation."""
    types = line_types(text)
    out = {t: [0, 0] for t in LINE_TYPES}
    for t, line in zip(types, text.splitlines(True), strict=True):
        out[t][0] += len(line)
    for n in violation_lines:
        if 1 <= n <= len(types):
            out[types[n - 1]][1] += 1
    return out


def add_counts(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    return {t: [sum(p[t][0] for p in parts), sum(p[t][1] for p in parts)] for t in LINE_TYPES}


def char_mix(texts: list[str]) -> dict[str, float]:
    """The share of characters in each line type over `texts`."""
    counts = add_counts([type_counts(t, []) for t in texts])
    total = max(1, sum(c for c, _ in counts.values()))
    return {t: counts[t][0] / total for t in LINE_TYPES}


def at_mix(counts: dict[str, list[int]], mix: dict[str, float]) -> float:
    """Violations per character with `mix`'s shares of characters per line type and the rates in `counts` (a
    type the samples never wrote counts as clean: the figure says so by the types' `chars` being 0)."""
    return sum(mix[t] * (counts[t][1] / counts[t][0] if counts[t][0] else 0.0) for t in LINE_TYPES)
