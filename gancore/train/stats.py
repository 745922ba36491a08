"""Statistics reported from anywhere, aggregated on the device, read in one host sync."""

from __future__ import annotations

import math

import torch


class StatsAccumulator:
    """Sums 0-d tensors per name on their device; `read()` returns the means with one transfer.

    Two ways in: `add(stats)` (the plain loop: a dict of 0-d tensors, counted), and `add_block(keys, values)` +
    `add_counts(counts)` (the static step of gancore/train/fast.py: one in-place add of a stacked vector into a fixed
    buffer per key tuple, which a CUDA graph can replay; the host counts separately). Reads merge both.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.blocks: dict[tuple[str, ...], torch.Tensor] = {}  # fixed buffers: zeroed in place, never replaced

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def add_block(self, keys: tuple[str, ...], values: torch.Tensor) -> None:
        """values (len(keys),) summed into the block of `keys` (allocated on first use: before any graph capture)."""
        block = self.blocks.get(keys)
        if block is None:
            block = self.blocks[keys] = torch.zeros_like(values)
            for i, k in enumerate(keys):  # sums loaded from a checkpoint continue in the block (same rounding order)
                if k in self.sums:
                    block[i] = self.sums.pop(k)
        block.add_(values)

    def add_counts(self, counts: dict[str, int]) -> None:
        for k, n in counts.items():
            self.counts[k] = self.counts.get(k, 0) + n

    def _totals(self) -> dict[str, torch.Tensor]:
        """Per key: the dict sum plus every block's entry (keys with a count only)."""
        out = dict(self.sums)
        for keys, block in self.blocks.items():
            for i, k in enumerate(keys):
                if self.counts.get(k):
                    out[k] = out[k] + block[i] if k in out else block[i]
        return out

    def state_dict(self) -> dict:
        return {"sums": {k: v.clone() for k, v in self._totals().items()}, "counts": dict(self.counts)}

    def load_state_dict(self, s: dict) -> None:
        self.sums, self.counts = dict(s["sums"]), {k: int(v) for k, v in s["counts"].items()}
        for block in self.blocks.values():
            block.zero_()

    def read(self, reduce=None) -> dict[str, float]:
        """Means since the last read (then reset). `reduce(tensor)` averages across processes when given."""
        totals = self._totals()
        if not totals:
            return {}
        keys = sorted(totals)
        means = torch.stack([totals[k] / self.counts[k] for k in keys])
        if reduce is not None:
            means = reduce(means)
        values = means.cpu().tolist()  # the one host sync
        self.sums, self.counts = {}, {}
        for block in self.blocks.values():
            block.zero_()  # in place: a captured graph keeps adding into this memory
        return dict(zip(keys, values))


def non_finite(values: dict[str, float]) -> list[str]:
    return [k for k, v in values.items() if not math.isfinite(v)]
