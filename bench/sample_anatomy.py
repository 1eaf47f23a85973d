"""Where the style violations of code samples come from: by code, by line type, by kind of sample (issue 18 item 8).

    .venv/bin/python bench/sample_anatomy.py --samples mle=RUN/samples.jsonl conditional=RUN2/samples.jsonl \
        [--shards data/exp_heldout --split val --threshold 0] [--scorer pep8_style] [--out anatomy.json]

Reads the samples `prefpretrain evaluate --samples-out FILE` wrote (complete lines, as scored). Every line is one
of LINE_TYPES (a heuristic: a line inside or opening a triple-quoted string is `docstring`, one whose first
non-blank character is `#` is `comment`, blank, whitespace-only, else `code`). For each set it reports:
- the headline (mean over samples of violations per character, as `evaluate` computes it) and the pooled rate
  (all violations / all characters), for every sample and for the samples that parse;
- lines, characters and violations per line type, and the violation rate per type;
- the rate the set would have with the FIRST set's mix of line types (direct standardisation by characters):
  if that closes the gap, content mix, not style within a line type, makes the difference;
- violations per 1,000 characters by code (overall and per line type);
- samples by kind (short, mostly comment/docstring, code) and the share of the headline each kind carries.
With --shards, the same line types in the data with their labels (score <= threshold is aligned): how much
`aligned` shifts the mix of line types (P(type | aligned) / P(type)), i.e. what the control token teaches about
content besides style. Prints markdown tables and writes everything to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prefpretrain.data_shards.linetypes import LINE_TYPES, at_mix, line_types  # noqa: E402

SHORT = 200  # characters: a sample shorter than this is `short`


def read_samples(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def sample_parts(texts: list[str], scorer) -> list[dict]:
    """Per sample: its characters, and its lines' types, lengths and violation codes (artefacts dropped)."""
    from prefpretrain.trainer.evaluate import ARTIFACT_CODES

    parts = []
    for t in texts:
        types = line_types(t)
        lens = [len(x) for x in t.splitlines(True)]
        codes: list[list[str]] = [[] for _ in types]
        for line, code in scorer.violations(t) if t else []:
            if code not in ARTIFACT_CODES and 1 <= line <= len(types):
                codes[line - 1].append(code)
        parts.append({"chars": len(t), "types": types, "lens": lens, "codes": codes})
    return parts


def by_type(parts: list[dict]) -> dict:
    lines, chars, viol = Counter(), Counter(), Counter()
    per_code = {t: Counter() for t in LINE_TYPES}
    for p in parts:
        for t, n, cs in zip(p["types"], p["lens"], p["codes"], strict=True):
            lines[t] += 1
            chars[t] += n
            viol[t] += len(cs)
            per_code[t].update(cs)
    total_lines, total_chars = max(1, sum(lines.values())), max(1, sum(chars.values()))
    return {t: {"lines": lines[t], "line_share": lines[t] / total_lines, "chars": chars[t],
                "char_share": chars[t] / total_chars, "violations": viol[t],
                "rate": viol[t] / chars[t] if chars[t] else None,
                "codes": dict(per_code[t].most_common())} for t in LINE_TYPES}


def kind(p: dict) -> str:
    if p["chars"] < SHORT:
        return "short"
    prose = sum(1 for t in p["types"] if t in ("comment", "docstring"))
    content = sum(1 for t in p["types"] if t in ("comment", "docstring", "code"))
    return "mostly comment/docstring" if content and prose / content >= 0.5 else "code"


def by_kind(parts: list[dict], rates: np.ndarray) -> dict:
    kinds = np.array([kind(p) for p in parts])
    total = float(rates.sum()) or 1.0
    return {k: {"samples": int((kinds == k).sum()), "share_of_samples": float((kinds == k).mean()),
                "mean_rate": float(rates[kinds == k].mean()) if (kinds == k).any() else None,
                "share_of_headline": float(rates[kinds == k].sum() / total)}
            for k in ("short", "mostly comment/docstring", "code")}


def anatomy(recs: list[dict], scorer) -> dict:
    texts = [r["text"] for r in recs]
    parts = sample_parts(texts, scorer)
    chars = np.array([p["chars"] for p in parts], dtype=np.float64)
    viol = np.array([sum(len(c) for c in p["codes"]) for p in parts], dtype=np.float64)
    rates = np.where(chars > 0, viol / np.maximum(chars, 1), 0.0)
    ok = np.array([bool(r.get("parses")) for r in recs])
    codes = Counter(c for p in parts for cs in p["codes"] for c in cs)
    top = np.sort(rates)[::-1][: max(1, len(rates) // 10)]
    return {
        "samples": len(recs), "headline": float(rates.mean()), "pooled": float(viol.sum() / max(1.0, chars.sum())),
        "parse_fraction": float(ok.mean()),
        "headline_parsed": float(rates[ok].mean()) if ok.any() else None,
        "pooled_parsed": float(viol[ok].sum() / max(1.0, chars[ok].sum())) if ok.any() else None,
        "empty_fraction": float((chars == 0).mean()), "mean_chars": float(chars.mean()),
        "top10_share_of_headline": float(top.sum() / max(1e-12, rates.sum())),
        "by_type": by_type(parts), "by_kind": by_kind(parts, rates),
        "per_1k_chars": {c: 1000 * n / max(1.0, chars.sum()) for c, n in codes.most_common()},
    }


def standardized(a: dict, ref: dict) -> float:
    """a's pooled rate with ref's mix of characters over line types."""
    bt = a["by_type"]
    return at_mix({t: [bt[t]["chars"], bt[t]["violations"]] for t in LINE_TYPES},
                  {t: ref["by_type"][t]["char_share"] for t in LINE_TYPES})


def data_labels(path: str, split: str, threshold: float, max_docs: int) -> tuple[dict, list[str]]:
    """Line types of the shard set's segments (line segments) and how often each is labelled aligned; and the
    documents' texts."""
    sys.path.insert(0, str(ROOT))
    from prefpretrain.data_shards import tokenizer as toklib
    from prefpretrain.data_shards.reader import ShardSet
    from prefpretrain.data_shards.rescore import segment_texts

    ss = ShardSet(path, split)
    tok = toklib.load_tokenizer(ss.tokenizer_dir)
    eos = ss.manifest["tokenizer"]["special_ids"]["eos"]
    n, aligned, texts = Counter(), Counter(), []
    for i in range(min(len(ss), max_docs)):
        doc = ss.read(i)
        text, spans = segment_texts(doc, eos, tok)
        texts.append(text)
        types = line_types(text)
        if len(types) != len(spans):  # (a document whose segments are not its lines: not line-segmented)
            continue
        for t, s in zip(types, doc["seg_score"].tolist(), strict=True):
            n[t] += 1
            aligned[t] += s <= threshold
    ss.close()
    total, total_aligned = max(1, sum(n.values())), max(1, sum(aligned.values()))
    return {t: {"segments": n[t], "share": n[t] / total, "aligned_fraction": aligned[t] / n[t] if n[t] else None,
                "share_given_aligned": aligned[t] / total_aligned,
                "shift_given_aligned": (aligned[t] / total_aligned) / (n[t] / total) if n[t] else None}
            for t in LINE_TYPES}, texts


def data_samples(texts: list[str], chars: int) -> list[dict]:
    """The opening of every document, as long as the samples (complete lines), shaped as sample records: the
    data's own rates by line type, like for like (a model's sample starts at a document's start too; a piece cut
    from inside a document would start in an indented block, which pycodestyle reports)."""
    from prefpretrain.trainer.evaluate import complete_lines, parses

    pieces = [complete_lines(t[:chars]) for t in texts]
    return [{"text": p, "parses": parses(p)} for p in pieces if p.strip()]


def fmt(x, spec=".5f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(sets: dict[str, dict], data: dict | None) -> None:
    names = list(sets)
    print("| set | samples | headline (mean per sample) | pooled | parse | headline, parsed | pooled, parsed | "
          f"pooled at {names[0]}'s line mix | top 10 % of samples' share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, a in sets.items():
        print(f"| {k} | {a['samples']} | {fmt(a['headline'])} | {fmt(a['pooled'])} | {a['parse_fraction']:.2f} | "
              f"{fmt(a['headline_parsed'])} | {fmt(a['pooled_parsed'])} | {fmt(a['standardized'])} | "
              f"{a['top10_share_of_headline']:.2f} |")
    print("\n| line type | " + " | ".join(f"{k}: lines (share) | {k}: viol/char" for k in names) +
          (" | data: share | data: aligned | data: shift given aligned |" if data else " |"))
    print("|---|" + "---|---|" * len(names) + ("---|---|---|" if data else ""))
    for t in LINE_TYPES:
        cells = [f"{a['by_type'][t]['lines']} ({a['by_type'][t]['line_share']:.2f}) | {fmt(a['by_type'][t]['rate'])}"
                 for a in sets.values()]
        extra = (f" | {data[t]['share']:.3f} | {fmt(data[t]['aligned_fraction'], '.3f')} | "
                 f"{fmt(data[t]['shift_given_aligned'], '.2f')}") if data else ""
        print(f"| {t} | " + " | ".join(cells) + extra + " |")
    codes = sorted({c for a in sets.values() for c in a["per_1k_chars"]},
                   key=lambda c: -max(a["per_1k_chars"].get(c, 0) for a in sets.values()))[:15]
    print("\n| code (per 1,000 chars) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for c in codes:
        print(f"| {c} | " + " | ".join(f"{a['per_1k_chars'].get(c, 0):.2f}" for a in sets.values()) + " |")
    print("\n| line type | " + " | ".join(f"{k}: top codes (per 1,000 chars of the type)" for k in names) + " |")
    print("|---|" + "---|" * len(names))
    for t in ("code", "comment", "docstring", "whitespace"):
        cells = []
        for a in sets.values():
            bt = a["by_type"][t]
            cells.append(", ".join(f"{c} {1000 * n / bt['chars']:.1f}" for c, n in list(bt["codes"].items())[:5])
                         or "-")
        print(f"| {t} | " + " | ".join(cells) + " |")
    print("\n| kind of sample | " + " | ".join(f"{k}: samples | {k}: mean rate | {k}: share of headline"
                                             for k in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    for kd in next(iter(sets.values()))["by_kind"]:
        print(f"| {kd} | " + " | ".join(
            f"{a['by_kind'][kd]['samples']} | {fmt(a['by_kind'][kd]['mean_rate'])} | "
            f"{a['by_kind'][kd]['share_of_headline']:.2f}" for a in sets.values()) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", nargs="+", required=True, metavar="NAME=FILE",
                    help="sample files of `prefpretrain evaluate --samples-out` (the first is the reference mix)")
    ap.add_argument("--scorer", default="pep8_style", choices=["pep8", "pep8_style"])
    ap.add_argument("--shards", default=None, help="a line-segmented shard set: line types and labels in the data")
    ap.add_argument("--split", default="train", help="the split the data rows come from")
    ap.add_argument("--threshold", type=float, default=0.0)
    ap.add_argument("--max-docs", type=int, default=1000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from prefpretrain.data_shards.scorers import get_scorer

    scorer = get_scorer(a.scorer)
    sets = {}
    for item in a.samples:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            sys.exit(f"--samples: {item!r} is not NAME=FILE of an existing file")
        sets[name] = anatomy(read_samples(Path(path)), scorer)
    data = None
    if a.shards:  # the data itself, in pieces of the samples' mean length, as one more set
        data, texts = data_labels(a.shards, a.split, a.threshold, a.max_docs)
        length = int(np.mean([s["mean_chars"] for s in sets.values()]))
        sets[f"data ({a.split})"] = anatomy(data_samples(texts, length), scorer)
    ref = next(iter(sets.values()))
    for s in sets.values():
        s["standardized"] = standardized(s, ref)
    print_tables(sets, data)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "sets": sets, "data": data}, indent=1))


if __name__ == "__main__":
    main()
