"""The structured stage: whole attention heads and MLP channels removed, so the model gets
physically smaller and faster; the share removed per block comes from the allocator.

Units (a block's q/k/v/o and gate/up/down projections move together):
    KV group     one key/value head with the query heads that read it: head_dim rows of k and v,
                 n_rep * head_dim rows of q and columns of o. Whole groups keep grouped-query
                 attention's head ratio, so the attention code runs unchanged with fewer heads.
    MLP channel  one row of gate and up, one column of down.
Scores (FLAP, An et al. 2024; Wanda-sp): from the calibration inputs of o_proj and down_proj,
    fluctuation  Var(x_j) * ||W[:, j]||^2   (FLAP's weighted input feature variance)
    wanda        ||x_j|| * sum_i |W_ij|
summed over a unit's columns. With bias compensation (FLAP), the mean contribution of what was
removed, W[:, removed] @ mean(x[removed]), is added to o_proj's / down_proj's bias.

Units are first zeroed in place (exactly what removal computes: a zeroed column of o or down
contributes nothing), so that beta-search trials can restore the weights like any other stage;
then the projections are sliced to the kept rows and columns: each block once its outputs are
propagated, or, in a beta search over blocks held in memory, after the search
(compress/blocks/store.py: finish). The new shapes
differ per block; compress/model/layout.py saves and reloads them.

Entry point: apply(model, ctx, cfg) -> (model, StructuredRecord).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.algorithms import allocate
from compress.algorithms.allocate import RatioAllocation, UniformAllocation
from compress.blocks.runner import sequential
from compress.config import Config, LayerPatterns
from compress.errors import CompressError
from compress.model.anatomy import select_linears
from compress.stages.allocation import resolve_beta
from compress.stages.context import StageContext
from compress.stages.record import AllocatedRecord

log = logging.getLogger("compress")

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- config


class StructuredConfig(Config):
    kind: Literal["structured"] = "structured"
    ratio: float | None = Field(default=None, gt=0, lt=1)  # mean share of the blocks' projection weights removed
    allocation: RatioAllocation = UniformAllocation()
    metric: Literal["fluctuation", "wanda"] = "fluctuation"
    remove: Literal["both", "heads", "channels"] = "both"
    # proportional: attention and MLP each lose the block's ratio (heads rounded to whole KV groups,
    # channels make up the rest); adaptive: FLAP's standardised scores decide across both
    split: Literal["proportional", "adaptive"] = "proportional"
    bias_compensation: bool = True
    channel_multiple: int = Field(default=32, ge=1)  # kept MLP widths are multiples (GGUF blocks, kernels)
    targets: LayerPatterns = [".*"]  # blocks move as a whole: every projection of a chosen block must be selected
    ignore: LayerPatterns = []

    @model_validator(mode="after")
    def _target(self):
        alloc = self.allocation
        if isinstance(alloc, allocate.ExplicitAllocation):
            mean = sum(alloc.ratios) / len(alloc.ratios)
            if self.ratio is not None and abs(self.ratio - mean) > 1e-3:
                raise ValueError(f"ratio {self.ratio} differs from the mean of allocation.ratios ({mean:.4f}); drop one")
        elif self.ratio is None:
            raise ValueError("ratio is required (the mean share of block weights removed, in (0, 1))")
        return self

    @property
    def target(self) -> float:
        if isinstance(self.allocation, allocate.ExplicitAllocation):
            return sum(self.allocation.ratios) / len(self.allocation.ratios)
        return self.ratio

    def check_layers(self, layers: list[dict[str, nn.Module]], stage_key: str) -> None:
        """Every block has the seven projections, all selected; allocation fits the block count."""
        allocate.check_fixed(self.allocation, len(layers), self.target, f"{stage_key}.allocation")
        for i, block in enumerate(layers):
            if not block:
                continue
            found = {name.rsplit(".", 1)[-1] for name in block}
            missing = [p for p in ATTENTION + MLP if p not in found]
            if missing:
                raise CompressError(
                    f"{stage_key}: structured pruning needs every projection of a block ({', '.join(ATTENTION + MLP)}); "
                    f"block {i} has no selected {', '.join(missing)} (fused or differently named projections are not supported, "
                    "and targets/ignore cannot leave part of a block out: use allocation explicit with ratio 0 to skip a block)"
                )
            channels = _by_suffix(block)["gate_proj"].weight.shape[0]
            if self.channel_multiple > channels:
                raise CompressError(f"{stage_key}.channel_multiple: {self.channel_multiple} is more than the {channels} MLP channels")


# ---------------------------------------------------------------- record


@dataclass(kw_only=True)
class StructuredRecord(AllocatedRecord):
    metric: str
    split: str
    block_ratios: list[float]  # share of each block's projection weights the allocator asked to remove
    block_achieved: list[float]  # removed, measured from the new shapes
    block_heads: list[int]  # query heads kept per block
    block_kv_heads: list[int]
    block_channels: list[int]  # MLP channels kept per block
    heads: int  # per block before the stage
    kv_heads: int
    channels: int
    params_before: int  # projection weights (and biases) of the selected blocks
    params_after: int
    achieved: float  # 1 - after / before
    bias_compensation: bool

    def summary(self) -> str:
        return (f"{self.metric} {self.split}: {self.achieved:.4f} of projection weights removed (target {self.target:.4f}); "
                f"heads {min(self.block_heads)}-{max(self.block_heads)} of {self.heads}, "
                f"channels {min(self.block_channels)}-{max(self.block_channels)} of {self.channels}")


# ---------------------------------------------------------------- one block's structure


def _by_suffix(block: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {name.rsplit(".", 1)[-1]: m for name, m in block.items()}


@dataclass
class Block:
    """Names of one block's projections, looked up in the model each time (slicing replaces them)."""

    names: dict[str, str]  # "q_proj" -> full module name
    head_dim: int

    def get(self, model, part: str) -> nn.Linear:
        return model.get_submodule(self.names[part])

    def put(self, model, part: str, module: nn.Linear) -> None:
        parent, _, child = self.names[part].rpartition(".")
        setattr(model.get_submodule(parent), child, module)

    def modules(self, model) -> dict[str, nn.Linear]:
        return {self.names[p]: self.get(model, p) for p in ATTENTION + MLP}

    def groups(self, model) -> tuple[int, int]:
        """(KV groups, query heads per group)."""
        kv = self.get(model, "k_proj").weight.shape[0] // self.head_dim
        return kv, self.get(model, "q_proj").weight.shape[0] // self.head_dim // kv

    def group_params(self, model) -> int:
        kv, rep = self.groups(model)
        return sum(_params(self.get(model, p)) for p in ATTENTION) // kv

    def channel_params(self, model) -> int:
        return sum(_params(self.get(model, p)) for p in MLP) // self.get(model, "gate_proj").weight.shape[0]

    def params(self, model) -> int:
        return sum(_params(m) for m in self.modules(model).values())


def _params(m: nn.Linear) -> int:
    return m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)


def find_blocks(model, layers: list[dict[str, nn.Module]]) -> list[Block | None]:
    blocks = []
    for block in layers:
        if not block:
            blocks.append(None)
            continue
        names = {name.rsplit(".", 1)[-1]: name for name in block}
        attention = model.get_submodule(names["q_proj"].rpartition(".")[0])
        head_dim = getattr(attention, "head_dim", None)
        if head_dim is None:
            raise CompressError(f"{names['q_proj'].rpartition('.')[0]}: attention module has no head_dim; structured pruning cannot split its heads")
        blocks.append(Block({p: names[p] for p in ATTENTION + MLP}, head_dim))
    return blocks


# ---------------------------------------------------------------- scores


class ChannelStats:
    """Per input column, the sum and sum of squares over tokens: mean, variance and norm."""

    def __init__(self, columns: int):
        self.columns = columns
        self.sum = self.sum_sq = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(self.columns, dtype=torch.float64, device=x.device)
            self.sum_sq = torch.zeros_like(self.sum)
        self.sum += x.sum(dim=0)
        self.sum_sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    def share(self, other: "ChannelStats") -> None:
        self.sum, self.sum_sq, self.tokens = other.sum, other.sum_sq, other.tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        return (self.sum_sq / self.tokens - self.mean**2).clamp(min=0)

    @property
    def norm2(self) -> torch.Tensor:
        return self.sum_sq / self.tokens


def column_scores(W: torch.Tensor, stats: ChannelStats, metric: str) -> torch.Tensor:
    """Importance of each input column of W (out, in)."""
    W = W.double()
    if metric == "fluctuation":
        return stats.variance * (W * W).sum(dim=0)
    return stats.norm2.sqrt() * W.abs().sum(dim=0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / (std if std > 0 else 1.0)


# ---------------------------------------------------------------- choosing what goes


def choose(group_score: torch.Tensor, channel_score: torch.Tensor, costs: tuple[int, int], budget: float,
           cfg: StructuredConfig) -> tuple[list[int], list[int]]:
    """(KV groups, MLP channels) to remove, removing about `budget` weights."""
    groups, channels = len(group_score), len(channel_score)
    group_cost, channel_cost = costs
    max_groups = groups - 1 if cfg.remove != "channels" else 0  # one KV group always stays
    mult = cfg.channel_multiple
    max_channels = ((channels - mult) // mult) * mult if cfg.remove != "heads" else 0
    if cfg.remove == "heads":
        n_groups, n_channels = min(max_groups, round(budget / group_cost)), 0
    elif cfg.remove == "channels":
        n_groups, n_channels = 0, budget / channel_cost
    elif cfg.split == "proportional":
        share = groups * group_cost / (groups * group_cost + channels * channel_cost)  # attention's share of the block
        n_groups = min(max_groups, round(budget * share / group_cost))
        n_channels = max(0.0, budget - n_groups * group_cost) / channel_cost
    else:  # adaptive: FLAP's standardised scores, lowest first, while the unit fits the budget
        units = sorted([(float(z), "g") for z in standardise(group_score)] + [(float(z), "c") for z in standardise(channel_score)])
        n_groups, n_channels, left = 0, 0, budget
        for _, kind in units:
            cost = group_cost if kind == "g" else channel_cost
            if cost > left:
                continue
            if kind == "g" and n_groups < max_groups:
                n_groups, left = n_groups + 1, left - cost
            elif kind == "c":
                n_channels, left = n_channels + 1, left - cost
    n_channels = min(max_channels, int(round(n_channels / mult)) * mult)
    drop_groups = torch.argsort(group_score)[:n_groups].tolist() if n_groups else []
    drop_channels = torch.argsort(channel_score)[:n_channels].tolist() if n_channels else []
    return sorted(drop_groups), sorted(drop_channels)


# ---------------------------------------------------------------- zeroing (trial) and slicing (final)


def zero_block(model, block: Block, stats: dict[str, ChannelStats], ratio: float, cfg: StructuredConfig) -> bool:
    """Zero the lowest-scored units of one block (and move their mean output into the biases)."""
    o, down = block.get(model, "o_proj"), block.get(model, "down_proj")
    kv, rep = block.groups(model)
    hd = block.head_dim
    o_scores = column_scores(o.weight, stats["o_proj"], cfg.metric)  # (heads * head_dim,)
    group_score = o_scores.view(kv, rep * hd).sum(dim=1)  # q heads of group g are g*rep .. g*rep+rep-1
    channel_score = column_scores(down.weight, stats["down_proj"], cfg.metric)
    budget = ratio * block.params(model)
    costs = (block.group_params(model), block.channel_params(model))
    drop_groups, drop_channels = choose(group_score, channel_score, costs, budget, cfg)
    if not drop_groups and not drop_channels:
        return False
    q_cols = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in drop_groups]) if drop_groups else torch.tensor([], dtype=torch.long)
    kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in drop_groups]) if drop_groups else torch.tensor([], dtype=torch.long)
    channels = torch.tensor(drop_channels, dtype=torch.long)
    with torch.no_grad():
        if cfg.bias_compensation:
            for module, cols, st in ((o, q_cols, stats["o_proj"]), (down, channels, stats["down_proj"])):
                if len(cols):
                    module.bias += (module.weight[:, cols].double() @ st.mean[cols].to(module.weight.device)).to(module.bias.dtype)
        _zero(block.get(model, "q_proj"), rows=q_cols)
        _zero(block.get(model, "k_proj"), rows=kv_rows)
        _zero(block.get(model, "v_proj"), rows=kv_rows)
        _zero(o, cols=q_cols)
        _zero(block.get(model, "gate_proj"), rows=channels)
        _zero(block.get(model, "up_proj"), rows=channels)
        _zero(down, cols=channels)
    return True


def _zero(module: nn.Linear, rows=None, cols=None) -> None:
    if rows is not None and len(rows):
        module.weight[rows] = 0
        if module.bias is not None:
            module.bias[rows] = 0
    if cols is not None and len(cols):
        module.weight[:, cols] = 0


def _kept(*parts: torch.Tensor) -> torch.Tensor:
    """Indices of the units with a nonzero weight in any of parts (each (units, weights per unit))."""
    alive = torch.zeros(parts[0].shape[0], dtype=torch.bool, device=parts[0].device)
    for p in parts:
        alive |= (p != 0).any(dim=1)
    return alive.nonzero().flatten()


def slice_block(model, block: Block, bias_slots: set[str]) -> None:
    """Cut the zeroed units out of the projections (the zeros mark them: a kept unit never has all
    its weights exactly zero)."""
    kv, rep = block.groups(model)
    hd = block.head_dim
    q, k, v, o = (block.get(model, p) for p in ATTENTION)
    gate, up, down = (block.get(model, p) for p in MLP)
    groups = _kept(k.weight.view(kv, -1), v.weight.view(kv, -1), o.weight.t().reshape(kv, -1))
    q_rows = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in groups.tolist()])
    kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
    channels = _kept(gate.weight, up.weight, down.weight.t())
    zero_slots = [p for p in ("o_proj", "down_proj") if block.names[p] in bias_slots and block.get(model, p).bias is not None
                  and not block.get(model, p).bias.any()]
    if len(groups) == kv and len(channels) == gate.weight.shape[0] and not zero_slots:
        return  # nothing removed, or finished already (a kept trial finishes every block: compress/blocks/store.py)
    for part, module, rows, cols in (("q_proj", q, q_rows, None), ("k_proj", k, kv_rows, None), ("v_proj", v, kv_rows, None),
                                     ("o_proj", o, None, q_rows), ("gate_proj", gate, channels, None),
                                     ("up_proj", up, channels, None), ("down_proj", down, None, channels)):
        keep_bias = module.bias is not None and not (block.names[part] in bias_slots and not module.bias.any())
        block.put(model, part, _sliced(module, rows, cols, keep_bias))


def _sliced(module: nn.Linear, rows, cols, keep_bias: bool) -> nn.Linear:
    W = module.weight.data
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    new = nn.Linear(W.shape[1], W.shape[0], bias=keep_bias, dtype=W.dtype, device=W.device)
    new.weight.data = W.contiguous()
    if keep_bias:
        b = module.bias.data
        new.bias.data = (b if rows is None else b[rows]).contiguous()
    new.requires_grad_(False)
    return new


def add_bias_slots(model, blocks: list[Block | None]) -> set[str]:
    """o_proj / down_proj get a zero bias to compensate into (adding 0 changes no output); the
    ones still zero at the end are dropped again. Where they have one already, nothing changes (a
    streamed block is given its slots again once read: its file's layout has none)."""
    added = set()
    for block in blocks:
        if block is None:
            continue
        for part in ("o_proj", "down_proj"):
            module = block.get(model, part)
            if module.bias is None:
                new = nn.Linear(module.in_features, module.out_features, bias=True, dtype=module.weight.dtype, device=module.weight.device)
                if module.weight.device.type != "meta":  # a streamed skeleton's module: no values yet
                    new.weight.data = module.weight.data
                    new.bias.data.zero_()
                new.requires_grad_(False)
                block.put(model, part, new)
                added.add(block.names[part])
    return added


# ---------------------------------------------------------------- the model


def zero_model(model, ctx: StageContext, cfg: StructuredConfig, blocks: list[Block | None], ratios: list[float],
               bias_slots: set[str]) -> None:
    """Block by block on the outputs of the blocks already pruned: score, zero, compensate."""
    stats: dict[str, ChannelStats] = {}

    def observe(i, _):
        stats.clear()
        if blocks[i] is None or ratios[i] <= 0:
            return {}
        if cfg.bias_compensation:
            add_bias_slots(model, [blocks[i]])
        o, down = blocks[i].get(model, "o_proj"), blocks[i].get(model, "down_proj")
        stats.update(o_proj=ChannelStats(o.in_features), down_proj=ChannelStats(down.in_features))
        return {o: stats["o_proj"], down: stats["down_proj"]}

    def compress(i, _):
        return bool(stats) and zero_block(model, blocks[i], stats, ratios[i], cfg)

    sequential(model, ctx.block_inputs(model), observe, compress, "structured prune", ctx.calibration_dtype,
               finish=lambda i, _: blocks[i] is not None and slice_block(model, blocks[i], bias_slots))


def allocate_ratios(cfg: StructuredConfig, sizes: torch.Tensor, beta: float | None) -> torch.Tensor:
    alloc, L = cfg.allocation, len(sizes)
    if isinstance(alloc, allocate.AtpAllocation):
        return allocate.atp(L, cfg.target, beta)
    if isinstance(alloc, allocate.ExplicitAllocation):
        return allocate.explicit(alloc.ratios, L)
    return allocate.uniform(L, cfg.target)


# ---------------------------------------------------------------- entry point


def apply(model, ctx: StageContext, cfg: StructuredConfig) -> tuple[nn.Module, StructuredRecord]:
    start = time.perf_counter()
    layers, skipped = select_linears(model, cfg.targets, cfg.ignore, ctx.stage_key)
    cfg.check_layers(layers, ctx.stage_key)
    blocks = find_blocks(model, layers)
    live = [b for b in blocks if b is not None]
    first = live[0]
    heads, kv_heads = first.get(model, "q_proj").out_features // first.head_dim, first.groups(model)[0]
    channels = first.get(model, "gate_proj").out_features
    sizes = torch.tensor([float(b.params(model)) if b else 0.0 for b in blocks])
    bias_slots = add_bias_slots(model, blocks) if cfg.bias_compensation else set()
    L, S = len(blocks), cfg.target
    chosen = resolve_beta(
        model, ctx, cfg.allocation, {name: m for b in live for name, m in b.modules(model).items()}, lambda: allocate.atp_beta_max(L, S),
        plan=lambda b: tuple(round(float(r), 6) for r in allocate.atp(L, S, b)),
        compress=lambda ratios, _, __: zero_model(model, ctx, cfg, blocks, list(ratios), bias_slots), zeros_only=False)
    beta, search, notes = chosen.beta, chosen.search, list(chosen.notes)
    ratios = allocate_ratios(cfg, sizes, beta)
    if chosen.collected is None:
        zero_model(model, ctx, cfg, blocks, ratios.tolist(), bias_slots)
    after = [float(b.params(model)) if b else 0.0 for b in blocks]
    achieved_blocks = [1 - a / s if s else 0.0 for a, s in zip(after, sizes.tolist())]
    if cfg.bias_compensation:
        notes.append("removed units' mean output added to o_proj/down_proj biases (FLAP bias compensation)")
    return model, StructuredRecord(
        kind="structured",
        metric=cfg.metric,
        split=cfg.split,
        allocation=cfg.allocation.model_dump(),
        target=cfg.target,
        block_ratios=[round(float(r), 6) for r in ratios],
        block_achieved=achieved_blocks,
        block_heads=[b.get(model, "q_proj").out_features // b.head_dim if b else heads for b in blocks],
        block_kv_heads=[b.groups(model)[0] if b else kv_heads for b in blocks],
        block_channels=[b.get(model, "gate_proj").out_features if b else channels for b in blocks],
        heads=heads,
        kv_heads=kv_heads,
        channels=channels,
        params_before=int(sizes.sum()),
        params_after=int(sum(after)),
        achieved=1 - sum(after) / float(sizes.sum()),
        bias_compensation=cfg.bias_compensation,
        beta=beta,
        search=search,
        skipped=skipped,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
