"""A block's versions on disk: stage<k>/block<i>.safetensors (its weights under the model's
parameter names: an HF shard, which the HF and GGUF exports of a streamed model hard-link) and
block<i>.states.safetensors beside it (its Linears' quantisation states, compress/model/layer_state.py,
and in its metadata the block's counts for the size table and its layout: every projection's
shape, low-rank or narrowed). The states are written first and removed first, so a weights file
never stands without them; each file is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from compress.algorithms.quant import stored_bits
from compress.model import layer_state, tensor_files
from compress.model.anatomy import block_linears, weight_count
from compress.model.modules import LowRankLinear, spec_of


def states_path(path: Path) -> Path:
    """The layer-states file beside a block's weights file."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".states.safetensors")


def remove(path: Path) -> None:
    """A block version: its states first, so that a weights file never stands without them."""
    states_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


COUNTS = "block_counts"  # a block file's metadata entry: block_counts() of the block it holds


def written(path: Path | None, entry: str):
    """An entry of a block file's states metadata (COUNTS, LAYOUT), None where it has none."""
    if path is None or not states_path(path).is_file():
        return None
    with safe_open(states_path(path), "pt") as handle:
        value = (handle.metadata() or {}).get(entry)
    return None if value is None else json.loads(value)


def block_counts(block) -> dict:
    """What the run's size table counts in a block: its nonzero parameters, and its Linears'
    weights, exact zeros and stored bits (compress/algorithms/quant.py: stored_bits)."""
    modules = list(block_linears(block).values())
    return {
        "nonzero": sum(int(torch.count_nonzero(p)) for p in block.parameters()),  # (p != 0).sum() would copy to int64
        "weights": weight_count(modules),
        "zeros": sum(m.weight.numel() - int(torch.count_nonzero(m.weight)) for m in modules),
        "bits": sum(stored_bits(m) for m in modules),
    }


LAYOUT = "block_layout"  # a states file's metadata entry: block_specs() of the block it holds


def block_specs(block) -> dict[str, dict]:
    """{module name in the block: compress.layout spec} of its projections: every Linear, or
    LowRankLinear as one (not the Linears inside it)."""

    specs, inside = {}, ()
    for name, module in block.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LowRankLinear):
            specs[name], inside = spec_of(module), name + "."
        elif isinstance(module, nn.Linear):
            specs[name] = spec_of(module)
    return specs


class BlockFiles:
    """The block files of one staging folder (root: <staging>/.blocks)."""

    def __init__(self, root: Path, prefix: str):
        self.root, self.prefix = root, prefix

    def path(self, stage: int, i: int, trial: int | None = None) -> Path:
        folder = self.root / f"stage{stage}"
        return (folder if trial is None else folder / f"trial{trial}") / f"block{i:05d}.safetensors"

    def newest(self, i: int, before: int) -> Path | None:
        """The newest file of block i written by a stage before `before`."""
        for k in range(before - 1, -1, -1):
            if self.path(k, i).is_file():
                return self.path(k, i)
        return None

    def write(self, i: int, block: nn.Module, path: Path) -> None:
        """Block i's layer states and counts (states_path), then its weights, to `path`."""
        tensors = {f"{self.prefix}.{i}.{n}": p for n, p in block.named_parameters()}
        modules = {f"{self.prefix}.{i}.{n}": m for n, m in block.named_modules() if n}
        states, metadata = layer_state.block_states(modules)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor_files.save(states, states_path(path), {"format": "pt", COUNTS: json.dumps(block_counts(block)),
                                                      LAYOUT: json.dumps(block_specs(block)), **metadata})
        tensor_files.save(tensors, path, {"format": "pt"})

    def read(self, i: int, block: nn.Module, path: Path, put) -> None:
        """Block i's weights (each handed to put(name, tensor)) and layer states from `path`."""
        with safe_open(path, "pt") as handle:
            for name, _ in block.named_parameters():
                full = f"{self.prefix}.{i}.{name}"
                put(full, handle.get_tensor(full))
        if states_path(path).is_file():
            modules = {f"{self.prefix}.{i}.{n}": m for n, m in block.named_modules() if n}
            with safe_open(states_path(path), "pt") as handle:
                layer_state.restore_states(modules, handle.metadata(), set(handle.keys()), handle.get_tensor)
