"""The recover stage: LoRA fine-tuning (peft) on the calibration text, then a merge that keeps
every zero of the earlier stages.

The adapters train in float32 with AdamW (linear warmup, cosine decay) on windows of the
calibration segments, in a fixed order. The merge is ours, not peft's: per targeted layer
W += mask * (B @ A) * alpha / r, where mask is where W was nonzero before training, so pruned
weights stay exactly zero; then peft's wrappers are removed without merging and the model is the
plain transformers model again, with its original module names. Any nn.Linear that select_linears
finds is a target, so thin layers of a low-rank stage adapt like any other.

Per-block ranks follow the allocators' shape: uniform, atp (r_i = rank + beta (i - (L-1)/2),
more capacity in the deeper blocks that ATP pruned harder) or an explicit list.

Entry point: apply(model, ctx, cfg) -> (model, RecoverRecord).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from compress.algorithms.allocate import UniformAllocation
from compress.blocks import devices
from compress.blocks.forward import perplexity
from compress.blocks.snapshots import ZeroMask
from compress.config import Config, LayerPatterns
from compress.errors import CompressError
from compress.model.anatomy import get_weight, select_linears
from compress.stages.context import StageContext
from compress.stages.record import StageRecord

log = logging.getLogger("compress")

ADAPTER = "default"  # peft's name for the one adapter we attach
LOSS_WINDOW = 10  # steps averaged for loss_first / loss_last (fewer in short runs)


# ---------------------------------------------------------------- config


class AtpRanks(Config):
    kind: Literal["atp"] = "atp"
    beta: float = Field(ge=0)  # rank step between consecutive blocks

    @field_validator("beta", mode="before")
    @classmethod
    def _no_search(cls, value):
        if value == "auto":
            raise ValueError("auto is not available for recover (each trial of a search would be a full "
                             "training run); give a number, e.g. 1.0")
        return value


class ExplicitRanks(Config):
    kind: Literal["explicit"] = "explicit"
    ranks: list[Annotated[int, Field(ge=1)]]  # one LoRA rank per decoder block


RankAllocation = Annotated[Union[UniformAllocation, AtpRanks, ExplicitRanks], Field(discriminator="kind")]


class RecoverConfig(Config):
    kind: Literal["recover"] = "recover"
    steps: int = Field(default=200, gt=0)  # optimizer steps
    lr: float = Field(default=2e-4, gt=0)  # peak learning rate
    warmup: float = Field(default=0.05, ge=0, lt=1)  # fraction of the steps with a linearly rising lr
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # None: no clipping
    rank: int = Field(default=8, ge=1)  # LoRA rank (the mean, with atp)
    alpha: float = Field(default=16.0, gt=0)  # scaling alpha / rank, the same in every block
    dropout: float = Field(default=0.0, ge=0, lt=1)  # on the adapters' inputs
    seqlen: int = Field(default=128, gt=1)  # calibration segments are cut into windows this long
    batch_size: int = Field(default=4, gt=0)  # windows per step
    keep_sparsity: bool = True  # zeros of earlier stages stay exactly zero
    seed: int = 0  # adapter initialisation and batch order
    allocation: RankAllocation = UniformAllocation()
    targets: LayerPatterns = [".*"]  # regexes on full module names of Linears inside decoder blocks
    ignore: LayerPatterns = []

    def check_layers(self, layers: list[dict[str, nn.Module]], stage_key: str) -> None:
        """What only the model's shapes can tell (validate runs this on a meta-device skeleton)."""
        alloc = self.allocation
        if isinstance(alloc, ExplicitRanks) and len(alloc.ranks) != len(layers):
            raise CompressError(f"{stage_key}.allocation.ranks: {len(alloc.ranks)} entries, the model has {len(layers)} blocks")
        if importlib.util.find_spec("peft") is None:
            raise CompressError(f"{stage_key}: kind recover needs peft: pip install 'atp-compress[recover]'")


# ---------------------------------------------------------------- record


@dataclass(kw_only=True)
class RecoverRecord(StageRecord):
    steps: int
    lr: float
    rank: int
    block_ranks: list[int]  # LoRA rank per decoder block
    layers: int  # Linears that got an adapter
    trainable_params: int
    windows: int  # training windows of seqlen tokens
    seqlen: int
    batch_size: int
    losses: list[float]  # training loss of every step
    loss_first: float  # mean of the first LOSS_WINDOW steps (half the steps in shorter runs)
    loss_last: float  # mean of the last LOSS_WINDOW steps
    ppl_before: float | None  # validation perplexity; None without validation data
    ppl_after: float | None
    zeros_before: int  # exact zeros in the targeted layers before training
    zeros_kept: int  # of those, still exactly zero after the merge

    def summary(self) -> str:
        ppl = "" if self.ppl_before is None else f", validation ppl {self.ppl_before:.3f} -> {self.ppl_after:.3f}"
        return (f"LoRA r{self.rank} {self.steps} steps, loss {self.loss_first:.3f} -> {self.loss_last:.3f}{ppl}, "
                f"{self.zeros_kept}/{self.zeros_before} zeros kept")


# ---------------------------------------------------------------- ranks and peft config


def block_ranks(cfg: RecoverConfig, L: int) -> list[int]:
    """LoRA rank per block; atp: r_i = rank + beta (i - (L-1)/2), rounded half up, at least 1."""
    alloc = cfg.allocation
    if isinstance(alloc, ExplicitRanks):
        return list(alloc.ranks)
    if isinstance(alloc, AtpRanks):
        return [max(1, math.floor(cfg.rank + alloc.beta * (i - (L - 1) / 2) + 0.5)) for i in range(L)]
    return [cfg.rank] * L


def lora_config(cfg: RecoverConfig, layers: list[dict[str, nn.Module]], ranks: list[int]):
    """A peft LoraConfig naming every targeted layer by its full name, with its block's rank.

    alpha scales with the rank (alpha_i = alpha r_i / rank) so that every block's update has the
    same scale alpha / rank: a block with more rank gets more directions, not a larger step."""
    import peft

    names = {name: r for block, r in zip(layers, ranks) for name in block}
    # peft matches pattern keys with re.match(r"(.*\.)?(key)$", name): escaped full names are exact
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(names),  # a list: suffix match on full names, i.e. exact here
        rank_pattern={re.escape(n): r for n, r in names.items()},
        alpha_pattern={re.escape(n): cfg.alpha * r / cfg.rank for n, r in names.items()},
        fan_in_fan_out=any(isinstance(m, Conv1D) for block in layers for m in block.values()),  # GPT-2 stores (in, out)
        bias="none",
    )


# ---------------------------------------------------------------- temporary model state


@contextmanager
def lora_attached(model: nn.Module, config):
    """The model wrapped by peft with fresh adapters; the wrappers are removed on exit without
    merging (also on error), leaving the original modules in place and nothing trainable."""
    import peft

    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecates; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    try:
        yield wrapped
    finally:
        wrapped.unload()  # puts every base layer back where its wrapper was
        model.requires_grad_(False)


@contextmanager
def training(model: nn.Module):
    """Train mode without KV cache; both restored even on error."""
    use_cache, was_training = getattr(model.config, "use_cache", None), model.training
    model.config.use_cache = False
    model.train()
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


@contextmanager
def in_float32(model: nn.Module):
    """Parameters in float32 while training (bfloat16 weights survive the round trip exactly).
    Buffers keep their dtype: model.to() would also round float32 ones such as RoPE's inv_freq."""
    dtypes = {p: p.dtype for p in model.parameters()}
    for p in dtypes:
        p.data = p.data.float()
    try:
        yield
    finally:
        for p, dtype in dtypes.items():
            p.data = p.data.to(dtype)


# ---------------------------------------------------------------- data and schedule


def windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(n, s) calibration segments -> (n * (s // seqlen), seqlen) windows; a tail shorter than
    seqlen is dropped."""
    n, s = tokens.shape
    per = s // seqlen
    return tokens[:, : per * seqlen].reshape(n * per, seqlen)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) window indices: shuffled epochs one after another, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])
    return order[:need].view(steps, batch_size)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over the first warmup * steps steps, then cosine decay towards 0."""
    w = int(warmup * steps)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def train(model: nn.Module, data: torch.Tensor, cfg: RecoverConfig) -> list[float]:
    """AdamW on the parameters that require grad; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    device = next(model.parameters()).device
    losses = []
    with training(model):
        for idx in tqdm(batch_order(len(data), cfg.batch_size, cfg.steps, cfg.seed), desc="lora recover", leave=False):
            batch = data[idx].to(device)  # (batch_size, seqlen)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------- merge


@torch.no_grad()
def merge(wrapped, modules: dict[str, nn.Module], zeros: ZeroMask | None) -> None:
    """W += (B @ A) * scaling in every targeted layer, masked to W's nonzeros when zeros is given.
    modules: the original layers by full name (peft's wrappers hold them as base_layer)."""
    inner = wrapped.get_base_model()
    for name, module in modules.items():
        lora = inner.get_submodule(name)
        A, B = lora.lora_A[ADAPTER].weight, lora.lora_B[ADAPTER].weight  # (r, in), (out, r)
        delta = (B @ A) * lora.scaling[ADAPTER]  # (out, in)
        if zeros is not None:
            zero = zeros.mask(name)  # in the weight's own layout: (in, out) for GPT-2's Conv1D
            delta[zero.t() if isinstance(module, Conv1D) else zero] = 0
        W = get_weight(module)  # (out, in) view: writes land in the module
        W += delta.to(W.dtype)


# ---------------------------------------------------------------- entry point


def refuse_quantised(modules: dict[str, nn.Module], stage_key: str) -> None:
    for name, module in modules.items():
        if hasattr(module, "quant_state") or hasattr(module, "bnb_format"):
            raise CompressError(f"{stage_key}.targets: {name} is already quantised; training would move its weights "
                                "off their grid: put the recover stage before quantize (or leave the layer out with ignore)")


def validation_ppl(model, ctx: StageContext, cfg: RecoverConfig) -> float | None:
    if ctx.validation is None:
        return None
    return perplexity(model, ctx.validation.tokens, cfg.batch_size, "recover ppl").ppl


def apply(model, ctx: StageContext, cfg: RecoverConfig) -> tuple[nn.Module, RecoverRecord]:
    start = time.perf_counter()
    layers, skipped = select_linears(model, cfg.targets, cfg.ignore, ctx.stage_key)
    cfg.check_layers(layers, ctx.stage_key)
    modules = {name: m for block in layers for name, m in block.items()}
    refuse_quantised(modules, ctx.stage_key)
    if ctx.calibration is None:
        raise CompressError(f"{ctx.stage_key}: recover trains on the calibration text (data.calibration)")
    if cfg.seqlen > ctx.calibration.seqlen:
        raise CompressError(f"{ctx.stage_key}.seqlen: {cfg.seqlen} is longer than data.calibration.seqlen ({ctx.calibration.seqlen})")
    data = windows(ctx.calibration.tokens, cfg.seqlen)
    ranks = block_ranks(cfg, len(layers))
    zeros = ZeroMask(modules)  # one bit per weight, taken before any training
    notes: list[str] = []
    ppl_before = validation_ppl(model, ctx, cfg)

    device = devices.of(model)  # model.device: cuda trains there, the whole model on the GPU
    rng_devices = [device.index or 0] if device is not None else []
    with in_float32(model), torch.random.fork_rng(devices=rng_devices):  # the seed stays local to this stage
        torch.manual_seed(cfg.seed)
        with lora_attached(model, lora_config(cfg, layers, ranks)) as wrapped:
            trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            with devices.onloaded(wrapped, device):
                losses = train(wrapped, data, cfg)
            merge(wrapped, modules, zeros if cfg.keep_sparsity else None)  # in CPU RAM, where the zero mask is
    model.eval()

    ppl_after = validation_ppl(model, ctx, cfg)
    before, kept, _ = zeros.counts()
    epochs = cfg.steps * cfg.batch_size / len(data)
    if epochs > 10:
        notes.append(f"{epochs:.0f} passes over {len(data)} training windows: the adapters may overfit the calibration text")
    if ppl_after is not None and ppl_after > ppl_before:
        notes.append(f"validation perplexity rose ({ppl_before:.3f} -> {ppl_after:.3f}): try a lower lr or fewer steps")
    w = max(1, min(LOSS_WINDOW, len(losses) // 2))  # first and last windows never overlap
    return model, RecoverRecord(
        kind="recover",
        steps=cfg.steps,
        lr=cfg.lr,
        rank=cfg.rank,
        allocation=cfg.allocation.model_dump(),
        block_ranks=ranks,
        layers=len(modules),
        trainable_params=trainable,
        windows=len(data),
        seqlen=cfg.seqlen,
        batch_size=cfg.batch_size,
        losses=[round(x, 5) for x in losses],
        loss_first=sum(losses[:w]) / w,
        loss_last=sum(losses[-w:]) / w,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        zeros_before=before,
        zeros_kept=kept,
        skipped=skipped,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
