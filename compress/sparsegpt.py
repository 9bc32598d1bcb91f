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
    dead = torch.diag(H) == 0  # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp_used = inverse_hessian_factor(H, dampening)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (count,)

        if nm is None:
            saliency = W1**2 / d.unsqueeze(0) ** 2  # eq. 3, for the whole block of columns
            k = round(saliency.numel() * sparsity)
            mask1 = torch.zeros(saliency.numel(), dtype=torch.bool, device=W.device)
            if k > 0:
                mask1[torch.topk(saliency.flatten(), k, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                group = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(group, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the columns still to come
    return W, damp_used
