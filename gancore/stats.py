"""Statistics reported from anywhere, aggregated on the device, read in one host sync (shared/STYLE.md #6)."""

from __future__ import annotations

import math

import torch


class StatsAccumulator:
    """Sums 0-d tensors per name on their device; `read()` returns the means with one transfer."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, s: dict) -> None:
        self.sums, self.counts = dict(s["sums"]), {k: int(v) for k, v in s["counts"].items()}

    def read(self, reduce=None) -> dict[str, float]:
        """Means since the last read (then reset). `reduce(tensor)` averages across processes when given."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        if reduce is not None:
            means = reduce(means)
        values = means.cpu().tolist()  # the one host sync
        self.sums, self.counts = {}, {}
        return dict(zip(keys, values))


def non_finite(values: dict[str, float]) -> list[str]:
    return [k for k, v in values.items() if not math.isfinite(v)]
