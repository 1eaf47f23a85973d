"""Score statistics that merge across chunks (so a resumed shard run reports the same numbers)."""
from __future__ import annotations

import numpy as np

EDGES = [-np.inf, 0.0, 1e-9, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0, np.inf]
QUANTILES = np.linspace(0, 100, 101)


class ScoreStats:
    """Exact counts, sums, extrema and a fixed-edge histogram; percentiles from merged per-chunk quantiles."""

    def __init__(self):
        self.n = 0
        self.sum = 0.0
        self.weighted_sum = 0.0
        self.weight = 0.0
        self.zero = 0
        self.min = float("inf")
        self.max = float("-inf")
        self.hist = np.zeros(len(EDGES) - 1, dtype=np.int64)
        self.sketch: list[tuple[list[float], int]] = []  # (101 quantiles, count) per chunk
        self._pending: list[np.ndarray] = []

    def add(self, scores: np.ndarray, lens: np.ndarray) -> None:
        if len(scores) == 0:
            return
        s = scores.astype(np.float64)
        self._pending.append(s)
        self.n += len(s)
        self.sum += float(s.sum())
        self.weighted_sum += float((s * lens).sum())
        self.weight += float(lens.sum())
        self.zero += int((s <= 0).sum())
        self.min = min(self.min, float(s.min()))
        self.max = max(self.max, float(s.max()))
        self.hist += np.histogram(s, bins=EDGES)[0]

    def _flush(self) -> None:
        """Summarise what was added since the last flush as one quantile sketch."""
        if self._pending:
            s = np.concatenate(self._pending)
            self.sketch.append((np.percentile(s, QUANTILES).tolist(), len(s)))
            self._pending = []

    def to_state(self) -> dict:
        self._flush()
        return {"n": self.n, "sum": self.sum, "weighted_sum": self.weighted_sum, "weight": self.weight,
                "zero": self.zero, "min": self.min, "max": self.max, "hist": self.hist.tolist(),
                "sketch": self.sketch}

    @classmethod
    def from_state(cls, d: dict) -> ScoreStats:
        st = cls()
        for k in ("n", "sum", "weighted_sum", "weight", "zero", "min", "max"):
            setattr(st, k, d[k])
        st.hist = np.asarray(d["hist"], dtype=np.int64)
        st.sketch = [(list(q), int(c)) for q, c in d["sketch"]]
        return st

    def merge(self, other: ScoreStats) -> None:
        self._flush()
        other._flush()
        self.n += other.n
        self.sum += other.sum
        self.weighted_sum += other.weighted_sum
        self.weight += other.weight
        self.zero += other.zero
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.hist += other.hist
        self.sketch.extend(other.sketch)

    def percentile(self, p: float) -> float:
        """Weighted quantile over the merged per-chunk quantile points (exact for one chunk)."""
        if len(self.sketch) == 1:
            return float(np.interp(p, QUANTILES, self.sketch[0][0]))
        vals = np.concatenate([np.asarray(q) for q, _ in self.sketch])
        w = np.concatenate([np.full(len(q), c / len(q)) for q, c in self.sketch])
        order = np.argsort(vals, kind="stable")
        cw = np.cumsum(w[order])
        return float(vals[order][min(len(vals) - 1, np.searchsorted(cw, p / 100 * cw[-1]))])

    def summary(self) -> dict:
        self._flush()
        if self.n == 0:
            return {"segments": 0}
        return {
            "segments": self.n,
            "mean_per_char": self.weighted_sum / max(1.0, self.weight),
            "mean_per_segment": self.sum / self.n,
            "zero_fraction": self.zero / self.n,
            "p10": self.percentile(10), "p50": self.percentile(50), "p90": self.percentile(90),
            "p99": self.percentile(99), "min": self.min, "max": self.max,
            "histogram": {"edges": [str(e) for e in EDGES], "counts": self.hist.tolist()},
        }
