"""How well a trained model predicts the opening of held-out documents from the context sampling gives it.

    .venv/bin/python bench/start_context.py RUN_DIR [RUN_DIR ...] [--docs 200] [--tokens 32] [--out FILE.json]

Sampling starts from [EOS] (then the control tokens, for conditional runs) at position 0. For each run, the first
`--tokens` layout tokens of each of the first `--docs` validation documents (control tokens included, as the run's
objective lays them out) are scored twice, on the same targets (the document's tokens after its first one, control
tokens never targets): after [EOS] at position 0, as sampling starts, and from the document's first token at
position 0, with nothing before it. Under document masking a model trained with blocks that open with the EOS
before the document (packing.DOCUMENT_BLOCKS = 2) saw the first context in training; one trained with blocks
that closed with their own EOS (layout 1) saw the second; an unmasked model saw the first (the previous document
before it). The gap in nats per token says how far the sampling start is from what the model was trained on.
Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


def nll(model, ids: list[int], targets: list[int]) -> tuple[float, int]:
    """Summed NLL of `targets` (IGNORE: not scored) given `ids`, position by position (next-token targets)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    t = torch.tensor(targets[1:])
    keep = t != IGNORE
    lp = torch.log_softmax(logits[keep], -1).gather(1, t[keep][:, None])
    return float(-lp.sum()), int(keep.sum())


def measure(run_dir: str, docs: int, tokens: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from prefpretrain.data_shards.packing import doc_window
    from prefpretrain.trainer.data import run_layout
    from prefpretrain.trainer.finished import FinishedRun

    fr = FinishedRun.open(run_dir)
    model = fr.load_model().eval()
    ss = fr.shards("val", verify=False)
    eos = ss.manifest["tokenizer"]["special_ids"]["eos"]
    layout = run_layout(fr.cfg, ss.manifest)
    st = fr.state
    sums = {"after_eos": [0.0, 0], "bare": [0.0, 0]}
    for d in range(min(docs, len(ss))):
        w = doc_window(ss, d, layout, 0, tokens)
        ids, labels = [int(x) for x in w["ids"]], [int(x) for x in w["labels"]]
        if len(ids) < 2:
            continue
        # the same targets (labels[1:]) in both contexts; after EOS the first token's own target is not counted
        for key, (x, y) in {"after_eos": ([eos, *ids], [IGNORE, IGNORE, *labels[1:]]),
                            "bare": (ids, [IGNORE, *labels[1:]])}.items():
            s, n = nll(model, x, y)
            sums[key][0] += s
            sums[key][1] += n
    out = {k: v[0] / max(1, v[1]) for k, v in sums.items()}
    return {"run": run_dir, "objective": fr.cfg.train.objective, "document_mask": bool(st.get("document_mask")),
            "document_blocks": st.get("document_blocks", 1) if st.get("document_mask") else None,
            "targets": sums["bare"][1], "nll_after_eos": out["after_eos"], "nll_bare": out["bare"],
            "gap_after_eos_minus_bare": out["after_eos"] - out["bare"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = [measure(r, a.docs, a.tokens) for r in a.runs]
    for r in rows:
        print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
