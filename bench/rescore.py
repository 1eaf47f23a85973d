"""Rescoring a shard set (`prefpretrain rescore`) against sharding the corpus again, side by side.

    python bench/rescore.py [--max-files 300] [--workers 2] [--scorers pep8_style,pii] [--repeats 2]
                            [--out docs/results/rescore.json]

The corpus (the interpreter's standard library, first --max-files files) is sharded once with pep8. Then, for
each scorer, alternating, `repeats` times each: (a) rescore: a new column from the stored segments; (b) re-shard
with the shards' tokenizer (`--tokenizer DIR`: what a user must do to keep token ids); (c) re-shard as
`prefpretrain shard` does by default (training a tokenizer). Same workers, same machine, wall-clock seconds.
Rescoring decodes tokens instead of reading and tokenizing files; the scoring itself is the same work.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefpretrain.data_shards.build import ShardOptions, build_shards  # noqa: E402
from prefpretrain.data_shards.rescore import rescore  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-files", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scorers", default="pep8_style,pii")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        opts = dict(inputs=["@stdlib"], max_files=a.max_files, workers=a.workers, vocab_size=8192, progress=False,
                    segmenter="line")  # the stored segments (a rescore keeps them; pii alone would take sentences)
        t_base = _timed(lambda: build_shards(ShardOptions(output=str(base), scorer="pep8", **opts)))
        m = json.loads((base / "manifest.json").read_text())
        res = {"bench": "rescore", "files": m["files"], "input_mb": round(m["input_bytes"] / 1e6, 2),
               "train_tokens": m["splits"]["train"]["tokens"], "workers": a.workers, "first_shard_s": t_base,
               "scorers": {}}
        for name in a.scorers.split(","):
            runs = {"rescore": [], "reshard_same_tokenizer": [], "reshard_train_tokenizer": []}
            for r in range(a.repeats):
                runs["rescore"].append(_timed(lambda n=name, r=r: rescore(base, n, f"{n}{r}", workers=a.workers)))
                for kind, tok in (("reshard_same_tokenizer", str(base / "tokenizer")), ("reshard_train_tokenizer",
                                                                                         "train")):
                    out = Path(d) / f"{kind}-{name}-{r}"
                    runs[kind].append(_timed(lambda o=out, n=name, t=tok: build_shards(
                        ShardOptions(output=str(o), scorer=n, tokenizer=t, **opts))))
                    shutil.rmtree(out)
            best = {k: min(v) for k, v in runs.items()}
            res["scorers"][name] = {"seconds": runs, "best": best,
                                    "rescore_over_reshard_same_tokenizer": round(
                                        best["rescore"] / best["reshard_same_tokenizer"], 3),
                                    "rescore_over_reshard_train_tokenizer": round(
                                        best["rescore"] / best["reshard_train_tokenizer"], 3)}
            print(f"rescore: {name}: {json.dumps(res['scorers'][name])}", file=sys.stderr, flush=True)
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
