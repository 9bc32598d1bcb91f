"""Weights spilled to disk and zero masks: exact round trips, in place, for every dtype and layout."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.blocks.snapshots import WeightFile, ZeroMask, scratch_folder


def modules(dtype):
    torch.manual_seed(0)
    layers = {"a": nn.Linear(16, 8), "b": nn.Linear(8, 24), "c": Conv1D(12, 8)}  # Conv1D stores (in, out)
    for m in layers.values():
        m.to(dtype)
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_file_restores_in_place_bit_for_bit(tmp_path, dtype):
    layers = modules(dtype)
    dense = {k: m.weight.detach().clone() for k, m in layers.items()}
    biases = {k: m.bias.detach().clone() for k, m in layers.items()}  # spilled too: structured pruning changes them
    storage = {k: m.weight.data.data_ptr() for k, m in layers.items()}
    spilled = WeightFile(tmp_path / "w.bin", layers)
    spilled.save()
    assert (tmp_path / "w.bin").stat().st_size == sum(t.numel() * t.element_size() for t in [*dense.values(), *biases.values()])
    for m in layers.values():
        m.weight.data.mul_(0).add_(3)
        m.bias.data.mul_(0).add_(3)
    spilled.load()
    for k, m in layers.items():
        assert torch.equal(m.weight, dense[k]) and m.weight.data.data_ptr() == storage[k]
        assert torch.equal(m.bias, biases[k])


def test_zero_mask_reapplies_exactly_the_zeros():
    layers = modules(torch.float32)
    dense = {k: m.weight.detach().clone() for k, m in layers.items()}
    for m in layers.values():
        W = m.weight.data
        W[W.abs() < W.abs().median()] = 0
    pruned = {k: m.weight.detach().clone() for k, m in layers.items()}
    mask = ZeroMask(layers)
    assert sum(b.nbytes for b in mask.bits.values()) == sum((W.numel() + 7) // 8 for W in dense.values())
    for k, m in layers.items():
        m.weight.data.copy_(dense[k])
    mask.apply()
    for k, m in layers.items():
        assert torch.equal(m.weight, pruned[k])


def test_scratch_folder_is_removed(tmp_path):
    with scratch_folder(tmp_path / "scratch") as folder:
        (folder / "x.bin").write_bytes(b"123")
    assert list((tmp_path / "scratch").iterdir()) == []
    with pytest.raises(RuntimeError), scratch_folder(tmp_path / "scratch") as folder:
        raise RuntimeError("trial failed")
    assert list((tmp_path / "scratch").iterdir()) == []
