"""Optimal Brain Surgeon updates, column by column: SparseGPT (pruning), GPTQ (quantisation) and
both at once, on one solver.

For a layer W (rows, cols) with input Hessian H = 2 X X^T, columns are visited in order; each
column's weights are replaced (by zero where pruned, by their grid value where quantised) and
the error is spread over the columns not yet visited through the Cholesky factor of H^-1, with
lazy updates in blocks of `blocksize` columns. SparseGPT (Frantar & Alistarh, 2023, Algorithm 1)
chooses the mask per block from w^2 / [H^-1]_jj^2 (eq. 3); GPTQ (Frantar et al., 2022,
Algorithm 1) rounds each column to its group's grid, the group's scale chosen when the group
starts, on the weights as updated so far. Joint mode (SparseGPT section 3.5) does both: pruned
weights go to zero, kept ones to the grid, one error feedback for both.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.quant import Grid, QuantState, dequantize, grid_params, quantize, sequential_g_idx

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
    raise CompressError(f"OBS solver: Hessian not positive definite even with dampening {frac}; raise `dampening`")


def visiting_order(diag: torch.Tensor, act_order: bool | str, width: int) -> torch.Tensor | None:
    """The column order of the OBS pass (None: as stored). Columns visited early have their
    error spread over more columns, so the important ones (large diag(H)) go first.

    True: every column by descending diag(H) (GPTQ's desc_act): groups then hold scattered
    columns, and a checkpoint needs g_idx to find them (slower kernels). "group": group-aware
    reordering (Gafni et al., CVPRW 2025; gptqmodel's default): inside each group of `width`
    stored columns by descending diag(H), and whole groups by their largest diag(H), so every
    group stays one block of stored columns; a last, shorter group stays last."""
    if not act_order:
        return None
    if act_order is True:
        return torch.argsort(diag, descending=True)
    full = diag.numel() // width
    local = torch.argsort(diag[: full * width].view(full, width), dim=1, descending=True)  # (groups, width)
    groups = torch.argsort(diag[: full * width].view(full, width).max(dim=1).values, descending=True)
    perm = (local[groups] + (groups * width)[:, None]).reshape(-1)
    tail = torch.arange(full * width, diag.numel())  # a short last group, in stored order
    return torch.cat([perm, tail])


def obs_compress(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    frozen: torch.Tensor | None = None,
    grid: Grid | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    act_order: bool | str = False,
) -> tuple[torch.Tensor, float, QuantState | None]:
    """Compressed and updated copy of W (rows, cols) in float32, the damping fraction used, and
    the grid state when quantising.

    sparsity / nm: prune adaptively (nm = (n, m): n of every m consecutive weights stay, and
    sparsity is ignored). frozen (rows, cols) bool: weights that must end exactly zero (pruned
    by an earlier stage); their error is compensated like any other. grid: quantise the kept
    weights. act_order: the order columns are visited in (see visiting_order): False (as
    stored), True (descending diag(H), GPTQ's desc_act) or "group" (group-aware reordering).
    """
    W = W.float().clone()  # (rows, cols) working copy; the caller writes it back once
    H = H.float().clone()  # (cols, cols)
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise CompressError(f"pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
    dead = torch.diag(H) == 0  # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = visiting_order(torch.diag(H), act_order, grid.width(cols) if grid is not None else cols)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        frozen = None if frozen is None else frozen[:, perm]
    Hinv, damp_used = inverse_hessian_factor(H, dampening)
    if grid is not None:
        width = grid.width(cols)
        scales = torch.zeros(grid.groups(cols), rows, device=W.device)
        zeros = torch.zeros_like(scales)
        scale = zero = None  # the current group's grid, (rows,) each

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # The block's columns as rows (count, rows): every per-column step below reads and writes
        # contiguous memory.
        W1 = W[:, i1:i2].t().contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1).unsqueeze(1)  # (count, 1)
        drop = torch.zeros_like(W1, dtype=torch.bool) if frozen is None else frozen[:, i1:i2].t().contiguous()
        if nm is None and sparsity > 0:
            saliency = W1**2 / d**2  # eq. 3, for the whole block of columns
            k = round(saliency.numel() * sparsity)
            if k > 0:
                drop.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        Err1 = torch.empty_like(W1)
        drop_scale = drop / d  # err = w * drop_scale: w / [H^-1]_ii where pruned, 0 where kept
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # choose the group's mask on the updated weights
                n, m = nm
                group = W1[i : i + m] ** 2 / d[i : i + m] ** 2  # (m, rows)
                drop[i : i + m].scatter_(0, torch.topk(group, m - n, dim=0, largest=False).indices, True)
                drop_scale[i : i + m] = drop[i : i + m] / d[i : i + m]
            if grid is None:
                torch.mul(W1[i], drop_scale[i], out=Err1[i])  # two tensor ops per column
            else:
                if (i1 + i) % width == 0:  # a new group: its grid from the weights as they are now
                    g = (i1 + i) // width
                    current = torch.cat([(W1[i : i + width] * ~drop[i : i + width]).t(), W[:, i2 : i1 + i + width]], dim=1)
                    scale, zero = grid_params(current, grid)
                    scales[g], zeros[g] = scale, zero
                q = dequantize(quantize(W1[i], scale, zero, grid.maxq), scale, zero).masked_fill_(drop[i], 0)
                torch.sub(W1[i], q, out=Err1[i]).div_(d[i])
                W1[i] = q
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], Err1[i], alpha=-1)  # spread the error over later columns

        # pruned weights exactly zero, kept ones as updated (or on their grid)
        W[:, i1:i2] = (W1 if grid is not None else W1 * ~drop).t()
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)  # lazy update of the columns still to come

    state = None
    if grid is not None and act_order == "group" and perm is not None:
        # groups were visited in another order but each is still one block of stored columns:
        # put their scales back in stored order; g_idx stays sequential
        order = perm[::width] // width  # stored group of each visited group
        scales[order], zeros[order] = scales.clone(), zeros.clone()
        state = QuantState(grid, scales, zeros, sequential_g_idx(cols, grid))
    elif grid is not None:
        state = QuantState(grid, scales, zeros, sequential_g_idx(cols, grid, perm))
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W, damp_used, state


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    grid: Grid | None = None,
) -> tuple[torch.Tensor, float, QuantState | None]:
    """SparseGPT: pruned (and, with a grid, quantised: joint mode) copy of W, float32."""
    return obs_compress(W, H, sparsity=sparsity, nm=nm, grid=grid, blocksize=blocksize, dampening=dampening)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    frozen: torch.Tensor | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    act_order: bool | str = False,
) -> tuple[torch.Tensor, float, QuantState]:
    """GPTQ: W on its grid, float32; frozen weights (an earlier stage's zeros) end exactly zero."""
    return obs_compress(W, H, frozen=frozen, grid=grid, blocksize=blocksize, dampening=dampening, act_order=act_order)
