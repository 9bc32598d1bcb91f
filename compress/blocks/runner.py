"""The one block loop every stage shares (after Wanda's and SparseGPT's sequential runners).

    capture the inputs of block 0 (and the keyword arguments the model hands every block)
    for each block:
        observe:   run the block on its inputs with forward hooks on chosen Linears (statistics)
        compress:  change the block's weights using those statistics
        propagate: run the changed block again; its outputs are the next block's inputs

Only one block's inputs and outputs are alive at a time: peak memory is the model plus two
buffers of (nsamples, seqlen, hidden).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from compress.blocks import devices
from compress.blocks.store import store_of
from compress.model.anatomy import decoder_blocks


class Accumulator(Protocol):
    def add(self, x: torch.Tensor) -> None: ...

    def share(self, other: "Accumulator") -> None:
        """Take other's totals as this one's: both layers read the same input tensor."""


@dataclass
class BlockInputs:
    """What the model feeds its blocks for a set of segments."""

    hidden: list[torch.Tensor]  # per segment: (1, seqlen, hidden) inputs of block 0
    extras: list[tuple[tuple, dict]]  # per block: positional args after hidden_states, and kwargs


def buffer_bytes(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    """What the runner holds besides the model: one block's inputs and outputs, (nsamples,
    seqlen, hidden) each."""
    return 2 * nsamples * seqlen * hidden * torch.empty(0, dtype=dtype).element_size()


class _StopForward(Exception):
    """Raised by a hook once block 0's input is captured: the rest of the model need not run."""


@contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Calibration wants plain forwards: no KV cache, eval mode; both restored even on error."""
    use_cache = getattr(model.config, "use_cache", None)
    training = model.training
    model.config.use_cache = False
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.config.use_cache = use_cache
        model.train(training)


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _block_output(out) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older versions and some models return a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype | None = None, skip_blocks: bool = False) -> BlockInputs:
    """Block-0 inputs of every segment (kept in `dtype`, the calibration passes' dtype, when
    given: no second copy in the model's dtype), and each block's extra arguments. skip_blocks:
    record the extras without running the blocks' arithmetic (always so for a streamed or
    onloaded model; needed where the blocks' dtype differs from the embeddings').

    The extra arguments (attention mask, rotary embeddings, position ids) depend only on the
    segment length, not on its text, so one full forward of the first segment records them for
    every block; that matters where blocks differ (Gemma 3 and Qwen 2 alternate sliding-window
    and full attention). Every other segment stops at block 0.
    """
    blocks = decoder_blocks(model)
    extras: list = [None] * len(blocks)
    hidden: list[torch.Tensor] = []

    def record_extras(index):
        def hook(module, args, kwargs):
            extras[index] = (tuple(args[1:]), dict(kwargs))
            if index == len(blocks) - 1:
                raise _StopForward  # the last block and the head need not run (no logits)

        return hook

    def record_hidden(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach()
        hidden.append(x.clone() if dtype is None or x.dtype == dtype else x.to(dtype))
        raise _StopForward

    tokens = tokens.to(next(model.parameters()).device)
    # a streamed model's blocks are not in memory; an onloaded one's are in CPU RAM, too slow to run whole
    skip_blocks = skip_blocks or not store_of(model).resident or devices.of(model) is not None
    with no_cache(model):
        handles = [b.register_forward_pre_hook(record_extras(i), with_kwargs=True) for i, b in enumerate(blocks)]
        with hooks(handles), passthrough(blocks, skip_blocks):
            try:
                model(tokens[:1], use_cache=False)
            except _StopForward:
                pass
        assert all(e is not None for e in extras), "a block was not called in the forward pass"
        with hooks([blocks[0].register_forward_pre_hook(record_hidden, with_kwargs=True)]):
            for row in tokens:
                try:
                    model(row.unsqueeze(0), use_cache=False)
                except _StopForward:
                    pass
    return BlockInputs(hidden, extras)


@contextmanager
def passthrough(blocks, on: bool) -> Iterator[None]:
    """Blocks that hand their input on unchanged: the extras a block receives do not depend on
    what the blocks before it computed, so recording them needs none of the blocks' arithmetic."""
    if on:
        for block in blocks:
            block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        yield
    finally:
        if on:
            for block in blocks:
                del block.forward


def run_block(
    block: nn.Module, inputs: list[torch.Tensor], extra: tuple[tuple, dict], out: list | None = None
) -> list[torch.Tensor]:
    """The block's output for every input; written into `out` item by item when given, so that
    recomputing never holds a third buffer."""
    args, kwargs = extra
    out = [None] * len(inputs) if out is None else out
    for k, x in enumerate(inputs):
        out[k] = _block_output(block(x, *args, **kwargs))
    return out


Observe = Callable[[int, nn.Module], dict[nn.Module, Accumulator]]
Compress = Callable[[int, nn.Module], bool]


def sequential(
    model: nn.Module,
    inputs: BlockInputs,
    observe: Observe,
    compress: Compress,
    desc: str = "blocks",
    dtype: torch.dtype | None = None,
    keep_last: bool = False,
    collected: dict | None = None,
    finish: Compress | None = None,
) -> list[torch.Tensor] | None:
    """Walk the blocks in order: observe, compress, propagate (see the module docstring).

    observe(i, block) returns {module: accumulator}; each accumulator gets the module's input
    activations, (1, seqlen, in_features) per segment. An empty dict skips the observation pass.
    Layers that read the very same tensor (q/k/v, gate/up) are fed once: the others share() the
    first one's totals, which saves most of SparseGPT's Hessian work.
    compress(i, block) changes the block in place and returns whether it changed anything: an
    unchanged block reuses the outputs of the observation pass instead of running again.

    dtype: the forward passes in this dtype (bf16 matmuls: ~3x faster where native) on a copy of
    each block; statistics accumulate in float32, weights change in the model's own dtype.

    keep_last: also run the last block and return its outputs (a block-wise forward pass).
    collected: what compress gathers as it goes (plain values: numbers, strings, lists, dicts),
    saved with each checkpoint and put back when a killed pass resumes.
    finish(i, block): each block into its final form (low-rank modules, narrowed projections)
    once its outputs are propagated; the store decides when (store.finish: now, or when a
    resident beta search adopts its kept trial).
    Each block comes from the model's block store (compress/blocks/store.py) for its turn: a
    streamed model holds one in memory at a time; a pass that changes weights checkpoints as it
    goes. With `model.device: cuda` each block visits the GPU (compress/blocks/devices.py); the
    activations stay there (keep_last returns them there).
    """
    blocks = decoder_blocks(model)
    store = store_of(model)
    device = devices.of(model)
    # a pass that changes weights can resume; a forward-only one (keep_last) just runs again
    start, resumed = store.begin_pass(collected) if not keep_last else (0, None)
    hidden = [devices.move(_cast(h, dtype), device) for h in (resumed if resumed is not None else inputs.hidden)]
    with no_cache(model):
        for i, block in enumerate(tqdm(blocks, desc=desc, leave=False)):
            if i < start:
                continue  # done before the run was killed: its weights are on disk
            last = i == len(blocks) - 1 and not keep_last  # nothing reads the last block's outputs
            with store.loaded(i) as state, devices.onloaded(block, device):
                extra = devices.move(_cast(inputs.extras[i], dtype), device)
                work = _working_copy(block, dtype)
                outputs = observed(work, block, observe(i, block), hidden, extra)
                state["changed"] = changed = compress(i, block)
                if not last:
                    hidden = propagated(work, block, changed, dtype, hidden, extra, outputs)
                del work
                if finish is not None:  # an unchanged block too: fn drops what the stage added for the pass
                    store.finish(i, block, finish)
            if last:
                break
            if changed:
                store.checkpoint(i + 1, hidden, collected)
    return hidden if keep_last else None


def observed(work: nn.Module, block: nn.Module, watched: dict, hidden: list, extra) -> list | None:
    """The block's outputs of the observation pass (None when nothing is watched), each watched
    module's accumulator fed its inputs: layers that read the very same tensor share one feed."""
    if not watched:
        return None
    names = {module: name for name, module in block.named_modules()}
    acc = {work.get_submodule(names[m]): a for m, a in watched.items()}  # keyed by the copy that runs
    leader = _same_input_leaders(work, acc, hidden[0], extra)
    fed = [m for m in acc if leader[m] is m]
    with hooks([m.register_forward_hook(_feed(acc[m])) for m in fed]):
        outputs = run_block(work, hidden, extra)
    for m in acc:
        if leader[m] is not m:
            acc[m].share(acc[leader[m]])
    return outputs


def propagated(work: nn.Module, block: nn.Module, changed: bool, dtype, hidden: list, extra, outputs: list | None) -> list:
    """The inputs of the next block: the compressed block's outputs (the observation pass's where
    the block did not change)."""
    if changed and work is not block:
        work = _working_copy(block, dtype)
    if outputs is None:
        return run_block(work, hidden, extra)
    if changed:
        run_block(work, hidden, extra, out=outputs)
    return outputs


def _same_input_leaders(block: nn.Module, accumulators: dict, x: torch.Tensor, extra) -> dict:
    """{module: the first module of the same kind of accumulator that reads the same input tensor},
    from one segment's forward through the block."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module, args, output):
        seen.append((module, args[0]))

    with hooks([m.register_forward_hook(record) for m in accumulators]):
        run_block(block, [x], extra)
    leader = {m: m for m in accumulators}  # not reached by the probe, or called twice: fed on its own
    calls = [m for m, _ in seen]
    for k, (module, inp) in enumerate(seen):
        if calls.count(module) == 1:
            kind = type(accumulators[module])
            leader[module] = next(m for m, other in seen[: k + 1] if other is inp and type(accumulators[m]) is kind)
    return leader


def _working_copy(block: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    if dtype is None or next(block.parameters()).dtype == dtype:
        return block
    return copy.deepcopy(block).to(dtype)


def _cast(obj, dtype: torch.dtype | None):
    """Floating tensors inside nested tuples/lists/dicts cast to dtype; everything else as is."""
    if dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(x, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _feed(acc: Accumulator):
    def hook(module, args, output):
        acc.add(args[0])

    return hook
