"""Pruning scores and masks: pure tensor functions, each checkable on an 8x16 matrix.

Masks are boolean (out, in) tensors, True where a weight is removed.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError


def magnitude_score(W: torch.Tensor) -> torch.Tensor:
    return W.abs()


def wanda_score(W: torch.Tensor, norm2: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||  (Wanda, Sun et al. 2023, eq. 1); W (out, in), norm2 (in,) = ||X_j||^2."""
    return W.abs() * norm2.sqrt().unsqueeze(0)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the round(sparsity * in) lowest scores of every row (Wanda's per-output comparison)."""
    rows, cols = score.shape
    k = round(sparsity * cols)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the round(sparsity * numel) lowest scores of the whole matrix."""
    k = round(sparsity * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row (N:M sparsity)."""
    rows, cols = score.shape
    if cols % m:
        raise CompressError(f"pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if m - n > 0:
        mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def is_nm(W: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive weights in every row has at most n nonzeros."""
    rows, cols = W.shape
    return bool(((W.reshape(rows, cols // m, m) != 0).sum(dim=2) <= n).all())


def fraction_zero(W: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(W)) / W.numel()
