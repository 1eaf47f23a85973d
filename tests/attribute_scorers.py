"""Two independent toy preferences for tests of multi-attribute conditioning (used as `module:function` scorers):
a line is misaligned in `caps` if it shouts (any upper-case letter), in `digits` if it holds a digit."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ("alpha beta gamma delta omega river stone cloud maple cedar ember frost grove harbor iris jade kelp lumen "
         "meadow nectar").split()


def caps(text: str) -> float:
    return float(any(c.isupper() for c in text))


def digits(text: str) -> float:
    return float(any(c.isdigit() for c in text))


def write_corpus(out: Path, docs: int = 400, lines: int = 8, seed: int = 0) -> Path:
    """Text files of `docs` documents of `lines` lines; each line shouts and starts with a number independently, with
    probability 1/2 each."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        rows = []
        for _ in range(lines):
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
            if rng.random() < 0.5:
                line = line.upper()
            if rng.random() < 0.5:
                line = f"{rng.randint(10, 99)} {line}"
            rows.append(line)
        (out / f"doc{d:04d}.txt").write_text("\n".join(rows) + "\n")
    return out
