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

from compress.algorithms import ggml_formats
from compress.algorithms.ggml_formats import BlockFormat, GgufState
from compress.algorithms.quant import Grid, QuantState, dequantize, grid_params, quantize, sequential_g_idx
from compress.errors import CompressError

CHOLESKY_RETRIES = 3  # each retry multiplies the damping by 10


def inverse_hessian_factor(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = dampening * mean(diag H).

    Returns the factor and the damping fraction that finally worked (raised on a failed Cholesky).
    """
    diag_mean = torch.mean(torch.diag(H))
    for attempt in range(CHOLESKY_RETRIES + 1):
        frac = dampening * 10**attempt
        # one damped copy, no identity matrix beside it: for an 11008-wide layer each square is
        # 0.5 GB, and these are the peak of a streamed 7B run
        damped = H.clone()
        damped.diagonal().add_(frac * diag_mean)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
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


class BlockCursor:
    """GPTQ on one of llama.cpp's block formats: when the pass reaches a span (one GGUF block of
    columns), its parameters are chosen from the weights as updated so far, in stored column order
    (a reordered pass visits a span's columns in another order); each column is then rounded on
    its sub-block's scale. importance: diag(H) in stored order, to weigh the scale search."""

    def __init__(self, fmt: BlockFormat, perm: torch.Tensor | None, cols: int, importance: torch.Tensor):
        self.fmt, self.importance = fmt, importance
        self.stored = perm if perm is not None else torch.arange(cols, device=importance.device)
        self.spans: dict[int, ggml_formats.SpanParams] = {}

    def start(self, position: int, current: torch.Tensor) -> None:
        """current (rows, span): the span's weights in visiting order, from visiting position on."""
        fmt = self.fmt
        stored = self.stored[position : position + fmt.span]
        base = int(stored.min())
        local = stored - base
        weights = torch.empty_like(current)
        weights[:, local] = current
        params = ggml_formats.choose(fmt, weights, self.importance[base : base + fmt.span])
        self.spans[base // fmt.span] = params
        scale, offset = ggml_formats.effective(fmt, params)  # (rows, subs) or (rows, 1)
        sub = local // fmt.width if fmt.sub_bits else torch.zeros_like(local)
        # (span, rows) in visiting order: column k's parameters are one contiguous row
        self.scale = scale[:, sub].t().contiguous()
        self.inverse = torch.where(self.scale != 0, 1 / torch.where(self.scale != 0, self.scale, 1), 0)
        self.offset = None if offset is None else offset[:, sub].t().contiguous()

    def column(self, w: torch.Tensor, k: int) -> torch.Tensor:
        """The column on its grid: nearest code (a zero scale: code 0), decoded as gguf decodes."""
        if self.offset is None:
            return torch.round(w * self.inverse[k]).clamp_(self.fmt.lo, self.fmt.hi).mul_(self.scale[k])
        q = torch.round((w - self.offset[k]) * self.inverse[k]).clamp_(self.fmt.lo, self.fmt.hi)
        return q.mul_(self.scale[k]).add_(self.offset[k])

    def state(self) -> GgufState:
        return GgufState.stack(self.fmt, [self.spans[k] for k in sorted(self.spans)])


class Pruned:
    """No grid: a pruned weight's error is the weight itself, a kept one stays as updated."""

    on_grid = False

    def column(self, W1, W, drop, i1, i2, i):
        return None

    def state(self, perm):
        return None


class GroupRounding:
    """GPTQ onto an integer grid: each group's scale and zero point are chosen when the pass
    reaches the group, from its weights as updated so far (pruned ones as zero)."""

    on_grid = True

    def __init__(self, grid: Grid, rows: int, cols: int, act_order: bool | str, device):
        self.grid, self.cols, self.act_order = grid, cols, act_order
        self.width = grid.width(cols)
        self.scales = torch.zeros(grid.groups(cols), rows, device=device)
        self.zeros = torch.zeros_like(self.scales)
        self.scale = self.zero = None  # the current group's grid, (rows,) each

    def column(self, W1, W, drop, i1, i2, i):
        width = self.width
        if (i1 + i) % width == 0:  # a new group: its grid from the weights as they are now
            g = (i1 + i) // width
            current = torch.cat([(W1[i : i + width] * ~drop[i : i + width]).t(), W[:, i2 : i1 + i + width]], dim=1)
            self.scale, self.zero = grid_params(current, self.grid)
            self.scales[g], self.zeros[g] = self.scale, self.zero
        return dequantize(quantize(W1[i], self.scale, self.zero, self.grid.maxq), self.scale, self.zero).masked_fill_(drop[i], 0)

    def state(self, perm) -> QuantState:
        grid, scales, zeros = self.grid, self.scales, self.zeros
        if self.act_order == "group" and perm is not None:
            # groups were visited in another order but each is still one block of stored columns:
            # put their scales back in stored order; g_idx stays sequential
            order = perm[:: self.width] // self.width  # stored group of each visited group
            scales[order], zeros[order] = scales.clone(), zeros.clone()
            return QuantState(grid, scales, zeros, sequential_g_idx(self.cols, grid))
        return QuantState(grid, scales, zeros, sequential_g_idx(self.cols, grid, perm))


class BlockRounding:
    """GPTQ onto one of llama.cpp's block formats (BlockCursor): a span's parameters are chosen
    when the pass reaches the span; zeros are exact only where the format holds one."""

    on_grid = True

    def __init__(self, fmt: BlockFormat, perm: torch.Tensor | None, cols: int, importance: torch.Tensor):
        self.fmt, self.cursor = fmt, BlockCursor(fmt, perm, cols, importance)

    def column(self, W1, W, drop, i1, i2, i):
        span, k = self.fmt.span, (i1 + i) % self.fmt.span
        if k == 0:  # a new span: its parameters from the weights as they are now
            self.cursor.start(i1 + i, torch.cat([(W1[i : i + span] * ~drop[i : i + span]).t(), W[:, i2 : i1 + i + span]], dim=1))
        q = self.cursor.column(W1[i], k)
        if self.fmt.holds_zero:
            q.masked_fill_(drop[i], 0)
        return q

    def state(self, perm) -> GgufState:
        return self.cursor.state()


def prepared(W: torch.Tensor, H: torch.Tensor, nm, grid, blocksize: int, act_order: bool | str):
    """(W, H) as float32 working copies with dead inputs zeroed, the lazy-update block size, the
    visiting order (None: as stored) and the importance of each stored column (diag H)."""
    W = W.float().clone()  # (rows, cols) working copy; the caller writes it back once
    H = H.float().clone()  # (cols, cols)
    cols = W.shape[1]
    if nm is not None and cols % nm[1]:
        raise CompressError(f"pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
    dead = torch.diag(H) == 0  # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0
    if isinstance(grid, BlockFormat):
        if act_order is True:
            raise CompressError(f"act_order true scatters columns over blocks; {grid.name} blocks are runs of stored columns: use group or false")
        if cols % grid.span:
            raise CompressError(f"{grid.name} needs rows of whole {grid.span}-column blocks, got {cols} columns")
        # lazy-update chunks start where spans start, so a span's weights are current when it begins
        blocksize = grid.span if blocksize < grid.span else blocksize // grid.span * grid.span
    width = cols if grid is None else grid.span if isinstance(grid, BlockFormat) else grid.width(cols)
    return W, H, blocksize, visiting_order(torch.diag(H), act_order, width), torch.diag(H).clone()


def obs_importance(Hinv: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """1 / [U]_jj^2 per stored column (U: Hinv, the upper Cholesky factor of H^-1 in visiting
    order): GPTQ's loss for rounding column j by e is e^2 / [U]_jj^2."""
    visiting = 1 / torch.diag(Hinv) ** 2
    if perm is None:
        return visiting
    stored = torch.empty_like(visiting)
    stored[perm] = visiting
    return stored


def rounding_for(grid, perm, act_order, rows: int, cols: int, importance: torch.Tensor, device):
    if grid is None:
        return Pruned()
    if isinstance(grid, BlockFormat):
        return BlockRounding(grid, perm, cols, importance)
    return GroupRounding(grid, rows, cols, act_order, device)


def block_mask(W1: torch.Tensor, d: torch.Tensor, frozen: torch.Tensor | None, i1: int, i2: int, sparsity: float) -> torch.Tensor:
    """(count, rows) bool: the frozen zeros of a block of columns, plus the `sparsity` share of its
    weights with the lowest saliency w^2 / [H^-1]_jj^2 (eq. 3) chosen for the whole block at once."""
    drop = torch.zeros_like(W1, dtype=torch.bool) if frozen is None else frozen[:, i1:i2].t().contiguous()
    if sparsity > 0:
        saliency = W1**2 / d**2
        k = round(saliency.numel() * sparsity)
        if k > 0:
            drop.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
    return drop


def nm_group_mask(W1, d, drop, drop_scale, i: int, nm: tuple[int, int]) -> None:
    """N:M: the m - n lowest-saliency weights of columns i..i+m (as updated so far) are dropped."""
    n, m = nm
    group = W1[i : i + m] ** 2 / d[i : i + m] ** 2  # (m, rows)
    drop[i : i + m].scatter_(0, torch.topk(group, m - n, dim=0, largest=False).indices, True)
    drop_scale[i : i + m] = drop[i : i + m] / d[i : i + m]


def compress_columns(W, Hinv, frozen, rounding, i1: int, i2: int, sparsity: float, nm) -> None:
    """Columns i1..i2 of W, in place: each pruned or rounded in turn, its error spread over the
    block's later columns, then lazily over the columns still to come (GPTQ's lazy batch update)."""
    # The block's columns as rows (count, rows): every per-column step below reads and writes
    # contiguous memory.
    W1 = W[:, i1:i2].t().contiguous()
    Hinv1 = Hinv[i1:i2, i1:i2]
    d = torch.diag(Hinv1).unsqueeze(1)  # (count, 1)
    drop = block_mask(W1, d, frozen, i1, i2, sparsity if nm is None else 0.0)
    Err1 = torch.empty_like(W1)
    drop_scale = drop / d  # err = w * drop_scale: w / [H^-1]_ii where pruned, 0 where kept
    for i in range(i2 - i1):
        if nm is not None and i % nm[1] == 0:  # choose the group's mask on the updated weights
            nm_group_mask(W1, d, drop, drop_scale, i, nm)
        q = rounding.column(W1, W, drop, i1, i2, i)
        if q is None:
            torch.mul(W1[i], drop_scale[i], out=Err1[i])  # two tensor ops per column
        else:
            torch.sub(W1[i], q, out=Err1[i]).div_(d[i])
            W1[i] = q
        W1[i + 1 :].addr_(Hinv1[i, i + 1 :], Err1[i], alpha=-1)  # spread the error over later columns

    # pruned weights exactly zero, kept ones as updated (or on their grid)
    W[:, i1:i2] = (W1 if rounding.on_grid else W1 * ~drop).t()
    W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)  # lazy update of the columns still to come


def obs_compress(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    frozen: torch.Tensor | None = None,
    grid: Grid | BlockFormat | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    act_order: bool | str = False,
    scale_weights: str = "hessian",
) -> tuple[torch.Tensor, float, QuantState | GgufState | None]:
    """Compressed and updated copy of W (rows, cols) in float32, the damping fraction used, and
    the grid state when quantising.

    sparsity / nm: prune adaptively (nm = (n, m): n of every m consecutive weights stay, and
    sparsity is ignored). frozen (rows, cols) bool: weights that must end exactly zero (pruned
    by an earlier stage); their error is compensated like any other. grid: quantise the kept
    weights; a BlockFormat (llama.cpp's q4_0 ... q6_k) puts them on that format's blocks, whose
    zeros are exact only for the symmetric formats (frozen zeros of asymmetric ones are rounded
    like any weight). act_order: the order columns are visited in (see visiting_order): False (as
    stored), True (descending diag(H), GPTQ's desc_act; not for block formats, whose blocks are
    runs of stored columns) or "group" (group-aware reordering). scale_weights (block formats):
    what weighs each column in a span's scale search: "hessian" diag(H) (llama-imatrix's statistic),
    or "obs" 1 / [U]_jj^2 with U the Cholesky factor of H^-1, the weight GPTQ's own loss gives a
    column's rounding error once the later columns compensate it.
    """
    W, H, blocksize, perm, importance = prepared(W, H, nm, grid, blocksize, act_order)
    rows, cols = W.shape
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        frozen = None if frozen is None else frozen[:, perm]
    Hinv, damp_used = inverse_hessian_factor(H, dampening)
    if scale_weights == "obs":
        importance = obs_importance(Hinv, perm)
    rounding = rounding_for(grid, perm, act_order, rows, cols, importance, W.device)

    for i1 in range(0, cols, blocksize):
        compress_columns(W, Hinv, frozen, rounding, i1, min(i1 + blocksize, cols), sparsity, nm)

    state = rounding.state(perm)
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
    grid: Grid | BlockFormat,
    frozen: torch.Tensor | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    act_order: bool | str = False,
    scale_weights: str = "hessian",
) -> tuple[torch.Tensor, float, QuantState]:
    """GPTQ: W on its grid, float32; frozen weights (an earlier stage's zeros) end exactly zero."""
    return obs_compress(W, H, frozen=frozen, grid=grid, blocksize=blocksize, dampening=dampening, act_order=act_order,
                        scale_weights=scale_weights)
