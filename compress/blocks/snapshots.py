"""Copies of many layers' weights kept off the heap, for searches that restore them between trials.

A second in-memory copy of every pruned weight would add the size of the model to the peak (and
two copies for "dense + best trial"). Here the dense weights go to a raw file on disk, read back
in place with plain reads (not a memory map, whose touched pages would count as resident memory);
and where a trial only zeroes weights, its result is kept as a packed bit mask, 1/32 of a float32
copy.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn


@contextmanager
def scratch_folder(base: Path | None) -> Iterator[Path]:
    """A fresh folder inside `base` (the system temp when None), removed afterwards."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="spill-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array sharing its memory (any dtype, bf16 included)."""
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy()


class WeightFile:
    """The weights (and biases) of `modules`, written to one file in a fixed order and read back in place."""

    def __init__(self, path: Path, modules: dict[str, nn.Module]):
        self.path = path
        self.modules = modules

    def tensors(self) -> Iterator[torch.Tensor]:
        """Weights and biases (the structured stage compensates removed channels in a bias)."""
        for module in self.modules.values():
            yield module.weight.data
            if getattr(module, "bias", None) is not None:
                yield module.bias.data

    def save(self) -> None:
        with open(self.path, "wb") as f:
            for W in self.tensors():
                f.write(memoryview(_raw_bytes(W.cpu())))

    def load(self) -> None:
        with open(self.path, "rb") as f:
            for W in self.tensors():
                target = W if W.device.type == "cpu" and W.is_contiguous() else torch.empty_like(W, device="cpu").contiguous()
                buffer = memoryview(_raw_bytes(target))
                if f.readinto(buffer) != len(buffer):
                    raise OSError(f"{self.path}: truncated")
                if target is not W:
                    W.copy_(target)


class ZeroMask:
    """Where the modules' weights are exactly zero, one bit per weight."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.bits = {name: np.packbits((m.weight.data == 0).cpu().numpy().reshape(-1)) for name, m in modules.items()}

    def mask(self, name: str) -> torch.Tensor:
        """The bool mask of one module, shaped and placed like its weight."""
        W = self.modules[name].weight.data
        zero = np.unpackbits(self.bits[name], count=W.numel()).astype(bool).reshape(W.shape)
        return torch.from_numpy(zero).to(W.device)

    def apply(self) -> None:
        """Zero the masked weights (of modules restored to their dense values)."""
        for name, m in self.modules.items():
            m.weight.data[self.mask(name)] = 0

    def counts(self) -> tuple[int, int, int]:
        """Zeros in the mask, of those still zero in the modules now, and zeros now."""
        masked = kept = now = 0
        for name, m in self.modules.items():
            zero, was = m.weight.data == 0, self.mask(name)
            masked += int(was.sum())
            kept += int((was & zero).sum())
            now += int(zero.sum())
        return masked, kept, now
