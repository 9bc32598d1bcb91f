"""The lowrank stage: each selected Linear becomes two thin ones, W (m out, n in) ~ up @ down of
rank r, with per-block ratios from an allocator, block by block on the outputs of the blocks
already compressed.

    svd   W = U S V^T, keep the r largest singular values: the least weight error ||W - W'||_F
          (Eckart-Young).
    asvd  H = X^T X = C C^T (Cholesky, C lower), W C = U S V^T, W' = U_r S_r V_r^T C^-1: the output
          error ||(W - W') X^T||_F^2 = ||(W - W') C||_F^2 is the sum of W C's discarded squared
          singular values, the least any rank-r matrix reaches (SVD-LLM, Wang et al. 2024, Thm 3.2).

`ratio` is the fraction of a layer's weights removed: it keeps r = floor((1 - ratio) m n / (m + n))
(down to a multiple of rank_multiple), so r (m + n) < m n always saves. residual_sparsity adds a
sparse correction R (sparse + low-rank, as OATS does): W ~ up @ down + R, R keeping the top
(1 - residual_sparsity) of every row of W - up @ down by Wanda's score |R_ij| ||x_j||; its kept
entries count as weights, so the rank shrinks to r = floor(((1 - ratio) m n - kept) / (m + n)).
Their positions are not counted: in memory the residual is a dense Linear with zeros, and the
sparse export (hf format: sparse) stores it as kept values plus a bitmask (1 bit per m n).
Low-rank part and residual are fitted in turn (residual_iterations rounds, each refits the
other's remainder).

During the stage (and every beta-search trial) each Linear holds the dense equivalent in place,
with its factors in `module.low_rank_factors`, so later blocks calibrate on compressed outputs and
the search restores a trial like any other stage's; then each one is replaced by a
compress.model.modules.LowRankLinear, so the returned model is physically smaller: each block once its
outputs are propagated, or, in a beta search over blocks held in memory, after the search
(compress/blocks/store.py: finish). Layers are
looked up by name at each use, since a streamed block's modules are rebuilt to the layout of the
file it is read from.

Entry point: apply(model, ctx, cfg) -> (model, LowRankRecord).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.algorithms import allocate
from compress.algorithms.accumulators import Hessian
from compress.algorithms.allocate import AtpAllocation, ExplicitAllocation, RatioAllocation, UniformAllocation
from compress.algorithms.obs import CHOLESKY_RETRIES
from compress.algorithms.sparsity import row_mask, wanda_score
from compress.blocks import devices
from compress.blocks.runner import sequential
from compress.config import Config, LayerPatterns
from compress.errors import CompressError
from compress.model.anatomy import get_weight, in_features, select_linears, set_weight
from compress.model.modules import LowRankLinear
from compress.stages.allocation import resolve_beta
from compress.stages.context import StageContext
from compress.stages.record import AllocatedRecord

log = logging.getLogger("compress")

FACTORS = "low_rank_factors"  # the module attribute holding a layer's Factors during the stage


# ---------------------------------------------------------------- config


class LowRankConfig(Config):
    kind: Literal["lowrank"] = "lowrank"
    method: Literal["svd", "asvd"] = "asvd"
    ratio: float | None = Field(default=None, gt=0, lt=1)  # mean fraction of the weights removed (size-weighted)
    allocation: RatioAllocation = UniformAllocation()  # uniform, atp or explicit (OWL and alpha measure sparsity)
    targets: LayerPatterns = [".*"]  # regexes on full module names of Linears inside decoder blocks
    ignore: LayerPatterns = []
    dampening: float = Field(default=0.01, gt=0)  # asvd: fraction of mean diag(H) added before the Cholesky
    rank_multiple: int = Field(default=1, ge=1)  # ranks rounded down to a multiple (kernels like 8, 32)
    residual_sparsity: float | None = Field(default=None, ge=0, lt=1)  # zeros in each row of the residual W - up @ down
    # low-rank / residual refits, one SVD each; on SmolLM2 (ratio 0.2, residual 0.9) layer errors fell
    # ~2.2x from 1 to 2 rounds, then ~1.4x, 1.3x, 1.2x, 1.15x per doubling up to 32
    residual_iterations: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _target(self):
        alloc = self.allocation
        if isinstance(alloc, ExplicitAllocation):
            mean = sum(alloc.ratios) / len(alloc.ratios)
            if self.ratio is not None and abs(self.ratio - mean) > 1e-3:
                raise ValueError(f"ratio {self.ratio} differs from the mean of allocation.ratios ({mean:.4f}); drop one")
        elif self.ratio is None:
            raise ValueError("ratio is required (the fraction of the weights removed, in (0, 1))")
        rs = self.residual_sparsity
        if rs is not None and rs <= self.target:
            raise ValueError(f"residual_sparsity {rs} must exceed ratio {self.target:g}: the kept residual alone would fill the layer's budget")
        return self

    @property
    def target(self) -> float:
        if isinstance(self.allocation, ExplicitAllocation):
            return sum(self.allocation.ratios) / len(self.allocation.ratios)
        return self.ratio

    def check_layers(self, layers: list[dict[str, nn.Module]], stage_key: str) -> None:
        """What only the model's shapes can tell (validate runs this on a meta-device skeleton):
        every layer keeps a rank >= rank_multiple at the ratios asked for."""
        alloc, where = self.allocation, f"{stage_key}.allocation"
        ratios = allocate.check_fixed(alloc, len(layers), self.target, where)
        if isinstance(alloc, ExplicitAllocation):
            plan_ranks(layers, alloc.ratios, self, f"{where}.ratios")
        elif isinstance(alloc, AtpAllocation) and alloc.beta != "auto":
            plan_ranks(layers, ratios.tolist(), self, f"{where}.beta")
        else:  # uniform, or the search's first trial (beta = 0)
            plan_ranks(layers, [self.target] * len(layers), self, f"{stage_key}.ratio")


# ---------------------------------------------------------------- record


@dataclass(kw_only=True)
class LowRankRecord(AllocatedRecord):
    method: str
    block_ratios: list[float]  # what the allocator asked per block
    block_achieved: list[float]  # weights removed per block, counted from the modules
    layer_rank: dict[str, int | None]  # None: left dense (block ratio 0)
    layer_params: dict[str, tuple[int, int]]  # weights (biases excluded) before and after
    layer_output_error: dict[str, float]  # tr(E H E^T) / tr(W H W^T) on the calibration inputs
    params_before: int
    params_after: int
    achieved: float  # 1 - params_after / params_before: weighted by size
    residual_sparsity: float | None = None
    rank_multiple: int = 1

    def summary(self) -> str:
        errors = list(self.layer_output_error.values())
        mean = sum(errors) / len(errors) if errors else 0.0
        residual = f" + residual at {self.residual_sparsity:g} sparsity" if self.residual_sparsity is not None else ""
        return f"{self.method}{residual}, weights removed {self.achieved:.4f} (target {self.target:.4f}), mean layer output error {mean:.4f}"


# ---------------------------------------------------------------- ranks


def residual_kept(m: int, n: int, residual_sparsity: float | None) -> int:
    """Residual entries kept by row_mask: n - round(s n) in each of the m rows."""
    return 0 if residual_sparsity is None else m * (n - round(residual_sparsity * n))


def rank_for(m: int, n: int, ratio: float, multiple: int = 1, residual_sparsity: float | None = None) -> int:
    """Largest rank, a multiple of `multiple`, whose factors (and kept residual) fit in (1 - ratio) m n weights."""
    budget = (1 - ratio) * m * n - residual_kept(m, n, residual_sparsity)
    r = math.floor(budget / (m + n) + 1e-9)  # 1e-9: (1 - 0.3) * ... must not land just below an integer
    return max(r, 0) // multiple * multiple


def max_ratio(m: int, n: int, multiple: int = 1, residual_sparsity: float | None = None) -> float:
    """The largest ratio that still leaves a rank of `multiple`."""
    return 1 - (multiple * (m + n) + residual_kept(m, n, residual_sparsity)) / (m * n)


DENSE_BELOW = 1e-9  # a block ratio this small (ATP's first block at the largest beta) leaves the block dense


def plan_ranks(layers, ratios, cfg: LowRankConfig, where: str) -> dict[str, int | None]:
    """{layer name: rank, None where the block's ratio is 0}; an unusable ratio names `where` and the layer."""
    ranks: dict[str, int | None] = {}
    for i, (block, ratio) in enumerate(zip(layers, ratios)):
        for name, module in block.items():
            if ratio < DENSE_BELOW:
                ranks[name] = None
                continue
            m, n = get_weight(module).shape
            r = rank_for(m, n, ratio, cfg.rank_multiple, cfg.residual_sparsity)
            if r < cfg.rank_multiple:
                residual = f" with residual_sparsity {cfg.residual_sparsity:g}" if cfg.residual_sparsity is not None else ""
                raise CompressError(
                    f"{where}: block {i} ratio {ratio:.4f} leaves {name} ({m}x{n}) no rank >= {cfg.rank_multiple}{residual}; "
                    f"this layer allows a ratio of at most {max_ratio(m, n, cfg.rank_multiple, cfg.residual_sparsity):.4f}"
                )
            if r * (m + n) + residual_kept(m, n, cfg.residual_sparsity) >= m * n:
                raise CompressError(f"{where}: rank {r} of {name} ({m}x{n}) saves no weights; raise the ratio")
            ranks[name] = r
    return ranks


# ---------------------------------------------------------------- one layer


class Factors(NamedTuple):
    up: torch.Tensor  # (m, r), in the layer's dtype
    down: torch.Tensor  # (r, n)
    residual: torch.Tensor | None  # (m, n), mostly zeros
    error: float  # relative output error on the calibration inputs
    damping: float | None  # asvd: the dampening that made H positive definite

    def dense(self) -> torch.Tensor:
        W = self.up.float() @ self.down.float()  # (m, n)
        return W if self.residual is None else W + self.residual.float()


def whitening(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor C of H + damp * mean(diag H) * I in float64 (C C^T = H damped), and
    the damping fraction that worked (x10 per failed try, as the OBS solver does)."""
    H = H.double()
    diag_mean = H.diagonal().mean().clamp(min=1e-12)  # a layer that only saw zeros still gets a C
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(CHOLESKY_RETRIES + 1):
        frac = dampening * 10**attempt
        C, info = torch.linalg.cholesky_ex(H + frac * diag_mean * eye)
        if info == 0:
            return C, frac
    raise CompressError(f"asvd: calibration Hessian not positive definite even with dampening {frac}; raise `dampening`")


def truncated_svd(A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up (m, r), down (r, n) with up @ down the best rank-r approximation of A; the singular
    values are split evenly (sqrt on each side) so both factors have similar ranges."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def low_rank(W: torch.Tensor, r: int, C: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of W (float64): plain SVD, or whitened by C (asvd): SVD of W C, then down C^-1."""
    if C is None:
        return truncated_svd(W, r)
    up, down = truncated_svd(W @ C, r)
    return up, torch.linalg.solve_triangular(C, down, upper=False, left=False)  # X C = down, no inverse


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T), E = W - W_hat: the layer's squared output error on its calibration inputs, relative."""
    W, H = W.double(), H.double()
    E = W - W_hat.double()
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum().clamp(min=1e-30))


@contextmanager
def lapack_threads(device: torch.device):
    """One CPU thread for the SVD and Cholesky: on a busy 2-core machine torch's 2-thread LAPACK
    took 5-9 s for a 576x576 SVD that takes 0.08 s on one thread (threads waiting on each other);
    one thread loses little on layers this size. Restored even on error."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def factorize(W: torch.Tensor, H: torch.Tensor, r: int, cfg: LowRankConfig) -> Factors:
    """W (m, n) ~ up @ down [+ residual] at rank r, in W's dtype; H (n, n) the layer's Hessian."""
    with lapack_threads(W.device):
        return _factorize(W, H, r, cfg)


def _factorize(W: torch.Tensor, H: torch.Tensor, r: int, cfg: LowRankConfig) -> Factors:
    W64 = W.double()
    C, damp = whitening(H, cfg.dampening) if cfg.method == "asvd" else (None, None)
    R = torch.zeros_like(W64)
    for _ in range(cfg.residual_iterations if cfg.residual_sparsity is not None else 1):
        up, down = low_rank(W64 - R, r, C)
        if cfg.residual_sparsity is not None:  # keep the residual's entries with the largest |R_ij| ||x_j||
            R = W64 - up @ down
            R[row_mask(wanda_score(R, H.double().diagonal()), cfg.residual_sparsity)] = 0
    residual = R.to(W.dtype) if cfg.residual_sparsity is not None else None
    factors = Factors(up.to(W.dtype), down.to(W.dtype), residual, 0.0, damp)
    return factors._replace(error=relative_output_error(W, factors.dense(), H))


# ---------------------------------------------------------------- the model


def lowrank_model(model, ctx: StageContext, cfg: LowRankConfig, names: list[list[str]], ranks: dict[str, int | None],
                  collected: dict) -> dict:
    """Factorise every selected layer with a rank, block by block on compressed outputs; each
    holds its dense equivalent and its Factors until its block is finished (see the module
    docstring). collected gets what the pass collected: each layer's output error, its weights
    as stored once finished ("params"), and notes."""
    stats: dict[str, Hessian] = {}
    collected.update({"errors": {}, "params": {}, "notes": []})

    def observe(i, block):
        stats.clear()  # plain svd needs H too: for the recorded output error and residual scores
        stats.update({name: Hessian(in_features(model.get_submodule(name))) for name in names[i] if ranks[name] is not None})
        return {model.get_submodule(name): stats[name] for name in stats}

    def compress(i, block):
        for name in names[i]:
            module = model.get_submodule(name)
            refuse_quantised(module, name, ctx.stage_key)  # a streamed block's states are known once it is read
            setattr(module, FACTORS, None)  # a search trial starts from restored dense weights
            if ranks[name] is None:
                continue
            factors = factorize(get_weight(module), stats[name].H, ranks[name], cfg)
            if factors.damping is not None and factors.damping > cfg.dampening:
                collected["notes"].append(f"{name}: asvd needed dampening {factors.damping:g} (asked {cfg.dampening:g})")
            set_weight(module, factors.dense())
            setattr(module, FACTORS, devices.on_cpu(factors))
            collected["errors"][name] = factors.error
        return bool(stats)

    sequential(model, ctx.block_inputs(model), observe, compress, f"{cfg.method} low-rank", ctx.calibration_dtype,
               collected=collected, finish=lambda i, block: to_low_rank_modules(model, names[i], collected["params"]))
    return collected


def refuse_quantised(module: nn.Module, name: str, stage_key: str) -> None:
    if getattr(module, "quant_state", None) is not None or getattr(module, "bnb_format", None) is not None:
        raise CompressError(f"{stage_key}: {name} is quantised already; factors would leave its grid: put lowrank before quantize")


def to_low_rank_modules(model: nn.Module, names: list[str], params: dict[str, int]) -> None:
    """Replace every named Linear holding Factors by a LowRankLinear with them (bias kept, on
    `up`); params[name] gets the weights it stores."""
    for name in names:
        module = model.get_submodule(name)
        factors = getattr(module, FACTORS, None)
        if hasattr(module, FACTORS):
            delattr(module, FACTORS)
        if factors is None:
            continue
        W = get_weight(module)
        (r, n), m = factors.down.shape, factors.up.shape[0]
        new = LowRankLinear(n, m, r, bias=module.bias is not None, residual=factors.residual is not None,
                            dtype=W.dtype, device=W.device)
        with torch.no_grad():
            new.down.weight.copy_(factors.down)
            new.up.weight.copy_(factors.up)
            if module.bias is not None:
                new.up.bias.copy_(module.bias)
            if factors.residual is not None:
                new.residual.weight.copy_(factors.residual)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        params[name] = weight_count(new)


def weight_count(module: nn.Module) -> int:
    """Weights of a selected layer as stored: a residual counts its nonzeros only."""
    if isinstance(module, LowRankLinear):
        kept = 0 if module.residual is None else int(torch.count_nonzero(module.residual.weight))
        return module.down.weight.numel() + module.up.weight.numel() + kept
    return get_weight(module).numel()


# ---------------------------------------------------------------- allocation and search


def allocate_ratios(cfg: LowRankConfig, L: int, beta: float | None) -> list[float]:
    alloc = cfg.allocation
    if isinstance(alloc, AtpAllocation):
        return allocate.atp(L, cfg.target, beta).tolist()
    if isinstance(alloc, ExplicitAllocation):
        return allocate.explicit(alloc.ratios, L).tolist()
    return allocate.uniform(L, cfg.target).tolist()


def search_ceiling(modules: dict[str, nn.Module], cfg: LowRankConfig) -> float:
    """The search range stops where the last block's thinnest layer would lose its last rank."""
    return min([allocate.MAX_RATIO] + [max_ratio(*get_weight(m).shape, cfg.rank_multiple, cfg.residual_sparsity) - 1e-6
                                       for m in modules.values()])


# ---------------------------------------------------------------- entry point


def apply(model, ctx: StageContext, cfg: LowRankConfig) -> tuple[nn.Module, LowRankRecord]:
    start = time.perf_counter()
    layers, skipped = select_linears(model, cfg.targets, cfg.ignore, ctx.stage_key)
    cfg.check_layers(layers, ctx.stage_key)
    for block in layers:
        for name, module in block.items():
            refuse_quantised(module, name, ctx.stage_key)
    names = [list(block) for block in layers]
    before = {name: get_weight(m).numel() for block in layers for name, m in block.items()}
    L, S = len(layers), cfg.target
    modules = {name: m for block in layers for name, m in block.items()}
    where = f"{ctx.stage_key}.allocation.beta"
    chosen = resolve_beta(
        model, ctx, cfg.allocation, modules, lambda: allocate.atp_beta_max(L, S, search_ceiling(modules, cfg)),
        plan=lambda beta: tuple(plan_ranks(layers, allocate.atp(L, S, beta).tolist(), cfg, where).items()),
        compress=lambda ranks, _, collected: lowrank_model(model, ctx, cfg, names, dict(ranks), collected),
        zeros_only=False, states=(FACTORS,))  # beta auto: leaves the model factorised
    beta, search, collected = chosen.beta, chosen.search, chosen.collected
    ratios = allocate_ratios(cfg, len(layers), beta)
    ranks = plan_ranks(layers, ratios, cfg, f"{ctx.stage_key}.ratio")
    if collected is None:
        collected = lowrank_model(model, ctx, cfg, names, ranks, {})
    notes = list(collected["notes"])
    dense = [name for name, r in ranks.items() if r is None]
    if dense:
        notes.append(f"{len(dense)} layers left dense (block ratio 0): {', '.join(dense[:4])}{' ...' if len(dense) > 4 else ''}")
    after = {name: collected["params"].get(name, before[name]) for name in before}
    return model, measure(cfg, names, ratios, ranks, before, after, collected["errors"], beta, search, skipped, notes,
                          time.perf_counter() - start)


def measure(cfg, names, ratios, ranks, before, after, errors, beta, search, skipped, notes, seconds) -> LowRankRecord:
    """What was achieved, counted from the modules each block was finished with."""
    layer_params = {name: (before[name], after[name]) for block in names for name in block}
    block_achieved = []
    for block in names:
        b, a = sum(layer_params[n][0] for n in block), sum(layer_params[n][1] for n in block)
        block_achieved.append(1 - a / b if b else 0.0)
    total_before = sum(b for b, _ in layer_params.values())
    total_after = sum(a for _, a in layer_params.values())
    return LowRankRecord(
        kind="lowrank",
        method=cfg.method,
        allocation=cfg.allocation.model_dump(),
        target=cfg.target,
        block_ratios=[round(float(r), 6) for r in ratios],
        block_achieved=block_achieved,
        layer_rank=ranks,
        layer_params=layer_params,
        layer_output_error={k: round(v, 6) for k, v in errors.items()},
        params_before=total_before,
        params_after=total_after,
        achieved=1 - total_after / total_before,
        residual_sparsity=cfg.residual_sparsity,
        rank_multiple=cfg.rank_multiple,
        beta=beta,
        search=search,
        skipped=skipped,
        notes=notes,
        seconds=seconds,
    )
