"""The quantize stage: weights onto integer grids (GPTQ, round-to-nearest), onto llama.cpp's
block formats (`grid: q4_k`, ...: GPTQ choosing each GGUF block's scales as the format stores them,
compress/algorithms/ggml_formats.py) or bitsandbytes formats (NF4, FP4, INT8); bit-widths (or block formats)
per block from an allocator, zeros of earlier stages kept where the grid holds a zero.

GPTQ runs through the shared block runner, so each block is calibrated on the outputs of the
blocks already compressed. Each quantised Linear keeps its grid in `module.quant_state` (GPTQ /
RTN) or `module.bnb_format` (bitsandbytes): the in-memory model holds the dequantised weights,
exactly what a loader of the saved checkpoint computes with, and exporters pack them.

Entry point: apply(model, ctx, cfg) -> (model, QuantizeRecord).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.algorithms import allocate, ggml_formats, ggml_mixes, ggml_refit
from compress.algorithms.accumulators import Hessian
from compress.algorithms.allocate import AtpAllocation, UniformAllocation
from compress.algorithms.obs import gptq_quantize
from compress.algorithms.quant import BNB_BLOCKSIZE, Grid, GroupSize, output_sqnr, rtn, stored_bits
from compress.blocks import devices
from compress.blocks.runner import sequential
from compress.blocks.store import store_of
from compress.config import Config, LayerPatterns
from compress.errors import CompressError
from compress.model.anatomy import block_weight_counts, get_weight, in_features, model_type, select_linears, set_weight
from compress.stages.allocation import resolve_beta
from compress.stages.context import StageContext
from compress.stages.record import AllocatedRecord

log = logging.getLogger("compress")


# ---------------------------------------------------------------- config


GridName = Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# llama.cpp's named file types whose mix gives matrices different formats (compress/algorithms/ggml_mixes.py);
# q2_k names the mix unless `pure` (llama-quantize --pure)
MixName = Literal["q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m"]


class ExplicitBits(Config):
    kind: Literal["explicit"] = "explicit"
    bits: list[Literal[2, 3, 4, 8]] | None = None  # one width per decoder block
    grids: list[GridName] | None = None  # with `grid`: one llama.cpp block format per decoder block

    @model_validator(mode="after")
    def _one(self):
        if (self.bits is None) == (self.grids is None):
            raise ValueError("give bits (one width per block) or, with grid, grids (one block format per block)")
        return self

    @property
    def per_block(self) -> list:
        return self.bits if self.bits is not None else self.grids


BitsAllocation = Annotated[Union[UniformAllocation, AtpAllocation, ExplicitBits], Field(discriminator="kind")]


class QuantizeConfig(Config):
    kind: Literal["quantize"] = "quantize"
    method: Literal["gptq", "rtn", "bnb"] = "gptq"
    # gptq/rtn onto one of llama.cpp's block formats (bits, group_size and sym follow from it); with
    # atp, each block gets a format of the grid's family (K-quants, or the legacy ones)
    grid: GridName | MixName | None = None
    pure: bool = False  # grid q2_k: every matrix Q2_K (llama-quantize --pure), not llama.cpp's Q2_K mix
    bits_per_weight: float | None = Field(default=None, gt=0)  # grid + atp: the mean as stored, scales included (default: the grid's)
    bits: float | None = None  # gptq/rtn: 2|3|4|8 (default 4); with atp the size-weighted mean, e.g. 3.0
    format: Literal["nf4", "fp4", "int8"] | None = None  # bnb only (default nf4)
    group_size: GroupSize = 128  # input columns per scale; -1: one scale per output row
    sym: bool = True
    # gptq's column order: "group" (default: group-aware reordering, groups stay contiguous, fast
    # kernels), true (desc_act: scattered groups, needs g_idx at inference), false (as stored)
    act_order: bool | Literal["group"] | None = None
    dampening: float = Field(default=0.01, gt=0)  # gptq: fraction of mean diag(H) added to H
    blocksize: int = Field(default=128, gt=0)  # gptq: columns per lazy update
    keep_sparsity: bool = True  # zeros from earlier stages stay exactly zero
    # gptq + grid: once GPTQ has fixed the codes, refit the scales (and mins) to the layer's output
    # error under H, codes unchanged (compress/algorithms/ggml_refit.py). Off by default: measured no
    # better on held-out text (SmolLM2 KLD to F16: Q4_0 0.1244 with against 0.1224 without; Q4_K_M 0.0249 both)
    scale_refit: bool = False
    # gptq + grid: what weighs each column in a block's scale search: diag(H) (llama-imatrix's
    # statistic), or "obs": 1 / [chol(H^-1)]_jj^2, GPTQ's own weight for a column's rounding error
    scale_weights: Literal["hessian", "obs"] = "hessian"
    allocation: BitsAllocation = UniformAllocation()
    targets: LayerPatterns = [".*"]  # regexes on full module names of Linears inside decoder blocks
    ignore: LayerPatterns = []

    @model_validator(mode="after")
    def _consistent(self):
        tuned = [key for key in ("scale_refit", "scale_weights") if getattr(self, key) != type(self).model_fields[key].default]
        if tuned and (self.method != "gptq" or self.grid is None):
            raise ValueError(f"{' and '.join(tuned)} tune GPTQ onto llama.cpp's block formats: they need method gptq with a grid")
        if self.method == "bnb":
            if self.grid is not None:
                raise ValueError("grid (llama.cpp block formats) applies to gptq and rtn; bnb takes format")
            if self.bits is not None or not isinstance(self.allocation, UniformAllocation):
                raise ValueError("bnb takes its width from `format` (nf4, fp4, int8): drop bits and use allocation uniform")
            if self.act_order is not None:
                raise ValueError("act_order applies to gptq only")
            return self
        if self.format is not None:
            raise ValueError(f"format applies to method bnb; {self.method} takes bits")
        if self.grid is not None:
            return self._grid_consistent()
        if self.bits_per_weight is not None:
            raise ValueError("bits_per_weight applies with grid (llama.cpp block formats); integer grids take bits")
        if isinstance(self.allocation, ExplicitBits) and self.allocation.bits is None:
            raise ValueError("allocation.grids needs grid (a llama.cpp block format); integer grids take allocation.bits")
        if self.act_order is not None and self.method != "gptq":
            raise ValueError("act_order applies to gptq only")
        alloc = self.allocation
        if isinstance(alloc, ExplicitBits):
            mean = sum(alloc.bits) / len(alloc.bits)
            if self.bits is not None and abs(self.bits - mean) > 1e-3:
                raise ValueError(f"bits {self.bits} differs from the mean of allocation.bits ({mean:.4f}); drop one")
        elif isinstance(alloc, AtpAllocation):
            if not allocate.BIT_WIDTHS[0] <= self.target_bits <= allocate.BIT_WIDTHS[-1]:
                raise ValueError(f"bits (the mean over blocks) must be within [2, 8], got {self.target_bits}")
        elif self.target_bits not in allocate.BIT_WIDTHS:
            raise ValueError(f"bits must be one of 2, 3, 4, 8, got {self.bits:g}")
        return self

    def _grid_consistent(self):
        # values other than the defaults: a resolved recipe (metadata.json) writes the defaults out
        given = [key for key in ("bits", "group_size", "sym") if getattr(self, key) != type(self).model_fields[key].default]
        if given:
            raise ValueError(f"{', '.join(given)}: grid {self.grid} fixes bits, block length and scale layout; drop {' and '.join(given)}")
        if self.act_order is True:
            raise ValueError(f"act_order true scatters columns over blocks; {self.grid} blocks are runs of stored columns: use group or false")
        alloc = self.allocation
        if self.pure and self.grid != "q2_k":
            raise ValueError(f"pure applies to grid q2_k (llama.cpp's Q2_K mix, or with pure every matrix Q2_K); {self.grid} is "
                             + ("a mix: name its block format (q4_k ...) for one format everywhere" if self.mix else "one format already"))
        if self.mix and not isinstance(alloc, UniformAllocation):
            raise ValueError(f"grid {self.grid} is llama.cpp's mix, which gives every matrix its format; an allocation by block "
                             f"chooses among block formats: give grid {ggml_mixes.MIXES[self.grid]} (or another format) with it")
        if isinstance(alloc, ExplicitBits) and alloc.grids is None:
            raise ValueError("with grid, allocation explicit takes grids (one block format per block), not bits")
        if self.bits_per_weight is not None and not isinstance(alloc, AtpAllocation):
            raise ValueError("bits_per_weight is the mean an atp allocation keeps to; uniform and explicit take the formats as given")
        if isinstance(alloc, AtpAllocation):
            ladder = self.ladder
            if not ladder[0] <= self.target_bits <= ladder[-1]:
                raise ValueError(f"bits_per_weight must be within [{ladder[0]:g}, {ladder[-1]:g}] ({self.grid}'s family of formats), got {self.target_bits:g}")
        return self

    @property
    def mix(self) -> str | None:
        """The llama.cpp file type whose mix this grid follows, or None (one format)."""
        if self.grid in ggml_mixes.MIXES and not (self.grid == "q2_k" and self.pure):
            return self.grid
        return None

    @property
    def ladder(self) -> tuple[float, ...]:
        """Bits per weight of the formats an allocation chooses among (the grid's family)."""
        return tuple(ggml_formats.FORMATS[name].bits_per_weight for name in ggml_formats.ladder_of(self.grid))

    @property
    def target_bits(self) -> float:
        """The mean bit-width asked for (bnb: its format's; a grid: bits per weight as stored)."""
        if self.grid is not None:
            if isinstance(self.allocation, ExplicitBits):
                return sum(ggml_formats.FORMATS[g].bits_per_weight for g in self.allocation.grids) / len(self.allocation.grids)
            return self.bits_per_weight or ggml_formats.FORMATS[ggml_mixes.MIXES.get(self.grid, self.grid)].bits_per_weight
        if self.method == "bnb":
            return {"nf4": 4, "fp4": 4, "int8": 8}[self.format or "nf4"]
        if isinstance(self.allocation, ExplicitBits):
            return sum(self.allocation.bits) / len(self.allocation.bits)
        return 4.0 if self.bits is None else float(self.bits)

    def writes_block_formats(self) -> bool:
        """Some layer may end on one of llama.cpp's block formats (what a GGUF `grid` file writes):
        a `grid`, or symmetric GPTQ / RTN codes of 4 or 8 bits in groups of 32 in column order
        (Q4_0 / Q8_0 as they stand)."""
        if self.method == "bnb":
            return False
        if self.grid is not None:
            return True
        widths = self.allocation.bits if isinstance(self.allocation, ExplicitBits) else (
            allocate.BIT_WIDTHS if isinstance(self.allocation, AtpAllocation) else [self.target_bits])
        return self.group_size == 32 and self.sym and self.act_order is not True and any(b in (4, 8) for b in widths)

    @property
    def column_order(self) -> bool | str:
        return "group" if self.act_order is None else self.act_order

    @property
    def bnb_format(self) -> str:
        return self.format or "nf4"

    def check_layers(self, layers: list[dict[str, nn.Module]], stage_key: str) -> None:
        """What only the model's shapes can tell (validate runs this on a meta-device skeleton)."""
        alloc, where = self.allocation, f"{stage_key}.allocation"
        if isinstance(alloc, ExplicitBits) and len(alloc.per_block) != len(layers):
            key = "bits" if alloc.bits is not None else "grids"
            raise CompressError(f"{where}.{key}: {len(alloc.per_block)} entries, the model has {len(layers)} blocks")
        if isinstance(alloc, AtpAllocation) and alloc.beta != "auto":
            try:
                if self.grid is not None:
                    allocate.atp_ladder(len(layers), self.target_bits, alloc.beta, self.ladder)
                else:
                    allocate.atp_bits(len(layers), self.target_bits, alloc.beta)
            except CompressError as err:
                raise CompressError(f"{where}.beta: {err}") from None
        if self.method == "bnb" and importlib.util.find_spec("bitsandbytes") is None:
            raise CompressError(f"{stage_key}.method: bnb needs bitsandbytes: pip install 'atp-compress[bnb]'")
        if self.method == "bnb" and self.bnb_format != "int8":
            for block in layers:
                for name, module in block.items():
                    if get_weight(module).numel() % BNB_BLOCKSIZE:
                        raise CompressError(f"{stage_key}: {name} has {get_weight(module).numel()} weights, not a multiple of {BNB_BLOCKSIZE} (bnb 4-bit blocks)")


# ---------------------------------------------------------------- record


@dataclass(kw_only=True)
class QuantizeRecord(AllocatedRecord):
    method: str
    format: str  # "int4 g128 sym", "nf4", ...
    block_bits: list[float]  # bit-width per decoder block (a grid: its format's bits per weight as stored)
    achieved: float  # size-weighted mean bits of the quantised weights (codes only)
    bits_per_weight: float  # including scales, zero points and group indices, as stored
    layer_bits: dict[str, float]
    layer_sqnr_db: dict[str, float]  # gptq: output signal-to-noise estimated with the layer's Hessian
    zeros_before: int  # exact zeros in the quantised layers before the stage (earlier stages' sparsity)
    zeros_kept: int  # of those, still exactly zero after it
    zeros_after: int
    block_grids: list[str] | None = None  # grid: llama.cpp block format per decoder block
    layer_grids: dict[str, str | None] | None = None  # grid: the format each layer got (a fallback where rows are not whole blocks; None: left in float)

    def summary(self) -> str:
        return f"{self.method} {self.format}, {self.achieved:.2f} bits ({self.bits_per_weight:.2f} stored), {self.zeros_kept}/{self.zeros_before} zeros kept"


# ---------------------------------------------------------------- one layer


def grid_of(cfg: QuantizeConfig, bits: int) -> Grid:
    return Grid(bits, cfg.group_size, cfg.sym)


def bnb_roundtrip(W: torch.Tensor, fmt: str) -> torch.Tensor:
    """W through bitsandbytes' own quantiser and back (float32), as a bnb checkpoint holds it."""
    try:
        import bitsandbytes.functional as F
    except ImportError as err:
        raise CompressError("method bnb needs bitsandbytes: pip install 'atp-compress[bnb]'") from err
    if fmt == "int8":  # per-row absmax of the float16 weight, as Linear8bitLt stores it (int8 + SCB)
        CB, SCB, _ = F.int8_vectorwise_quant(W.half().contiguous())
        return CB.float() * SCB.float()[:, None] / 127
    packed, state = F.quantize_4bit(W.float().contiguous(), blocksize=BNB_BLOCKSIZE, quant_type=fmt)
    return F.dequantize_4bit(packed, state).float()


# ---------------------------------------------------------------- the model


def layer_grid(cfg: QuantizeConfig, target, module):
    """What a layer is quantised onto: its integer Grid, or its llama.cpp format (its fallback
    where the rows are not whole blocks; None: left in float, as llama.cpp would)."""
    if cfg.grid is None:
        return grid_of(cfg, target)
    return ggml_formats.fitting(target, in_features(module))


def mix_facts(model, layers) -> ggml_mixes.ModelFacts:
    """What llama.cpp's mix rules read from the model (its text config for multimodal wrappers)."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    n = len(layers)
    return ggml_mixes.ModelFacts(n, heads // kv_heads, model_type(model) in ("llama", "mistral") and n == 80 and kv_heads < heads)


def layer_targets(cfg: QuantizeConfig, layers, plan: list, facts: ggml_mixes.ModelFacts | None) -> dict:
    """Per layer name: its bit-width or block format before any fallback (the block's entry of
    the plan; a mix: the format llama.cpp's mix gives that matrix in that block)."""
    return {name: ggml_mixes.chosen_type(cfg.mix, ggml_mixes.role_of(name), i, facts) if cfg.mix else plan[i]
            for i, block in enumerate(layers) for name in block}


def on_grid(cfg: QuantizeConfig, module, was_zero: torch.Tensor, W_new, state, sqnr=None) -> dict:
    """The layer on its grid (W_new None: it stays as it is, float), and what the record counts of it."""
    if W_new is not None:
        set_weight(module, W_new)
    if isinstance(state, ggml_formats.GgufState) and cfg.mix:
        state.file_type = cfg.mix  # a `grid` GGUF file then takes this mix for its other tensors
    if state is not None:
        module.quant_state = devices.on_cpu(state)
    if cfg.method == "bnb":
        module.bnb_format = cfg.bnb_format
    now_zero = get_weight(module) == 0
    return {"zeros_before": int(was_zero.sum()), "zeros_kept": int((was_zero & now_zero).sum()), "zeros_after": int(now_zero.sum()),
            "stored_bits": float(stored_bits(module)), "sqnr_db": sqnr,
            "grid": state.fmt.name if isinstance(state, ggml_formats.GgufState) else None}


def quantize_layer(cfg: QuantizeConfig, name: str, module, target, results: dict, H=None) -> None:
    """One layer onto its width or format; its counts go into results[name] (a GPTQ dampening
    raised to succeed into results["_notes"])."""
    W = get_weight(module)
    was_zero = W == 0
    frozen = was_zero if cfg.keep_sparsity else None  # zeros of earlier stages, which must stay exactly zero
    grid = layer_grid(cfg, target, module)
    if cfg.method == "bnb":
        results[name] = on_grid(cfg, module, was_zero, bnb_roundtrip(W, cfg.bnb_format), None)
    elif grid is None:  # rows not whole blocks of the format or its fallback: float, as llama.cpp leaves it
        results[name] = on_grid(cfg, module, was_zero, None, None)
    elif cfg.method == "rtn" and cfg.grid is None:  # needs no data; 0 is on every integer grid, so zeros stay zeros
        results[name] = on_grid(cfg, module, was_zero, *rtn(W, grid))
    elif cfg.method == "rtn":
        W_new, state = ggml_formats.rtn(W, grid)
        if grid.holds_zero and cfg.keep_sparsity:
            W_new = W_new.masked_fill(frozen, 0)  # q = 0 decodes to exactly 0
        results[name] = on_grid(cfg, module, was_zero, W_new, state)
    else:
        W_new, damp, state = gptq_quantize(W, H, grid, frozen, cfg.blocksize, cfg.dampening, cfg.column_order, cfg.scale_weights)
        if cfg.scale_refit and isinstance(state, ggml_formats.GgufState):
            codes = state.codes(W_new)
            state = ggml_refit.refit(state, codes, W, H)
            W_new = state.dequantized(codes)
        if damp > cfg.dampening:
            results.setdefault("_notes", []).append(f"{name}: GPTQ needed dampening {damp:g} (asked {cfg.dampening:g})")
        results[name] = on_grid(cfg, module, was_zero, W_new, state, output_sqnr(W.float(), W_new, H))


class GptqPass:
    """GPTQ's callbacks for the block runner: a Hessian per selected layer of the block being
    observed, then every layer quantised with it."""

    def __init__(self, cfg: QuantizeConfig, layers, targets: dict, results: dict):
        self.cfg, self.layers, self.targets, self.results = cfg, layers, targets, results
        self.stats: dict[str, Hessian] = {}

    def observe(self, i, block):
        self.stats = {name: Hessian(in_features(m)) for name, m in self.layers[i].items()}
        return {m: self.stats[name] for name, m in self.layers[i].items()}

    def compress(self, i, block):
        for name, module in self.layers[i].items():
            quantize_layer(self.cfg, name, module, self.targets[name], self.results, self.stats[name].H)
        return bool(self.layers[i])


def quantize_model(model, ctx: StageContext, cfg: QuantizeConfig, layers, targets: dict, results: dict) -> None:
    """Quantise every selected layer of every block to its width (or format: targets), in place,
    each block taken from the model's block store in turn (compress/blocks/store.py: a streamed
    model's are read from disk and written back). results gets, per layer as it is quantised (no
    second pass over the weights; kept with the pass's checkpoints): zeros before / kept / after,
    the bits stored, the llama.cpp format it got (grid) and the output SQNR (gptq); plus "_notes"."""
    if cfg.method != "gptq":
        store = store_of(model)
        for i in range(len(layers)):
            with store.loaded(i) as loaded:
                for name, module in layers[i].items():
                    quantize_layer(cfg, name, module, targets[name], results)
                loaded["changed"] = bool(layers[i])
        return
    gptq = GptqPass(cfg, layers, targets, results)
    label = f"gptq {cfg.grid}" if cfg.grid else f"gptq {cfg.target_bits:g}-bit"
    sequential(model, ctx.block_inputs(model), gptq.observe, gptq.compress, label, ctx.calibration_dtype, collected=results)


# ---------------------------------------------------------------- allocation


def widths(cfg: QuantizeConfig, layers, beta: float | None) -> list:
    """Per block: its bit-width, or (grid) its llama.cpp block format's name."""
    L = len(layers)
    if cfg.method == "bnb":
        return [int(cfg.target_bits)] * L
    alloc = cfg.allocation
    if isinstance(alloc, ExplicitBits):
        return list(alloc.per_block)
    if cfg.grid is not None:
        if not isinstance(alloc, AtpAllocation):
            return [cfg.grid] * L
        return grid_plan(cfg, L, beta, layers)
    if isinstance(alloc, AtpAllocation):
        return allocate.atp_bits(L, cfg.target_bits, beta, block_weight_counts(layers))
    return [int(cfg.target_bits)] * L


def grid_plan(cfg: QuantizeConfig, L: int, beta: float, layers) -> list[str]:
    """ATP over the grid's family of formats: more bits per weight early, the stored mean at most
    the target, counting each layer in the format it really gets (a fallback where its rows are
    not whole blocks: SmolLM2's 576 columns take q5_0 for q4_k, 5.5 bits for 4.5)."""
    names = ggml_formats.ladder_of(cfg.grid)
    by_bits = {ggml_formats.FORMATS[n].bits_per_weight: n for n in names}
    columns = [[get_weight(m).shape for m in block.values()] for block in layers]

    def stored(i: int, rung: float) -> float:
        return sum(rows * cols * ggml_formats.stored_bits_per_weight(by_bits[rung], cols) for rows, cols in columns[i])

    sizes = block_weight_counts(layers)
    return [by_bits[b] for b in allocate.atp_ladder(L, cfg.target_bits, beta, cfg.ladder, sizes, stored)]


def plan_bits(cfg: QuantizeConfig, plan: list) -> list[float]:
    if cfg.mix:  # the mix's main format; measure replaces it by what each block's matrices stored
        return [ggml_formats.FORMATS[ggml_mixes.MIXES[cfg.mix]].bits_per_weight] * len(plan)
    return [ggml_formats.FORMATS[p].bits_per_weight for p in plan] if cfg.grid is not None else list(plan)


# ---------------------------------------------------------------- entry point


def apply(model, ctx: StageContext, cfg: QuantizeConfig) -> tuple[nn.Module, QuantizeRecord]:
    start = time.perf_counter()
    layers, skipped = select_linears(model, cfg.targets, cfg.ignore, ctx.stage_key)
    cfg.check_layers(layers, ctx.stage_key)
    L, B = len(layers), cfg.target_bits
    sizes = block_weight_counts(layers)
    if cfg.grid is not None:
        beta_max, plan = (lambda: allocate.atp_ladder_beta_max(L, B, cfg.ladder)), (lambda b: tuple(grid_plan(cfg, L, b, layers)))
    else:
        beta_max, plan = (lambda: allocate.atp_bits_beta_max(L, B)), (lambda b: tuple(allocate.atp_bits(L, B, b, sizes)))
    facts = mix_facts(model, layers) if cfg.mix else None
    chosen = resolve_beta(model, ctx, cfg.allocation, {name: m for block in layers for name, m in block.items()}, beta_max, plan,
                          compress=lambda bits, _, results: quantize_model(model, ctx, cfg, layers, layer_targets(cfg, layers, list(bits), facts), results),
                          zeros_only=False)
    beta, search, notes, results = chosen.beta, chosen.search, list(chosen.notes), chosen.collected
    block_plan = widths(cfg, layers, beta)
    targets = layer_targets(cfg, layers, block_plan, facts)
    if results is None:
        results = {}
        quantize_model(model, ctx, cfg, layers, targets, results)
    notes += results.pop("_notes", [])
    return model, measure(cfg, layers, block_plan, targets, results, beta, search, skipped, notes, time.perf_counter() - start)


def measure(cfg, layers, plan, targets: dict, results: dict[str, dict], beta, search, skipped, notes, seconds) -> QuantizeRecord:
    layer_bits, layer_grids, fallen, stored, count, block_bits = {}, {}, {}, 0.0, 0, []
    for block, bits in zip(layers, plan_bits(cfg, plan)):
        block_stored = block_count = 0
        for name, module in block.items():
            got = results[name]
            n = get_weight(module).numel()
            if cfg.grid is not None:  # what the layer really got: a fallback, or nothing (float)
                layer_grids[name] = got["grid"]
                if got["grid"] != targets[name]:
                    fallen[name] = got["grid"] or "float"
            layer_bits[name] = got["stored_bits"] / n if cfg.grid is not None else bits
            block_stored, block_count = block_stored + got["stored_bits"], block_count + n
        block_bits.append(block_stored / block_count if cfg.mix and block_count else bits)  # a mix: what the block stores
        stored += block_stored
        count += block_count
    before, kept, after = (sum(r[f] for r in results.values()) for f in ("zeros_before", "zeros_kept", "zeros_after"))
    layer_sqnr = {name: r["sqnr_db"] for name, r in results.items() if r["sqnr_db"] is not None}
    if cfg.method == "bnb":
        fmt = cfg.bnb_format
    else:
        order = {True: " act-order", "group": " group-aware order", False: ""}[cfg.column_order] if cfg.method == "gptq" else ""
        fmt = f"{cfg.mix} mix{order}" if cfg.mix else f"{cfg.grid} blocks{order}" if cfg.grid else f"int{cfg.target_bits:g} g{cfg.group_size} {'sym' if cfg.sym else 'asym'}{order}"
    if fallen:
        notes = notes + [f"{len(fallen)} layers have rows that are not whole blocks of their block's format and took llama.cpp's fallback "
                         f"({', '.join(sorted(set(fallen.values())))}): {', '.join(list(fallen)[:3])}{'...' if len(fallen) > 3 else ''}"]
    if cfg.grid is not None and isinstance(cfg.allocation, AtpAllocation) and stored / count > cfg.target_bits + 1e-6:
        notes = notes + [f"bits_per_weight {cfg.target_bits:g} is below what these layers can store in {cfg.grid}'s family "
                         f"(their rows fall back to wider formats): {stored / count:.3f} stored, every block on the lowest format that fits"]
    return QuantizeRecord(
        kind="quantize",
        method=cfg.method,
        format=fmt,
        allocation=cfg.allocation.model_dump(exclude_none=True),
        target=cfg.target_bits,
        block_bits=block_bits,
        achieved=allocate.weighted_bits(block_bits, block_weight_counts(layers)),
        bits_per_weight=stored / count,
        layer_bits=layer_bits,
        layer_sqnr_db={k: round(v, 3) for k, v in layer_sqnr.items()},
        zeros_before=before,
        zeros_kept=kept,
        zeros_after=after,
        beta=beta,
        search=search,
        skipped=skipped,
        notes=notes,
        seconds=seconds,
        block_grids=list(plan) if cfg.grid is not None else None,
        layer_grids=layer_grids or None,
    )
