"""Exact streaming quantile of the top tail, per row: the thresholds of network dissection
(:mod:`xkd.metrics.dissection`; Bau et al., CVPR 2017, §3.1: the top 0.5 % of a unit's activations).

A quantile ``q`` close to 1 is an order statistic of the top tail, so :class:`StreamingTopQuantile`
keeps only the ``N - floor(q (N - 1))`` largest values of each row, merged chunk by chunk with
``topk``: exact, in one pass, holding ``(1 - q) N + 1`` values per row instead of all ``N``. The
interpolation is torch.quantile's ``linear`` rule, the rank computed in float64 (torch computes it
in the input's dtype).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xkd.errors import DissectionError

MAX_BUFFER = 2**26  # values held by the streaming quantile (256 MiB of float32)


class StreamingTopQuantile:
    """Exact per-row quantile ``q`` of ``total`` values per row that arrive in chunks.

    Keeps the ``k = total - floor(q (total - 1))`` largest values of each row (all that the order
    statistics at ranks ``floor`` and ``ceil`` of ``q (total - 1)`` depend on), so memory is
    ``rows x k`` however many chunks arrive. :meth:`result` interpolates linearly between the two
    order statistics, as ``torch.quantile(..., interpolation="linear")`` does.

    Args:
        rows: number of rows (units).
        total: values per row that will be given, in all.
        q: the quantile, in ``[0, 1]``.
        max_elements: refuse a buffer larger than this (``rows x k`` values).
    """

    def __init__(self, rows: int, total: int, q: float, max_elements: int = MAX_BUFFER) -> None:
        if not 0.0 <= q <= 1.0:
            raise DissectionError(f"quantile must be in [0, 1], got {q}")
        if total < 1:
            raise DissectionError("no values: the quantile of an empty set is undefined")
        self.rows, self.total, self.q = rows, total, q
        self.pos = q * (total - 1)  # float64: exact rank (torch computes it in the data's dtype)
        self.lo = math.floor(self.pos)
        self.k = total - self.lo
        if rows * self.k > max_elements:
            raise DissectionError(
                f"quantile {q} of {total} values per unit needs the top {self.k} values of each of {rows} units "
                f"({rows * self.k} > max_buffer={max_elements}); use a higher quantile (dissection uses 0.99-0.999), "
                "fewer images, or raise max_buffer"
            )
        self.seen = 0
        self.top: Tensor | None = None
        self.min: Tensor | None = None

    def update(self, values: Tensor) -> None:
        """Add a chunk ``(rows, n)``."""
        if values.ndim != 2 or values.shape[0] != self.rows:
            raise ValueError(f"expected a chunk of shape ({self.rows}, n), got {tuple(values.shape)}")
        self.seen += values.shape[1]
        if self.seen > self.total:
            raise ValueError(f"got {self.seen} values per row, more than the announced total {self.total}")
        lo = values.amin(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        pool = values if self.top is None else torch.cat([self.top, values], dim=1)
        self.top = pool if pool.shape[1] <= self.k else pool.topk(self.k, dim=1, sorted=False).values

    def result(self) -> Tensor:
        """The ``(rows,)`` quantiles, in the values' dtype."""
        if self.seen != self.total or self.top is None:
            raise ValueError(f"got {self.seen} values per row, expected {self.total}")
        top = self.top.sort(dim=1, descending=True).values  # top[:, j] = order statistic total-1-j
        hi = min(self.lo + 1, self.total - 1)
        below, above = top[:, self.k - 1], top[:, self.total - 1 - hi]
        weight = torch.tensor(self.pos - self.lo, dtype=top.dtype, device=top.device)
        return torch.lerp(below, above, weight)


__all__ = ["MAX_BUFFER", "StreamingTopQuantile"]
