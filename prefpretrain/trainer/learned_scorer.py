"""The preference-label head as a scorer: `--scorer learned:PATH` (data_shards.scorers resolves it by name).

PATH: a run directory (its newest verified checkpoint), one checkpoint directory of a run, or an
`export --with-heads` directory. score = 1 - P(preferred), so LOWER IS BETTER like every scorer, and a column
made by it is "aligned" at threshold 0.5 (P(preferred) >= 0.5).

How a document is scored (training's view of a segment, prefpretrain.auxiliary):
- its text is tokenized whole with the run's own tokenizer (no special tokens) and every token goes to the
  segment its first character falls in (as `prefpretrain shard` assigns them);
- the model reads [EOS] + the document's tokens in windows of the run's data.seq_len tokens (the first opens with
  the EOS that ends a document before it in training), each window from position 0 with no other document as
  context: a segment is read with the context before it in its window, as in a document-masked run;
- a segment's embedding is the mean of the last hidden state over its tokens (over both windows where a window
  boundary cuts it); the head maps it to the logit of P(preferred). No control token is in the input.
Differences from training: the EOS that closes a document is not pooled into its last segment, and a masked LM
reads the text unmasked. A segment with no token (an empty span) scores 0.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from prefpretrain.errors import InputError
from prefpretrain.trainer.export import HEADS_FILE, POOLING

SCORE = "1 - P(preferred)"
ALIGNED_AT = 0.5


def _load_export(path: Path, device: torch.device):
    """(model with its label head, tokenizer dir, facts) from an `export --with-heads` directory: transformers and
    safetensors only (no DeepSpeed)."""
    from safetensors.torch import load_file

    from prefpretrain.trainer.model import attach_heads, heads_in, load_model_dir

    info = json.loads((path / "prefpretrain.json").read_text())
    heads = info.get("heads") or {}
    if "label_head" not in heads.get("names", ()) or not isinstance(heads.get("label_head"), dict):
        raise InputError(f"scorer learned:{path}: the export has no label head (export a run trained with "
                         f"objective.label_head_weight > 0 with --with-heads)")
    model = load_model_dir(path, heads.get("model_kind", "causal"))
    sd = load_file(str(path / HEADS_FILE))  # (its fixed name: a path from the JSON could point anywhere)
    attach_heads(model, heads_in(sd))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes: a hidden size other than the model's
        raise InputError(f"scorer learned:{path}: {HEADS_FILE} does not fit the model "
                         f"({str(e).splitlines()[-1].strip()[:200]})") from None
    if unexpected or any(k.startswith("label_head.") for k in missing):
        raise InputError(f"scorer learned:{path}: {HEADS_FILE} does not match the model ({unexpected})")
    lh = heads["label_head"]
    facts = {"source": "export", "step": info.get("step"), "window": heads.get("window"),
             "head_threshold": lh.get("threshold"), "head_score_column": lh.get("score_column"),
             "segmenter": lh.get("segmenter") or info.get("segmenter")}
    return model.to(device).eval(), path, facts


def _load_run(path: Path, device: torch.device):
    """(model with its label head, tokenizer dir, facts) from a run or one of its checkpoints."""
    from prefpretrain.data_shards.columns import stored_column
    from prefpretrain.trainer.finished import FinishedRun

    fr = FinishedRun.open(path, key=f"scorer learned:{path}")
    if fr.cfg.objective.label_head_weight <= 0:
        raise InputError(f"scorer learned:{path}: the run has no label head (objective.label_head_weight is 0)")
    try:
        ss = fr.shards("train")
        tok_dir = ss.tokenizer_dir
        if not (Path(tok_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {tok_dir}")
    except (OSError, ValueError) as e:
        raise InputError(f"scorer learned:{path}: the run's tokenizer cannot be found (its shard set "
                         f"{fr.cfg.data.reference}: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from None
    model = fr.load_model(device, heads=True)
    if getattr(model, "label_head", None) is None:
        raise InputError(f"scorer learned:{path}: checkpoint {fr.ckpt} holds no label head")
    facts = {"source": "run", "checkpoint": str(Path(fr.ckpt).resolve()), "step": fr.state.get("step"),
             "window": fr.cfg.data.seq_len, "head_threshold": fr.cfg.objective.threshold,
             "head_score_column": ss.score_column or stored_column(ss.manifest),
             "segmenter": ss.manifest.get("segmenter")}
    return model, Path(tok_dir), facts


class LearnedScorer:
    """A trained label head over its model's pooled last hidden states: 1 - P(preferred) per segment (module doc).
    `device`: auto (a GPU when torch sees one), cpu, cuda or cuda:N; `batch_size`: windows per forward."""

    name, version = "learned", "1"

    def __init__(self, path: str, device: str = "auto", batch_size: int = 16):
        from prefpretrain import distributed
        from prefpretrain.data_shards.tokenizer import EOS, PAD, load_tokenizer

        p = Path(path).resolve()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"scorer learned:{path}: batch_size must be a positive integer, got {batch_size!r}")
        try:
            self._device = distributed.pick_device(device) if device == "auto" else torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"scorer learned:{path}: device {device!r} is not a device ({e})") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"scorer learned:{path}: device {device!r}, but this process sees no GPU")
        if (p / "prefpretrain.json").is_file() and (p / "config.json").is_file():
            self._model, tok_dir, facts = _load_export(p, self._device)
        elif p.is_dir():
            self._model, tok_dir, facts = _load_run(p, self._device)
        else:
            raise InputError(f"scorer learned:{path}: no run, checkpoint or export directory there")
        self._tok = load_tokenizer(tok_dir)
        self._eos, self._pad = self._tok.token_to_id(EOS), self._tok.token_to_id(PAD)
        self._window = int(facts.get("window") or self._model.config.max_position_embeddings)
        self._bs = batch_size
        self.segmenter = facts.pop("segmenter", None)  # the segments the head learned on (shard's segmenter=auto)
        # pinned: the checkpoint (or export) loaded, absolute, so that every scoring process, a resumed shard job and
        # a later `evaluate --scorer` load the same weights while the run goes on writing newer checkpoints
        self.params = {"path": str(facts.pop("checkpoint", None) or p), "given": str(path), **facts,
                       "window": self._window, "device": device, "batch_size": batch_size, "score": SCORE,
                       "aligned_at": ALIGNED_AT,
                       "pooling": POOLING}

    def score(self, doc, spans: list[tuple[int, int]]) -> list[float]:
        return self.score_many([(doc, spans)])[0]

    def _segments_of_tokens(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """[EOS] + the text's tokens, and the segment of each (-1: the leading EOS)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        starts = np.asarray([a for a, _ in spans], dtype=np.int64)
        tok_starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
        seg = np.clip(np.searchsorted(starts, tok_starts, side="right") - 1, 0, len(spans) - 1)
        return np.asarray([self._eos, *enc.ids], dtype=np.int64), np.concatenate([[-1], seg]).astype(np.int64)

    def score_many(self, items: list) -> list[list[float]]:
        """Every document's windows in batches of similar length (across documents), pooled per segment; the
        scores back in each document's order."""
        from prefpretrain.auxiliary import label_logits

        rows, offset = [], 0  # (ids, global segment of each position) per window
        for doc, spans in items:
            if spans:
                ids, seg = self._segments_of_tokens(doc.text, spans)
                seg = np.where(seg >= 0, seg + offset, -1)
                for lo in range(0, len(ids), self._window):
                    rows.append((ids[lo: lo + self._window], seg[lo: lo + self._window]))
            offset += len(spans)
        H, dev, n = self._model.config.hidden_size, self._device, offset
        sums = torch.zeros(n + 1, H, dtype=torch.float32, device=dev)
        counts = torch.zeros(n + 1, dtype=torch.float32, device=dev)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        with torch.no_grad():
            for b in range(0, len(order), self._bs):
                batch = [rows[i] for i in order[b: b + self._bs]]
                T = max(len(r[0]) for r in batch)
                ids = torch.full((len(batch), T), self._pad, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                index = torch.full((len(batch), T), n, dtype=torch.long)
                for r, (x, s) in enumerate(batch):
                    ids[r, : len(x)], mask[r, : len(x)] = torch.from_numpy(x), 1
                    index[r, : len(x)] = torch.from_numpy(np.where(s >= 0, s, n))
                # the transformer without its LM head: its last hidden state is the full model's (no logits made)
                out = self._model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                             output_hidden_states=True)
                hidden, index = out.hidden_states[-1].float().reshape(-1, H), index.reshape(-1).to(dev)
                sums.index_add_(0, index, hidden)
                counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
            p = torch.sigmoid(label_logits(self._model.label_head, sums[:n] / counts[:n, None].clamp_min(1.0)))
            scores = torch.where(counts[:n] > 0, 1.0 - p, torch.full_like(p, ALIGNED_AT)).tolist()
        out, at = [], 0
        for _, spans in items:
            out.append(scores[at: at + len(spans)])
            at += len(spans)
        return out
