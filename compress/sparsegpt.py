"""SparseGPT: one-shot pruning with an approximate OBS weight update (Frantar & Alistarh, 2023).

For a layer W (rows, cols) with input Hessian H = 2 X X^T, weights are removed column by column;
the error of each removed weight is spread over the columns not yet visited through the Cholesky
factor of H^-1 (the paper's Algorithm 1, with lazy updates in blocks of `blocksize` columns and the
mask chosen adaptively per block from w^2 / [H^-1]_jj^2, eq. 3).
"""

from __future__ import annotations

import torch

from compress.errors import CompressError

CHOLESKY_RETRIES = 3  # each retry multiplies the damping by 10


def inverse_hessian_factor(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = dampening * mean(diag H).

    Returns the factor and the damping fraction that finally worked (raised on a failed Cholesky).
    """
    diag_mean = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(CHOLESKY_RETRIES + 1):
        frac = dampening * 10**attempt
        L, info = torch.linalg.cholesky_ex(H + frac * diag_mean * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), frac
    raise CompressError(f"SparseGPT: Hessian not positive definite even with dampening {frac}; raise `dampening`")


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, float]:
    """Pruned and updated copy of W (rows, cols), float32; and the damping fraction used.

    sparsity is ignored when nm = (n, m) is given: then n of every m consecutive weights stay.
    """
    W = W.float().clone()  # (rows, cols) working copy; the caller writes it back once
    H = H.float().clone()  # (cols, cols)
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise CompressError(f"pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
    dead = torch.diag(H) == 0  # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp_used = inverse_hessian_factor(H, dampening)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # The block's columns as rows (count, rows): every per-column step below reads and writes
        # contiguous memory, and one column costs two tensor ops.
        W1 = W[:, i1:i2].t().contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1).unsqueeze(1)  # (count, 1)
        if nm is None:
            saliency = W1**2 / d**2  # eq. 3, for the whole block of columns
            k = round(saliency.numel() * sparsity)
            pruned = torch.zeros(saliency.numel(), dtype=W.dtype, device=W.device)
            if k > 0:
                pruned[torch.topk(saliency.flatten(), k, largest=False).indices] = 1
            scale = pruned.view_as(W1) / d  # err = w * scale: w / [H^-1]_ii where pruned, 0 where kept
        else:
            scale = torch.zeros_like(W1)
        Err1 = torch.empty_like(W1)

        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # choose the group's mask on the updated weights
                n, m = nm
                group = W1[i : i + m] ** 2 / d[i : i + m] ** 2  # (m, rows)
                drop = torch.topk(group, m - n, dim=0, largest=False).indices
                scale[i : i + m].scatter_(0, drop, 1.0)
                scale[i : i + m] /= d[i : i + m]
            torch.mul(W1[i], scale[i], out=Err1[i])
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], Err1[i], alpha=-1)  # spread the error over later columns

        W[:, i1:i2] = (W1 * (scale == 0)).t()  # pruned weights exactly zero, kept ones as updated
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)  # lazy update of the columns still to come
    return W, damp_used
