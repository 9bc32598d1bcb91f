"""Streaming statistics of a Linear layer's inputs, fed one calibration segment at a time.

They never store activations: memory is O(in_features) for norms, O(in_features^2) for the Hessian.
"""

from __future__ import annotations

import torch


class InputNorms:
    """Mean squared value of each input column over all tokens: Wanda's ||X_j||^2 up to a constant
    (the constant cancels in every comparison made with it)."""

    def __init__(self, columns: int):
        self.columns = columns
        self.sum_sq: torch.Tensor | None = None  # made on the device of the first input
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sum_sq is None:
            self.sum_sq = torch.zeros(self.columns, dtype=torch.float64, device=x.device)
        self.sum_sq += (x * x).sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def norm2(self) -> torch.Tensor:
        assert self.tokens > 0, "no calibration input reached this layer"
        return (self.sum_sq / self.tokens).float()  # (in,)


class Hessian:
    """H = 2/N * sum over tokens of x x^T (SparseGPT's add_batch, with N counted in tokens), float32."""

    def __init__(self, columns: int):
        self.columns = columns
        self.H: torch.Tensor | None = None  # made on the device of the first input
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.H is None:
            self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=x.device)
        total = self.tokens + x.shape[0]
        self.H *= self.tokens / total  # keep a running mean: no overflow on long calibration
        x = x * (2.0 / total) ** 0.5
        self.H += x.t() @ x
        self.tokens = total
