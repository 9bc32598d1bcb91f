"""Where the arithmetic runs when the weights live elsewhere (`model.device`).

- `cpu` (the default): weights and arithmetic in CPU RAM.
- `cuda`, `cuda:N`: the weights stay in CPU RAM (or on disk with `model.stream`); each decoder
  block is moved to that GPU for its turn in the block loop and back (sequential onloading), the
  calibration activations live on the GPU, so a model far bigger than the GPU is calibrated with
  one block on it. Whole-model forwards (perplexity, zero-shot, LoRA recovery, tokens/s) dispatch
  the model with accelerate: the blocks that fit on the GPU, the rest onloaded from CPU RAM for
  each forward; put back after. A streamed model is measured block by block (evaluate.py), each
  block onloaded like in calibration.
- `auto`: the block loop on cuda:0; whole-model work spread over every visible GPU with
  accelerate's device map (CPU offload for what does not fit).

Outside a block's turn every weight is in CPU RAM, so snapshots, exports and records never see a
GPU tensor. Written and reviewed without a GPU machine: the README says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import get_max_memory
from torch import nn

from compress.errors import CompressError
from compress.model.anatomy import decoder_blocks

CPU = torch.device("cpu")


def check(name: str) -> None:
    """One clear line when the recipe asks for a GPU this torch cannot see."""
    if name == "cpu":
        return
    if not torch.cuda.is_available():
        raise CompressError(f"model.device: '{name}' asked for, but this torch ({torch.__version__}) sees no CUDA device")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise CompressError(f"model.device: '{name}' asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def block_device(name: str) -> torch.device | None:
    """The device the block loop runs on; None for CPU (no moving at all)."""
    if name == "cpu":
        return None
    return torch.device("cuda:0" if name in ("auto", "cuda") else name)


def attach(model: nn.Module, name: str) -> None:
    """Remember the recipe's device on the model, where the block loop and evaluation look
    (check() it first: the engine does, before loading)."""
    model.compress_device = name


def of(model: nn.Module) -> torch.device | None:
    """The block loop's device for this model, None when it runs where the weights are."""
    return block_device(getattr(model, "compress_device", "cpu"))


def move(obj, device: torch.device | None):
    """Tensors inside nested tuples/lists/dicts moved to device; everything else as is."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def on_cpu(state):
    """A copy of a dataclass or NamedTuple (QuantState, low-rank Factors) with its tensors in CPU
    RAM: what a stage keeps on a module after the block's turn must not hold GPU memory."""
    values = state._asdict() if hasattr(state, "_asdict") else {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    moved = {k: v.cpu() for k, v in values.items() if isinstance(v, torch.Tensor)}
    return state._replace(**moved) if hasattr(state, "_replace") else dataclasses.replace(state, **moved)


@contextmanager
def onloaded(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """The module on device for the duration, back in CPU RAM afterwards (also on error)."""
    if device is None:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(CPU)


@contextmanager
def dispatched(model: nn.Module) -> Iterator[torch.device]:
    """The whole model spread over the recipe's GPU(s) with accelerate for whole-model forwards
    (perplexity, zero-shot, LoRA training, tokens/s); what does not fit stays in CPU RAM and is
    onloaded per forward. Yields the device the input ids go to. The hooks are removed and every
    weight is back in CPU RAM afterwards. A streamed model's blocks are read from their files for
    each forward (from_disk)."""
    name = getattr(model, "compress_device", "cpu")
    store = getattr(model, "block_store", None)
    if store is not None and not store.resident:
        with from_disk(model, store, block_device(name) or CPU) as device:
            yield device
        return
    if name == "cpu":
        yield next(model.parameters()).device
        return


    gpus = list(range(torch.cuda.device_count())) if name == "auto" else [block_device(name).index or 0]
    available = get_max_memory()
    max_memory = {g: available[g] for g in gpus} | {"cpu": available["cpu"]}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[type(decoder_blocks(model)[0]).__name__])
    main = torch.device("cuda", gpus[0])
    dispatch_model(model, device_map, main_device=main)
    try:
        yield main
    finally:
        remove_hook_from_module(model, recurse=True)  # offloaded weights go back where they were
        model.to(CPU)
        model.__dict__.pop("hf_device_map", None)  # or transformers would treat it as still dispatched


@contextmanager
def from_disk(model: nn.Module, store, device: torch.device) -> Iterator[torch.device]:
    """A streamed model ready for whole-model forwards (zero-shot scoring): accelerate's disk
    offload over the block store's files, so each block is read from its file when the forward
    reaches it and dropped after; the tensors outside the blocks stay in RAM."""
    where = "cpu" if device.type == "cpu" else device.index or 0
    parts = store.prefix.split(".")
    ancestors = {".".join(parts[:k]) for k in range(len(parts))}  # "", "model" for "model.layers"
    device_map = {f"{store.prefix}.{i}": "disk" for i in range(store.count)}
    for parent in ancestors:
        for child, _ in model.get_submodule(parent).named_children():
            full = f"{parent}.{child}" if parent else child
            if full not in ancestors and full != store.prefix:
                device_map[full] = where
    # a plain "cpu" (safetensors' safe_open, which reads the offloaded blocks, takes no torch.device for it)
    dispatch_model(model, device_map, main_device=where, offload_index=store.offload_index())
    try:
        yield device
    finally:
        remove_hook_from_module(model, recurse=True)  # the blocks are back on the meta device
        model.__dict__.pop("hf_device_map", None)
