"""Classifier scoring speed: segments/s of the `classifier` scorer on CPU (and on a GPU where there is one).

    .venv/bin/python bench/classifier_scoring.py [--segments 1000] [--out FILE.json]

The model is a BERT of the size of the small toxicity classifiers PHF scored with on GPUs (DistilBERT-like:
6 layers, hidden 768, 12 heads), random weights (speed does not depend on them), saved locally with the
python-docs tokenizer; the segments are sentences of the documentation corpus (data/raw/python-docs, or the
stdlib's docstrings when it is absent), grouped into documents of 4 sentences (short prose: a paragraph each).
Timed on the same segments, after a warm-up: `per_document` scores each document alone (one batch of <= 4
segments each: how the scorer batched before it could batch across documents), `across` scores all of them
the way a shard task does (`batch_scores`: batches across documents, segments in order of length), at batch
sizes 1-128. One line of JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from prefpretrain.data_shards import sources
from prefpretrain.data_shards import tokenizer as toklib
from prefpretrain.data_shards.encode import batch_scores
from prefpretrain.data_shards.scorers import get_scorer
from prefpretrain.data_shards.segment import get_segmenter


def _segments(n: int) -> tuple[list[str], list]:
    root = Path("data/raw/python-docs")
    files = sources.expand_inputs([str(root)] if root.is_dir() else ["@stdlib"])
    seg = get_segmenter("sentence")
    docs, out = [], []
    for f in files:
        for d in sources.read_file(f.path, f.name).docs:
            docs.append(d)
            out += [d.text[a:b] for a, b in seg(d.text)]
        if len(out) >= n:
            break
    return out[:n], docs


def main() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=1000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    texts, docs = _segments(a.segments)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    res = {"bench": "classifier_scoring", "segments": len(texts), "model": "BERT 6x768 (DistilBERT size)",
           "cpu_threads": torch.get_num_threads(), "segments_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tok = toklib.train_tokenizer((d.text for d in docs[:200]), 8192)
        toklib.save_tokenizer(tok, tmp)
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(vocab_size=tok.get_vocab_size(), num_hidden_layers=6,
                                                 pad_token_id=toklib.special_ids(tok)["pad"])).save_pretrained(tmp)
        paras = []  # documents of 4 sentences (short prose documents: a paragraph each)
        for i in range(0, len(texts), 4):
            part, spans, at = texts[i: i + 4], [], 0
            for t in part:
                spans.append((at, at + len(t)))
                at += len(t)
            paras.append((sources.Document(f"d{i}", f"d{i}", "".join(part)), spans))
        for dev in devices:
            rows = [(1, "across"), (32, "per_document")] + [(bs, "across") for bs in (8, 32, 128)]
            for bs, mode in rows:
                sc = get_scorer("classifier", {"model_dir": tmp, "batch_size": bs, "max_length": 128, "device": dev})
                sc.score_many(paras[:2])  # warm-up
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if mode == "across":
                    batch_scores(sc, paras)
                else:
                    for d, spans in paras:
                        sc.score(d, spans)
                if dev == "cuda":
                    torch.cuda.synchronize()
                res["segments_per_s"][f"{dev}_{mode}_batch_{bs}"] = round(len(texts) / (time.perf_counter() - t0), 1)
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
