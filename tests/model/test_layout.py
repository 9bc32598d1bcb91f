"""Restructured models (low-rank factors, narrower projections) save and reload exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from compress.export import hf
from compress.export.hf import sparse
from compress.model import layout
from compress.model.load import load_model
from compress.model.modules import LowRankLinear

from tests.conftest import tiny_model


def restructure(model) -> None:
    """Block 0: q_proj as rank-4 factors with a sparse residual; block 1: half the MLP channels."""
    attn = model.model.layers[0].self_attn
    q = attn.q_proj
    low = LowRankLinear(q.in_features, q.out_features, 4, residual=True)
    low.residual.weight.data[torch.rand_like(low.residual.weight) < 0.9] = 0
    attn.q_proj = low
    mlp = model.model.layers[1].mlp
    keep = torch.arange(0, mlp.gate_proj.out_features, 2)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, len(keep), bias=False)
        new.weight.data = old.weight.data[keep].clone()
        setattr(mlp, name, new)
    down = nn.Linear(len(keep), mlp.down_proj.out_features, bias=True)
    down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
    down.bias.data.normal_()
    mlp.down_proj = down


def test_describe_lists_only_the_modules_that_differ_from_the_config():
    model = tiny_model("llama")
    assert layout.describe(model) == {}
    restructure(model)
    shapes = layout.describe(model)
    assert shapes == {
        "model.layers.0.self_attn.q_proj": {"type": "lowrank", "in": 32, "out": 32, "rank": 4, "bias": False, "residual": True},
        "model.layers.1.mlp.gate_proj": {"type": "linear", "in": 32, "out": 32, "bias": False},
        "model.layers.1.mlp.up_proj": {"type": "linear", "in": 32, "out": 32, "bias": False},
        "model.layers.1.mlp.down_proj": {"type": "linear", "in": 32, "out": 32, "bias": True},
    }


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_a_restructured_model_reloads_bit_identical(tmp_path, tokenizer, fmt):
    model = tiny_model("llama")
    restructure(model)
    tokens = torch.randint(0, 200, (1, 12))
    expected = model(tokens).logits
    info = hf.save(model, tokenizer, tmp_path, hf.HfExport(format=fmt), tmp_path)
    assert info["kind"] == ("layout" if fmt == "dense" else "sparse")
    assert (tmp_path / layout.LAYOUT_FILE).is_file()
    assert hf.verify(model, tmp_path, info, hf.HfExport(format=fmt))["weights"]["identical"]
    reloaded = load_model(str(tmp_path)).model  # what `compress eval FOLDER` and model.source use
    assert torch.equal(reloaded(tokens).logits, expected)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None


def test_transformers_refuses_a_layout_folder_instead_of_loading_random_weights(tmp_path, tokenizer):
    model = tiny_model("llama")
    restructure(model)
    hf.save(model, tokenizer, tmp_path, hf.HfExport(), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_sparse_folder_of_a_dense_model_has_no_layout(tmp_path, tokenizer):
    model = tiny_model("llama")
    sparse.save_sparse(model, tokenizer, tmp_path)
    assert not (tmp_path / layout.LAYOUT_FILE).exists()
