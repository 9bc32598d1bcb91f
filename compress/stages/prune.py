"""The prune stage: per-block sparsity from an allocator, then magnitude, Wanda or SparseGPT
pruning, unstructured or N:M, block by block on the outputs of the blocks already pruned.

Entry point: apply(model, ctx, cfg) -> (model, PruneRecord).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import BeforeValidator, Field, PlainSerializer, model_validator
from torch import nn

from compress.algorithms import allocate
from compress.algorithms.accumulators import Hessian, InputNorms
from compress.algorithms.allocate import Allocation, UniformAllocation
from compress.algorithms.obs import sparsegpt_prune
from compress.algorithms.quant import Grid, GroupSize
from compress.algorithms.sparsity import fraction_zero, magnitude_score, matrix_mask, nm_mask, row_mask, wanda_score
from compress.blocks import devices
from compress.blocks.runner import sequential
from compress.blocks.store import store_of
from compress.config import Config, LayerPatterns
from compress.errors import CompressError
from compress.model.anatomy import block_weight_counts, get_weight, in_features, select_linears, set_weight, weight_count
from compress.stages.allocation import resolve_beta
from compress.stages.context import StageContext
from compress.stages.record import AllocatedRecord

log = logging.getLogger("compress")


# ---------------------------------------------------------------- config


class NM(NamedTuple):
    n: int  # weights kept in every group
    m: int  # group size

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(value):
    """'unstructured' -> None; 'n:m' -> NM(n, m) with 0 < n < m."""
    if value is None or isinstance(value, NM):
        return value
    text = str(value).strip()
    if text == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {value!r}")
    return NM(int(match[1]), int(match[2]))


Pattern = Annotated[
    NM | None,
    BeforeValidator(parse_pattern),
    PlainSerializer(lambda p: "unstructured" if p is None else str(p), return_type=str),
]


class JointQuant(Config):
    """SparseGPT's joint mode: the kept weights go onto this grid in the same OBS pass."""

    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 128  # -1: one scale per output row
    sym: bool = True

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.sym)

    def writes_block_formats(self) -> bool:
        """Q4_0 / Q8_0 as they stand (see QuantizeConfig.writes_block_formats)."""
        return self.bits in (4, 8) and self.group_size == 32 and self.sym


class PruneConfig(Config):
    kind: Literal["prune"] = "prune"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float | None = Field(default=None, gt=0, lt=1)  # target mean over the pruned weights
    pattern: Pattern = None  # 'unstructured' or 'N:M' (N kept of every M)
    allocation: Allocation = UniformAllocation()
    scope: Literal["row", "matrix"] = "row"  # magnitude/wanda: compare scores per output row or per matrix
    targets: LayerPatterns = [".*"]  # regexes on full module names of Linears inside decoder blocks
    ignore: LayerPatterns = []
    blocksize: int = Field(default=128, gt=0)  # sparsegpt: columns per lazy update
    dampening: float = Field(default=0.01, gt=0)  # sparsegpt: fraction of mean diag(H) added to H
    quantize: JointQuant | None = None  # sparsegpt: quantise the kept weights in the same pass

    @model_validator(mode="after")
    def _target_sparsity(self):
        alloc = self.allocation
        if isinstance(alloc, allocate.ExplicitAllocation):
            mean = sum(alloc.ratios) / len(alloc.ratios)
            if self.sparsity is not None and abs(self.sparsity - mean) > 1e-3:
                raise ValueError(f"sparsity {self.sparsity} differs from the mean of allocation.ratios ({mean:.4f}); drop one")
        elif self.pattern is not None:
            implied = 1 - self.pattern.n / self.pattern.m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} (sparsity {implied}); drop sparsity")
        elif self.sparsity is None:
            raise ValueError("sparsity is required (a number in (0, 1))")
        if self.quantize is not None and self.method != "sparsegpt":
            raise ValueError("quantize (joint pruning and quantisation) needs method sparsegpt")
        if self.pattern is not None and self.method == "sparsegpt" and self.blocksize % self.pattern.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of the pattern's M ({self.pattern.m})")
        return self

    def check_layers(self, layers: list[dict[str, nn.Module]], stage_key: str) -> None:
        """What only the model's shapes can tell (validate runs this on a meta-device skeleton)."""
        allocate.check_fixed(self.allocation, len(layers), self.target, f"{stage_key}.allocation")
        if self.pattern is None:
            return
        for block in layers:
            for name, module in block.items():
                if in_features(module) % self.pattern.m:
                    raise CompressError(
                        f"{stage_key}.pattern: {self.pattern} needs in_features divisible by {self.pattern.m}; "
                        f"{name} has {in_features(module)}"
                    )

    @property
    def target(self) -> float:
        """The mean sparsity asked for, from sparsity, the N:M pattern, or the explicit ratios."""
        if isinstance(self.allocation, allocate.ExplicitAllocation):
            return sum(self.allocation.ratios) / len(self.allocation.ratios)
        if self.sparsity is not None:
            return self.sparsity
        return 1 - self.pattern.n / self.pattern.m


# ---------------------------------------------------------------- record


@dataclass(kw_only=True)
class PruneRecord(AllocatedRecord):
    method: str
    pattern: str
    block_ratios: list[float]  # what the allocator asked per block
    block_patterns: list[str] | None  # N:M per block, when a pattern is used
    block_achieved: list[float]  # measured zeros per block (selected layers)
    layer_achieved: dict[str, float]
    achieved: float  # measured, weighted by size
    quantize: dict | None = None  # joint mode: the grid of the kept weights

    def summary(self) -> str:
        grid = f", kept weights on int{self.quantize['bits']} g{self.quantize['group_size']}" if self.quantize else ""
        return f"{self.method} {self.pattern}, sparsity {self.achieved:.4f} (target {self.target:.4f}){grid}"


# ---------------------------------------------------------------- layer selection


def select_layers(model: nn.Module, cfg: PruneConfig, stage_key: str) -> tuple[list[dict[str, nn.Module]], list[str]]:
    """Per block, the Linears to prune by full name; and the names left out."""
    return select_linears(model, cfg.targets, cfg.ignore, stage_key)


# ---------------------------------------------------------------- pruning one layer / the model


@dataclass(frozen=True)
class BlockPlan:
    ratio: float  # unstructured sparsity, or the N:M pattern's
    nm: NM | None


def plan_blocks(ratios: torch.Tensor, pattern: NM | None) -> list[BlockPlan]:
    if pattern is None:
        return [BlockPlan(float(r), None) for r in ratios]
    m = pattern.m
    return [BlockPlan(z / m, NM(m - z, m)) for z in allocate.quantize_ratios(ratios, m)]


def prune_layer(module: nn.Module, plan: BlockPlan, cfg: PruneConfig, stats) -> float | None:
    """Prune one Linear in place; returns the damping SparseGPT needed (None otherwise)."""
    W = get_weight(module)  # (out, in) view: writes land in the module
    if cfg.method == "sparsegpt":
        grid = cfg.quantize.grid if cfg.quantize else None
        W_new, damp, state = sparsegpt_prune(W, stats.H, plan.ratio, plan.nm, cfg.blocksize, cfg.dampening, grid)
        set_weight(module, W_new)
        if state is not None:
            module.quant_state = devices.on_cpu(state)
        return damp
    score = magnitude_score(W) if cfg.method == "magnitude" else wanda_score(W.float(), stats.norm2)
    if plan.nm is not None:
        mask = nm_mask(score, plan.nm.n, plan.nm.m)
    else:
        mask = (row_mask if cfg.scope == "row" else matrix_mask)(score, plan.ratio)
    W[mask] = 0
    return None


STATISTICS = {"wanda": InputNorms, "sparsegpt": Hessian}


def prune_model(model, ctx: StageContext, cfg: PruneConfig, layers, plans: list[BlockPlan], notes: list[str], achieved: dict) -> None:
    """Prune every selected layer; Wanda and SparseGPT calibrate block by block on pruned outputs.
    achieved gets each layer's share of zeros, counted while its block is in memory (the record
    needs no pass of its own over a streamed model's blocks)."""
    if cfg.method == "magnitude":  # needs no data: no forward pass at all
        store = store_of(model)
        for i, (block_layers, plan) in enumerate(zip(layers, plans)):
            with store.loaded(i) as state:
                for name, module in block_layers.items():
                    prune_layer(module, plan, cfg, None)
                    achieved[name] = fraction_zero(get_weight(module))
                state["changed"] = True
        return
    stats: dict[str, object] = {}

    def observe(i, block):
        stats.clear()
        watched = {}
        for name, module in layers[i].items():
            stats[name] = STATISTICS[cfg.method](in_features(module))
            watched[module] = stats[name]
        return watched

    collected = {"notes": [], "achieved": {}}  # kept with the pass's checkpoints

    def compress(i, block):
        for name, module in layers[i].items():
            damp = prune_layer(module, plans[i], cfg, stats[name])
            collected["achieved"][name] = fraction_zero(get_weight(module))
            if damp is not None and damp > cfg.dampening:
                collected["notes"].append(f"{name}: SparseGPT needed dampening {damp:g} (asked {cfg.dampening:g})")
        return bool(layers[i])

    sequential(model, ctx.block_inputs(model), observe, compress, f"{cfg.method} prune", ctx.calibration_dtype, collected=collected)
    notes.extend(collected["notes"])
    achieved.update(collected["achieved"])


# ---------------------------------------------------------------- allocation


def owl_shares(model, ctx: StageContext, layers, M: float) -> list[float]:
    """Per block, the share of Wanda scores above M x mean, on dense activations (as OWL does)."""
    shares: list[float] = []
    stats: dict[str, InputNorms] = {}

    def observe(i, block):
        stats.clear()
        stats.update({name: InputNorms(in_features(m)) for name, m in layers[i].items()})
        return {m: stats[name] for name, m in layers[i].items()}

    def score(i, block):
        scores = [wanda_score(get_weight(m).float(), stats[name].norm2) for name, m in layers[i].items()]
        shares.append(allocate.outlier_share(scores, M) if scores else 0.0)
        return False  # nothing changed: the dense outputs feed the next block

    sequential(model, ctx.block_inputs(model), observe, score, "owl outliers", ctx.calibration_dtype)
    return shares


def block_alphas(model, layers) -> list[float]:
    """Mean heavy-tail exponent of each block's weight matrices (AlphaPruning's layer metric),
    each block taken from the block store in turn as the stage received it (a resumed stage's
    own files for its first blocks are not its input)."""
    alphas = []
    for i, _ in store_of(model).each(final=False):
        values = [allocate.hill_alpha(get_weight(m)) for m in layers[i].values()]
        values = [a for a in values if a == a]  # drop NaN (too few nonzero eigenvalues)
        alphas.append(sum(values) / len(values) if values else 0.0)
    return alphas


def allocate_ratios(model, ctx, cfg: PruneConfig, layers, beta: float | None) -> torch.Tensor:
    alloc, L, S, sizes = cfg.allocation, len(layers), cfg.target, block_weight_counts(layers)
    if isinstance(alloc, allocate.UniformAllocation):
        return allocate.uniform(L, S)
    if isinstance(alloc, allocate.AtpAllocation):
        return allocate.atp(L, S, beta)
    if isinstance(alloc, allocate.OwlAllocation):
        return allocate.owl(owl_shares(model, ctx, layers, alloc.M), S, alloc.lam, sizes)
    if isinstance(alloc, allocate.AlphaAllocation):
        return allocate.alpha(block_alphas(model, layers), S, alloc.epsilon, sizes)
    return allocate.explicit(alloc.ratios, L)


# ---------------------------------------------------------------- entry point


def apply(model, ctx: StageContext, cfg: PruneConfig) -> tuple[nn.Module, PruneRecord]:
    start = time.perf_counter()
    layers, skipped = select_layers(model, cfg, ctx.stage_key)
    cfg.check_layers(layers, ctx.stage_key)
    L, S = len(layers), cfg.target
    chosen = resolve_beta(
        model, ctx, cfg.allocation, {name: m for block in layers for name, m in block.items()}, lambda: allocate.atp_beta_max(L, S),
        plan=lambda beta: tuple(plan_blocks(allocate.atp(L, S, beta), cfg.pattern)),
        compress=lambda plans, notes, counted: prune_model(model, ctx, cfg, layers, list(plans), notes, counted),
        zeros_only=cfg.method != "sparsegpt")  # beta auto: leaves the model pruned
    ratios = allocate_ratios(model, ctx, cfg, layers, chosen.beta)
    plans = plan_blocks(ratios, cfg.pattern)
    notes, layer_achieved = list(chosen.notes), chosen.collected
    if layer_achieved is None:
        layer_achieved = {}
        prune_model(model, ctx, cfg, layers, plans, notes, layer_achieved)
    return model, measure(cfg, layers, ratios, plans, layer_achieved, chosen.beta, chosen.search, skipped, notes, time.perf_counter() - start)


def measure(cfg: PruneConfig, layers, ratios, plans, layer_achieved: dict, beta, search, skipped, notes, seconds) -> PruneRecord:
    """What was actually achieved, from each layer's zeros counted as it was pruned."""
    layer_achieved = {name: layer_achieved[name] for block in layers for name in block}  # in block order
    sizes = block_weight_counts(layers)
    block_achieved = []
    for block in layers:
        zeros = sum(layer_achieved[name] * m.weight.numel() for name, m in block.items())
        total = weight_count(block.values())
        block_achieved.append(zeros / total if total else 0.0)
    achieved = float((torch.tensor(block_achieved) * sizes).sum() / sizes.sum())
    return PruneRecord(
        kind="prune",
        method=cfg.method,
        pattern="unstructured" if cfg.pattern is None else str(cfg.pattern),
        allocation=cfg.allocation.model_dump(),
        target=cfg.target,
        block_ratios=[round(float(r), 6) for r in ratios],
        block_patterns=None if cfg.pattern is None else [str(p.nm) for p in plans],
        block_achieved=block_achieved,
        layer_achieved=layer_achieved,
        achieved=achieved,
        beta=beta,
        search=search,
        skipped=skipped,
        notes=notes,
        seconds=seconds,
        quantize=cfg.quantize.model_dump() if cfg.quantize else None,
    )
