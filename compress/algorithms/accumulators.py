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

    def share(self, other: "InputNorms") -> None:
        self.sum_sq, self.tokens = other.sum_sq, other.tokens

    @property
    def norm2(self) -> torch.Tensor:
        assert self.tokens > 0, "no calibration input reached this layer"
        return (self.sum_sq / self.tokens).float()  # (in,)


class Hessian:
    """H = 2/N * sum over tokens of x x^T (SparseGPT's add_batch, with N counted in tokens), float32.

    x^T x is most of SparseGPT's cost on a CPU. H is symmetric, so only its upper block triangle is
    accumulated: BANDS row bands, each one product with the columns from its diagonal on, which
    is 10/16 of the work (torch has no syrk); `H` mirrors it into the full matrix.
    """

    BANDS = 4

    def __init__(self, columns: int):
        self.columns = columns
        self.sum: torch.Tensor | None = None  # made on the device of the first input
        self.tokens = 0
        self.edges = [columns * k // self.BANDS for k in range(self.BANDS + 1)]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sum is None:
            self.sum = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=x.device)
        total = self.tokens + x.shape[0]
        self.sum *= self.tokens / total  # keep a running mean: no overflow on long calibration
        x = x * (2.0 / total) ** 0.5
        for a, b in zip(self.edges, self.edges[1:]):
            self.sum[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
        self.tokens = total

    def share(self, other: "Hessian") -> None:
        self.sum, self.tokens = other.sum, other.tokens

    @property
    def H(self) -> torch.Tensor:
        """The full symmetric matrix (a new tensor)."""
        assert self.tokens > 0, "no calibration input reached this layer"
        return torch.triu(self.sum) + torch.triu(self.sum, 1).t()
