"""Per-block ratios (sparsity here; the same numbers can drive rank or bit budgets later).

Every allocator returns one ratio per decoder block, within [0, MAX_RATIO], whose mean weighted by
the block sizes equals the target exactly. None of them needs a model: OWL takes outlier shares
and AlphaPruning takes per-block alphas, computed elsewhere from the model.

    uniform   s_i = S
    atp       s_i = S - beta (L-1)/2 + i beta      (Huang et al., ICML 2025: errors of early blocks
                                                     are amplified by every later block)
    owl       S +/- lambda, less pruning where more outliers        (Yin et al., 2024)
    alpha     S +/- epsilon, more pruning where the spectrum's heavy-tail exponent is higher
                                                                      (Lu et al., 2024)
    explicit  a list of L ratios
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import torch
from pydantic import Field, model_validator

from compress.config import Config
from compress.errors import CompressError

MAX_RATIO = 0.99


# ---------------------------------------------------------------- configs


class UniformAllocation(Config):
    kind: Literal["uniform"] = "uniform"


class AtpAllocation(Config):
    kind: Literal["atp"] = "atp"
    beta: float | Literal["auto"] = "auto"  # step between consecutive blocks; auto: search
    trials: int = Field(default=5, ge=2)  # compress+validate trials the search may spend (beta=0 is one)
    # calibration windows each trial compresses with (spread over data.calibration); the chosen beta
    # is then compressed once with all of them. "all": every trial uses all, the best one is kept
    trial_samples: Annotated[int, Field(ge=1)] | Literal["all"] = 4

    @model_validator(mode="after")
    def _nonnegative(self):
        if self.beta != "auto" and self.beta < 0:
            raise ValueError(f"beta must be >= 0 or 'auto', got {self.beta}")
        return self


class OwlAllocation(Config):
    kind: Literal["owl"] = "owl"
    M: float = Field(default=5.0, gt=0)  # a score is an outlier above M x the block's mean score
    lam: float = Field(default=0.08, ge=0, lt=1)  # ratios spread over S +/- lam


class AlphaAllocation(Config):
    kind: Literal["alpha"] = "alpha"
    epsilon: float = Field(default=0.3, ge=0, lt=1)  # ratios spread over S +/- epsilon


class ExplicitAllocation(Config):
    kind: Literal["explicit"] = "explicit"
    ratios: list[Annotated[float, Field(ge=0, le=MAX_RATIO)]]


Allocation = Annotated[
    Union[UniformAllocation, AtpAllocation, OwlAllocation, AlphaAllocation, ExplicitAllocation],
    Field(discriminator="kind"),
]

# The allocators that apply to any per-block ratio (rank removed, heads/channels removed): OWL's
# outlier shares and AlphaPruning's spectra are measured for unstructured sparsity.
RatioAllocation = Annotated[Union[UniformAllocation, AtpAllocation, ExplicitAllocation], Field(discriminator="kind")]


def check_fixed(alloc, L: int, target: float, where: str) -> torch.Tensor | None:
    """What a recipe's allocation can be checked for before any data: explicit ratios against the
    block count, a numeric ATP beta against its legal range. Returns those ratios (None for the
    allocators that need the model: uniform aside, owl, alpha, or beta auto). where: the recipe key
    path of the allocation."""
    if isinstance(alloc, ExplicitAllocation):
        if len(alloc.ratios) != L:
            raise CompressError(f"{where}.ratios: {len(alloc.ratios)} entries, the model has {L} blocks")
        return torch.tensor(alloc.ratios, dtype=torch.float32)
    if isinstance(alloc, AtpAllocation) and alloc.beta != "auto":
        try:
            return atp(L, target, alloc.beta)
        except CompressError as err:
            raise CompressError(f"{where}.beta: {err}") from None
    if isinstance(alloc, UniformAllocation):
        return uniform(L, target)
    return None


# ---------------------------------------------------------------- shared arithmetic


def weighted_mean(ratios: torch.Tensor, sizes: torch.Tensor) -> float:
    return float((ratios * sizes).sum() / sizes.sum())


def fit_mean(ratios: torch.Tensor, sizes: torch.Tensor, target: float, lo: float = 0.0, hi: float = MAX_RATIO) -> torch.Tensor:
    """Clip to [lo, hi], then shift the unclipped ratios equally until the size-weighted mean is target."""
    if not lo <= target <= hi:
        raise CompressError(f"target ratio {target} outside [{lo}, {hi}]")
    r = ratios.double().clamp(lo, hi)
    w = sizes.double()
    for _ in range(100):
        gap = target - float((r * w).sum() / w.sum())
        if abs(gap) < 1e-12:
            break
        free = (r < hi) if gap > 0 else (r > lo)  # entries that can still move that way
        r[free] += gap * w.sum() / w[free].sum()
        r = r.clamp(lo, hi)
    return r.float()


def as_sizes(sizes, L: int) -> torch.Tensor:
    return torch.ones(L) if sizes is None else torch.as_tensor(sizes, dtype=torch.float64)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; constant input maps to 0.5 (no information: everyone gets the target)."""
    span = x.max() - x.min()
    return torch.full_like(x, 0.5) if span == 0 else (x - x.min()) / span


# ---------------------------------------------------------------- allocators


def uniform(L: int, target: float) -> torch.Tensor:
    return torch.full((L,), float(target))


def atp_beta_max(L: int, target: float, hi: float = MAX_RATIO) -> float:
    """Largest beta keeping every s_i in [0, hi]: beta <= 2 min(S, hi - S) / (L - 1)."""
    return 0.0 if L < 2 else 2 * min(target, hi - target) / (L - 1)


def atp(L: int, target: float, beta: float) -> torch.Tensor:
    """s_i = S - beta (L-1)/2 + i beta, i = 0..L-1: mean exactly S, rising with depth."""
    ratios = target - beta * (L - 1) / 2 + beta * torch.arange(L, dtype=torch.float64)
    if beta < 0 or ratios.min() < -1e-12 or ratios.max() >= 1:
        legal = 2 * min(target, 1 - target) / max(L - 1, 1)
        raise CompressError(
            f"atp: beta={beta} gives block ratios from {ratios.min():.4f} to {ratios.max():.4f}; "
            f"with L={L} blocks and sparsity {target} beta must be in [0, {legal:.6g}) so that 0 <= s_i < 1"
        )
    return ratios.clamp(min=0).float()


def owl(outlier_shares, target: float, lam: float, sizes=None) -> torch.Tensor:
    """OWL: blocks with a larger share of outlier scores keep more weights.

    outlier_shares (L,): per block, the share of Wanda scores above M x their mean.
    """
    D = torch.as_tensor(outlier_shares, dtype=torch.float64)
    ratios = target + lam - 2 * lam * minmax(D)  # most outliers -> S - lam, fewest -> S + lam
    return fit_mean(ratios, as_sizes(sizes, len(D)), target)


def alpha(block_alphas, target: float, epsilon: float, sizes=None) -> torch.Tensor:
    """AlphaPruning: higher heavy-tail exponent (less trained structure) -> more pruning.

    Mapped linearly onto [S - eps, S + eps], then scaled so the size-weighted mean is S (as the
    paper does), then clipped with the mean kept.
    """
    a = torch.as_tensor(block_alphas, dtype=torch.float64)
    w = as_sizes(sizes, len(a))
    ratios = target - epsilon + 2 * epsilon * minmax(a)
    if (ratios * w).sum() > 0:
        ratios = ratios * (target * w.sum() / (ratios * w).sum())
    return fit_mean(ratios, w, target)


def explicit(ratios, L: int) -> torch.Tensor:
    if len(ratios) != L:
        raise CompressError(f"allocation.ratios has {len(ratios)} entries; the model has {L} blocks")
    return torch.tensor(ratios, dtype=torch.float32)


# ---------------------------------------------------------------- measurements allocators use


def hill_alpha(W: torch.Tensor) -> float:
    """Heavy-tail exponent of the eigenvalue spectrum of W^T W (Hill estimator, xmin at the median),
    as AlphaPruning computes it."""
    eigs = torch.linalg.svdvals(W.float()).double() ** 2
    eigs = torch.sort(eigs[eigs > 1e-5]).values
    if len(eigs) < 4:
        return float("nan")
    i = len(eigs) // 2  # xmin in the middle of the spectrum
    tail = torch.log(eigs[i:])
    n = len(tail)
    return float(1 + n / (tail.sum() - n * tail[0]))


def outlier_share(scores: list[torch.Tensor], M: float) -> float:
    """Share of a block's scores above M x their mean (OWL's layerwise outlier distribution)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > M * flat.mean()).float().mean())


# ---------------------------------------------------------------- N:M per block


def quantize_ratios(ratios: torch.Tensor, m: int) -> list[int]:
    """Zeros per group of m for each block (so block i gets pattern (m - z_i):m).

    Ratios are rounded to multiples of 1/m by largest remainder, so the total number of zeros is
    the closest possible to the target's (blocks of one model have equal sizes); at least one
    weight per group stays.
    """
    exact = [float(r) * m for r in ratios]
    zeros = [int(e) for e in exact]  # floor, ratios are >= 0
    missing = round(sum(exact)) - sum(zeros)
    by_remainder = sorted(range(len(exact)), key=lambda i: zeros[i] - exact[i])  # largest remainder first
    for i in by_remainder[:missing]:
        zeros[i] += 1
    return [min(z, m - 1) for z in zeros]


# ---------------------------------------------------------------- bit-widths per block

BIT_WIDTHS = (2, 3, 4, 8)


def atp_bits_beta_max(L: int, mean_bits: float, lo: int = BIT_WIDTHS[0], hi: int = BIT_WIDTHS[-1]) -> float:
    """Largest beta keeping every b_i in [lo, hi]."""
    return 0.0 if L < 2 else 2 * min(mean_bits - lo, hi - mean_bits) / (L - 1)


def atp_bits(L: int, mean_bits: float, beta: float, sizes=None) -> list[int]:
    """ATP for bit-widths: b_i = B + beta (L-1)/2 - i beta (more bits early, where errors are
    amplified by every later block), rounded to widths in BIT_WIDTHS with size-weighted mean B."""
    legal = atp_bits_beta_max(L, mean_bits)
    if beta < 0 or beta > legal + 1e-12:
        raise CompressError(
            f"atp: beta={beta} gives bit-widths outside [{BIT_WIDTHS[0]}, {BIT_WIDTHS[-1]}]; "
            f"with L={L} blocks and mean {mean_bits} bits beta must be in [0, {legal:.6g}]"
        )
    values = mean_bits + beta * (L - 1) / 2 - beta * torch.arange(L, dtype=torch.float64)
    return round_to_widths(values.clamp(BIT_WIDTHS[0], BIT_WIDTHS[-1]), as_sizes(sizes, L), mean_bits)


def round_to_widths(values: torch.Tensor, sizes: torch.Tensor, target: float, widths=BIT_WIDTHS, at_most: bool = False) -> list[int]:
    """Each value to the width below or above it, so that the size-weighted mean is as close to
    target as the widths allow (see round_to_rungs); at_most: never above target (a file size budget)."""
    w = [float(s) for s in as_sizes(sizes, len(values))]
    return round_to_rungs(values, widths, lambda i, rung: rung * w[i], target * sum(w), at_most)


def round_to_rungs(values: torch.Tensor, rungs, cost, budget: float, at_most: bool = False) -> list:
    """Each value to the rung below or above it, the total cost as close to budget as the rungs
    allow: all start below, then blocks move up in order of largest remainder while that brings
    the total closer (as N:M rounding does, for uneven steps). cost(i, rung) is what block i
    takes on that rung (its weights times the bits it really stores there). at_most: never above
    budget; where even the rungs below cost more (a format that falls back to a wider one), blocks
    step further down, the deepest first (so the bits still fall with depth), until the total
    fits or all are at the bottom."""
    rungs = sorted(rungs)
    vals = values.tolist()
    below = [max(r for r in rungs if r <= v + 1e-9) for v in vals]
    above = [min(r for r in rungs if r >= v - 1e-9) for v in vals]
    chosen = list(below)
    missing = budget - sum(cost(i, r) for i, r in enumerate(chosen))  # budget still to spend
    remainder = [(v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(vals, below, above)]
    stepped = False
    if at_most:
        for i in reversed(range(len(vals))):
            while missing < -1e-9 and chosen[i] > rungs[0]:
                lower = rungs[rungs.index(chosen[i]) - 1]
                missing += cost(i, chosen[i]) - cost(i, lower)
                chosen[i], stepped = lower, True
    for i in sorted(range(len(vals)), key=lambda i: -remainder[i]):
        if chosen[i] != below[i] or (stepped and i > 0 and above[i] > chosen[i - 1]):
            continue  # stepped down to fit: stays there, and no deeper block climbs above it
        extra = cost(i, above[i]) - cost(i, below[i])
        if extra > 0 and abs(missing - extra) < abs(missing) and (not at_most or extra <= missing + 1e-9):
            chosen[i] = above[i]
            missing -= extra
    return chosen


def atp_ladder_beta_max(L: int, mean: float, ladder: tuple[float, ...]) -> float:
    """Largest beta keeping every block's value within the ladder's range."""
    return atp_bits_beta_max(L, mean, ladder[0], ladder[-1])


def atp_ladder(L: int, mean: float, beta: float, ladder: tuple[float, ...], sizes=None, cost=None) -> list[float]:
    """ATP for a ladder of storage costs (bits per weight of llama.cpp's block formats): b_i = B +
    beta (L-1)/2 - i beta, each rounded to a rung below or above, the stored total at most B per
    weight. cost(i, rung): block i's stored bits on that rung (default rung x its weights; a
    caller passes the real ones where rows fall back to another format)."""
    legal = atp_ladder_beta_max(L, mean, ladder)
    if beta < 0 or beta > legal + 1e-12:
        raise CompressError(f"atp: beta={beta} gives bits per weight outside [{ladder[0]:g}, {ladder[-1]:g}]; "
                            f"with L={L} blocks and mean {mean:g} beta must be in [0, {legal:.6g}]")
    values = mean + beta * (L - 1) / 2 - beta * torch.arange(L, dtype=torch.float64)
    w = [float(s) for s in as_sizes(sizes, L)]
    cost = cost or (lambda i, rung: rung * w[i])
    return round_to_rungs(values.clamp(ladder[0], ladder[-1]), ladder, cost, mean * sum(w), at_most=True)


def weighted_bits(bits: list[int], sizes) -> float:
    w = as_sizes(sizes, len(bits)).double()
    return float((torch.tensor(bits, dtype=torch.float64) * w).sum() / w.sum())
