"""The auxiliary objectives over segments, added to any objective: the preference-label head (binary
cross-entropy on the probability that a segment is preferred; a trained head is a learned scorer) and the
sentence-similarity task (a contrastive loss over segment embeddings with in-batch negatives).

Both read segment embeddings: the last hidden state averaged over a segment's tokens within one row of the
batch (`segment` keys, prefpretrain.data_shards.packing.segment_key; control tokens are not pooled, so the
label the conditional objective shows the model is not read back). A segment cut by a row boundary is two
pieces, each its own.

Scales, so that accumulation and world size do not change the gradient (the loop divides a step's summed loss
by its target tokens):
- label head: each segment's BCE weighted by its target tokens (a token-weighted mean BCE once divided).
  Segments that carry a control token (conditional) are left out: their label is in the input.
- similarity: the micro batch's mean InfoNCE over its anchors times its target tokens (a target-weighted mean
  of micro-batch means once divided). Negatives are the other segments of the rank's micro batch.
Segment bookkeeping is computed on the host from the batch's host tensors and copied without waiting (no device
synchronisation in a training step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prefpretrain.data_shards.packing import IGNORE
from prefpretrain.objectives import ObjectiveConfig

# statistic -> (TensorBoard tag, what its window sum is divided by: "targets", or another statistic's sum)
LABEL_STATS = {"label_bce": ("objective/label_bce", "label_tokens"),
               "label_correct": ("objective/label_accuracy", "label_tokens"),
               "label_tokens": ("objective/label_token_fraction", "targets")}
SIMILARITY_STATS = {"sim_loss": ("objective/similarity_loss", "targets"),
                    "sim_correct": ("objective/similarity_accuracy", "targets")}


def active(p: ObjectiveConfig) -> bool:
    """Whether the run trains a head or task of this module (its samples then carry `segment` keys)."""
    return p.label_head_weight > 0 or p.similarity_weight > 0


def stat_tags(p: ObjectiveConfig) -> dict[str, tuple[str, str]]:
    return {**(LABEL_STATS if p.label_head_weight > 0 else {}), **(SIMILARITY_STATS if p.similarity_weight > 0 else {})}


@dataclass
class Runs:
    """The segment pieces of a (B, T) batch, found on the host: piece r holds the positions with index == r
    (positions of no piece, or not pooled, point at slot n, which pooling drops)."""

    index: torch.Tensor  # (B*T,) long: the piece of each position; n where it is not pooled
    n: int
    row: np.ndarray  # (n,) the row of each piece
    key: np.ndarray  # (n,) its segment key
    aligned: np.ndarray  # (n,) float: 1 = preferred (score <= threshold)
    targets: np.ndarray  # (n,) float: its target tokens (the loss positions it holds)
    has_control: np.ndarray  # (n,) bool: a control token precedes it in the row
    size: np.ndarray  # (n,) its pooled tokens


def segment_runs(batch: dict, causal: bool, threshold: float) -> Runs:
    """The pieces of `batch` (host tensors with `segment`, `control`, `labels`, `scores`)."""
    seg = batch["segment"].numpy()
    B, T = seg.shape
    flat = seg.reshape(-1)
    start = np.ones(B * T, bool)
    start[1:] = flat[1:] != flat[:-1]
    start[::T] = True
    raw = np.cumsum(start) - 1  # the run of each position (every row starts one)
    ctrl = batch["control"].numpy().reshape(-1)
    pooled = (flat >= 0) & ~ctrl
    labels = batch["labels"].numpy()
    target = labels != IGNORE
    if causal:  # the step's targets are labels[:, 1:]
        target[:, 0] = False
    n_raw = int(raw[-1]) + 1
    count = np.bincount(raw, weights=pooled, minlength=n_raw)
    keep = count > 0  # runs with a token to pool (not a lone control token, not a blank sample)
    new = np.full(n_raw + 1, -1, np.int64)
    new[:n_raw][keep] = np.arange(int(keep.sum()))
    n = int(keep.sum())
    index = np.where(pooled, new[raw], n)
    firsts = np.flatnonzero(start)[keep]
    scores = batch["scores"].numpy().reshape(-1)
    return Runs(index=torch.from_numpy(index), n=n, row=firsts // T, key=flat[firsts],
                aligned=(scores[firsts] <= threshold).astype(np.float32),
                targets=np.bincount(raw, weights=target.reshape(-1), minlength=n_raw)[keep].astype(np.float32),
                has_control=np.bincount(raw, weights=ctrl, minlength=n_raw)[keep] > 0, size=count[keep])


def pool(hidden: torch.Tensor, runs: Runs) -> torch.Tensor:
    """(n, H) fp32: the mean hidden state of each piece."""
    H = hidden.size(-1)
    idx = runs.index.to(hidden.device, non_blocking=True)
    sums = torch.zeros(runs.n + 1, H, dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, idx, hidden.reshape(-1, H).float())
    counts = torch.zeros(runs.n + 1, dtype=torch.float32, device=hidden.device)
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    return sums[: runs.n] / counts[: runs.n, None].clamp_min(1.0)


def label_logits(head, emb: torch.Tensor) -> torch.Tensor:
    """The head's logit of `preferred` per embedding (fp32)."""
    return head(emb.to(head.weight.dtype)).squeeze(-1).float()


def label_loss(logits: torch.Tensor, aligned: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed BCE (-y log p - (1 - y) log(1 - p), p = sigmoid(logit)) weighted per segment, and its statistics."""
    bce = F.binary_cross_entropy_with_logits(logits, aligned, reduction="none") * weight
    correct = ((logits > 0) == (aligned > 0.5)).float() * weight
    return bce.sum(), {"label_bce": bce.detach().sum(), "label_correct": correct.sum(), "label_tokens": weight.sum()}


MIN_PIECE = 2  # pooled tokens a piece needs to take part in the similarity task (a row's opening EOS is one)


def neighbour_pairs(runs: Runs) -> tuple[np.ndarray, np.ndarray]:
    """(anchors, positives): piece r and piece r + 1 when they are consecutive segments of one document in one
    row."""
    r = np.arange(max(0, runs.n - 1))
    ok = (runs.row[r] == runs.row[r + 1]) & (runs.key[r + 1] == runs.key[r] + 1) & (runs.key[r] >= 0)
    return r[ok], r[ok] + 1


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of picking `positive[i]` among the candidates for anchor i (cosine similarity /
    temperature), and how many anchors pick it; `exclude` (anchors, candidates) bool: candidates an anchor may
    not pick (itself, another piece of its own segment)."""
    a, c = F.normalize(anchors, dim=-1), F.normalize(candidates, dim=-1)
    logits = a @ c.T / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    ce = F.cross_entropy(logits, positive)
    return ce, (logits.argmax(-1) == positive).float().sum().detach()


def _on(x: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for it (the copy is staged from a fresh array)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(dev, non_blocking=True)


def similarity_loss(emb: torch.Tensor, runs: Runs, p: ObjectiveConfig, targets: float,
                    view=None) -> tuple[torch.Tensor, dict]:
    """The micro batch's mean InfoNCE x its target tokens, over the pieces of >= MIN_PIECE pooled tokens.
    neighbour: each segment with a next segment of its document in its row picks it among the pieces; dropout:
    each piece picks its own embedding from `view()` (a second forward, dropout drawn anew, no gradient) among the
    view's pieces. An anchor never picks itself or another piece of its own segment (cut by a row boundary)."""
    dev = emb.device
    members = np.flatnonzero(runs.size >= MIN_PIECE)
    other = pool(view(), runs).detach() if p.similarity_positive == "dropout" else None  # (every rank: ZeRO-3)
    if other is not None:
        anchors, positive = members, np.arange(len(members))
    else:
        a, b = neighbour_pairs(runs)
        ok = (runs.size[a] >= MIN_PIECE) & (runs.size[b] >= MIN_PIECE)
        anchors, positive = a[ok], np.searchsorted(members, b[ok])
    if len(anchors) == 0:
        zero = emb.sum() * 0.0
        return zero, {"sim_loss": zero.detach(), "sim_correct": zero.detach()}
    keys = _on(runs.key, dev)
    m_t, a_t, pos_t = _on(members, dev), _on(anchors, dev), _on(positive, dev)
    exclude = keys[a_t][:, None] == keys[m_t][None, :]  # itself and the other pieces of its segment
    if other is not None:  # (its own view is its positive)
        exclude.fill_diagonal_(False)
    ce, hits = info_nce(emb[a_t], (emb if other is None else other)[m_t], pos_t, p.similarity_temperature, exclude)
    return ce * targets, {"sim_loss": ce.detach() * targets, "sim_correct": hits / len(anchors) * targets}


def head_terms(model, hidden: torch.Tensor, batch: dict, p: ObjectiveConfig, causal: bool, targets: float,
               view=None) -> tuple[torch.Tensor, dict]:
    """The weighted auxiliary terms of one micro batch (summed like the objectives' losses) and their
    statistics. `batch`: host tensors; `hidden`: the last hidden state (B, T, H); `view`: the dropout view."""
    runs = segment_runs(batch, causal, p.threshold)
    emb = pool(hidden, runs)
    total, stats = emb.sum() * 0.0, {}
    if p.label_head_weight > 0:
        dev = emb.device
        loss, s = label_loss(label_logits(model.label_head, emb), _on(runs.aligned, dev),
                             _on(runs.targets * ~runs.has_control, dev))
        total, stats = total + p.label_head_weight * loss, {**stats, **s}
    if p.similarity_weight > 0:
        loss, s = similarity_loss(emb, runs, p, targets, view)
        total, stats = total + p.similarity_weight * loss, {**stats, **s}
    return total, stats


# ---------------------------------------------------------------- the label head's held-out quality

TALLY_BINS = 2000  # probability bins of the tally (AUC ties within a bin count one half; a multiple of the
# calibration bins)


def label_tally(head, hidden: torch.Tensor, batch: dict, causal: bool, threshold: float) -> torch.Tensor:
    """A batch's contribution to the label head's held-out tally, on the hidden state's device: per probability
    bin the not-preferred and preferred segments and their summed probabilities, then the summed squared error
    (segments that carry a control token are left out, as in training). Tallies add across batches and ranks."""
    runs = segment_runs(batch, causal, threshold)
    dev = hidden.device
    keep = torch.from_numpy(~runs.has_control).to(dev)
    p = torch.sigmoid(label_logits(head, pool(hidden, runs)))[keep].double()
    y = torch.from_numpy(runs.aligned).to(dev)[keep].double()
    b = (p * TALLY_BINS).long().clamp_(0, TALLY_BINS - 1)
    out = torch.zeros(3 * TALLY_BINS + 1, dtype=torch.float64, device=dev)
    out.index_add_(0, b + TALLY_BINS * y.long(), torch.ones_like(p))
    out.index_add_(0, b + 2 * TALLY_BINS, p)
    out[-1] = ((p - y) ** 2).sum()
    return out


def label_metrics(tally, calibration_bins: int = 10) -> dict:
    """AUC (preferred vs not, ranked by P(preferred)), expected calibration error over `calibration_bins` equal
    bins, Brier score, and the counts, from a summed tally (None where undefined: no segment, or one class)."""
    t = np.asarray(tally, dtype=np.float64)
    neg, pos, psum = t[:TALLY_BINS], t[TALLY_BINS: 2 * TALLY_BINS], t[2 * TALLY_BINS: 3 * TALLY_BINS]
    n_neg, n_pos = neg.sum(), pos.sum()
    n = n_neg + n_pos
    out = {"label_segments": int(n), "label_preferred_rate": n_pos / n if n else None}
    below = np.cumsum(neg) - neg
    out["label_auc"] = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg)) if n_pos and n_neg else None
    coarse = np.arange(TALLY_BINS) * calibration_bins // TALLY_BINS
    gap = np.bincount(coarse, psum, calibration_bins) - np.bincount(coarse, pos, calibration_bins)
    out["label_ece"] = float(np.abs(gap).sum() / n) if n else None
    out["label_brier"] = float(t[-1] / n) if n else None
    out.update(_matched_rate(neg, pos))
    return out


def _matched_rate(neg: np.ndarray, pos: np.ndarray) -> dict:
    """The operating point that flags as many segments as are not preferred: the threshold on the learned score
    (1 - P(preferred), `--scorer learned:`; a segment scoring above it is flagged) at the bin edge where the
    segments of lowest P(preferred) first reach that count, and the precision and recall of "not preferred"
    there. A calibrated head with a rare class flags almost nothing at 0.5; this flags the base rate."""
    n_neg = neg.sum()
    if not n_neg or not pos.sum():
        return {"label_matched_threshold": None, "label_matched_precision": None, "label_matched_recall": None}
    flagged = np.cumsum(neg + pos)  # segments with P(preferred) below each bin's upper edge
    b = int(np.searchsorted(flagged, n_neg))
    hit = float(np.cumsum(neg)[b])
    return {"label_matched_threshold": 1.0 - (b + 1) / TALLY_BINS, "label_matched_precision": hit / flagged[b],
            "label_matched_recall": hit / n_neg}
