"""Integer weight grids: pure tensor functions, each checkable on an 8x16 matrix.

A grid is GPTQ's: per output row and group of `group_size` input columns, a scale and an integer
zero point; q = clamp(round(w / scale) + zero, 0, 2^bits - 1) and w_hat = scale * (q - zero).
The zero point is an integer, so 0 is always on the grid (q = zero): pruned weights stay exactly
zero. Scales are rounded to float16 when chosen, so a checkpoint that stores them in float16
(the GPTQ format) dequantises to exactly the weights we compute with in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator

FP16_TINY = 2.0**-14  # smallest normal float16: a scale below it would not survive the checkpoint


def _group_size(value: int) -> int:
    if value != -1 and value < 1:
        raise ValueError("group_size must be a positive number of columns or -1 (per channel)")
    return value


# Input columns per scale in a recipe; -1: one scale per output row.
GroupSize = Annotated[int, AfterValidator(_group_size)]


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # columns per group; -1: one group per row (per channel)
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else -(-columns // self.group_size)

    def width(self, columns: int) -> int:
        return columns if self.group_size == -1 else self.group_size


def grid_params(W: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of W (rows, cols), over all of its columns: (rows,), (rows,).

    As GPTQ's quantizer: the range always includes 0; symmetric grids centre it at zero =
    (maxq + 1) / 2; an all-zero row gets the range [-1, 1].
    """
    W = W.float()
    xmin = W.min(dim=1).values.clamp(max=0)
    xmax = W.max(dim=1).values.clamp(min=0)
    if grid.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / grid.maxq).clamp(min=FP16_TINY).half().float()
    if grid.sym:
        zero = torch.full_like(scale, (grid.maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, grid.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor holding integers) of w on the grid; scale/zero broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def rounding_slack(grid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
    """How far a weight of `dtype` may lie from its grid value `grid`: nothing in float32; a
    bfloat16 / float16 model holds the grid values rounded to its dtype, up to one unit in the
    last place of the value."""
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * grid.abs()


@dataclass
class QuantState:
    """Where a Linear's weight sits on its grid: what an exporter needs to pack it.

    scales, zeros: (groups, rows) float32 (scales hold float16 values, zeros integers);
    g_idx: (cols,) int32, the group of each input column (not sorted under act_order).
    """

    grid: Grid
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def codes(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes (rows, cols) int32 of W (rows, cols), which must lie on this grid."""
        scale = self.scales[self.g_idx.long()].t()  # (rows, cols)
        zero = self.zeros[self.g_idx.long()].t()
        q = quantize(W.float(), scale, zero, self.grid.maxq)
        grid = dequantize(q, scale, zero)
        # bfloat16: |q - zero| / 128 scales of slack, far from the next code at 4 bits; 8-bit codes
        # of large values may come back one off
        if ((grid - W.float()).abs() > 0.01 * scale + rounding_slack(grid, W.dtype)).any():
            raise ValueError("weights are not on their quantization grid (changed after quantizing?)")
        return q.to(torch.int32)

    def dequantized(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q.float(), self.scales[self.g_idx.long()].t(), self.zeros[self.g_idx.long()].t())


def sequential_g_idx(columns: int, grid: Grid, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Group of each input column: column j of the (possibly act-order permuted) sequence is in
    group j // group_size; perm[j] is the original column at position j."""
    order = torch.arange(columns) // grid.width(columns)
    if perm is None:
        return order.to(torch.int32)
    g_idx = torch.empty(columns, dtype=torch.int32)
    g_idx[perm] = order.to(torch.int32)
    return g_idx


def rtn(W: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, QuantState]:
    """Round to nearest, group by group: the weights on the grid (float32) and their state."""
    W = W.float()
    rows, cols = W.shape
    width = grid.width(cols)
    scales, zeros, out = [], [], torch.empty_like(W)
    for c0 in range(0, cols, width):
        block = W[:, c0 : c0 + width]
        scale, zero = grid_params(block, grid)
        out[:, c0 : c0 + width] = dequantize(quantize(block, scale[:, None], zero[:, None], grid.maxq), scale[:, None], zero[:, None])
        scales.append(scale)
        zeros.append(zero)
    return out, QuantState(grid, torch.stack(scales), torch.stack(zeros), sequential_g_idx(cols, grid))


def output_sqnr(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Signal-to-noise ratio (dB) of a layer's outputs X W^T on its calibration inputs, from their
    Hessian H (any multiple of X^T X; the outputs themselves are never kept):
    tr(W H W^T) / tr(E H E^T), E = W - W_hat."""
    E = W - W_hat
    signal = float(((W @ H) * W).sum())
    noise = float(((E @ H) * E).sum())
    return 10 * float(torch.log10(torch.tensor(signal / max(noise, 1e-30))))


BNB_BLOCKSIZE = 64  # weights per absmax in bitsandbytes 4-bit (its default, what transformers saves)


def stored_bits(module) -> float:
    """Bits the layer's weight takes in its checkpoint: codes plus scales, zero points and group
    indices (GPTQ: float16 scales, packed zeros, int32 g_idx; bitsandbytes: float32 absmax per
    64-weight block, or per row for int8); the dtype's width for a plain weight."""
    W = module.weight
    rows, cols = W.shape
    n = rows * cols
    state = getattr(module, "quant_state", None)
    if state is not None and hasattr(state, "fmt"):  # llama.cpp block format (compress/algorithms/ggml_formats.py)
        return state.fmt.bits_per_weight * n
    if state is not None:
        bits = state.grid.bits
        return bits * n + state.grid.groups(cols) * rows * (16 + bits) + 32 * cols
    fmt = getattr(module, "bnb_format", None)
    if fmt == "int8":
        return 8 * n + 32 * rows
    if fmt is not None:
        return 4 * n + 32 * (n // BNB_BLOCKSIZE)
    return W.element_size() * 8 * n
