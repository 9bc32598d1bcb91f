"""The block store (compress/blocks/store.py): block files carry the weights and every Linear's
quantisation state; an interrupted run's stages that changed the blocks' layout are run again."""

import json

import pytest
import torch
from safetensors import safe_open

from compress.algorithms import ggml_formats
from compress.algorithms.quant import Grid, rtn
from compress.blocks.files import COUNTS, block_counts, states_path
from compress.blocks.store import ResidentBlocks, StreamedBlocks

from conftest import tiny_model


def test_a_block_file_brings_back_weights_grids_and_block_formats(tmp_path):
    model = tiny_model("llama")
    store = ResidentBlocks(model, tmp_path)
    block = store.blocks[0]
    q, gate = block.self_attn.q_proj, block.mlp.gate_proj
    W, state = rtn(q.weight.data, Grid(4, 32, False))
    q.weight.data, q.quant_state = W, state
    W, gstate = ggml_formats.rtn(gate.weight.data, ggml_formats.FORMATS["q4_0"])
    gate.weight.data, gate.quant_state = W, gstate
    block.mlp.up_proj.bnb_format = "nf4"
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    path = store.path(0, 0)
    store.write(0, path)
    # the weights file is an HF shard (the exports of a streamed model hard-link it; llama.cpp's
    # converter reads it): the block's parameters under the model's names, nothing else
    with safe_open(path, "pt") as handle:
        assert set(handle.keys()) == {f"model.layers.0.{n}" for n, _ in block.named_parameters()}
        assert handle.metadata() == {"format": "pt"}
    with safe_open(states_path(path), "pt") as handle:
        assert all(".quant_state." in k for k in handle.keys()) and len(list(handle.keys())) > 0
        assert json.loads(handle.metadata()[COUNTS]) == block_counts(block)

    for p in block.parameters():  # what a later change would do; the file must undo it
        p.data.add_(1.0)
    for m in (q, gate, block.mlp.up_proj):
        for attr in ("quant_state", "bnb_format"):
            if hasattr(m, attr):
                delattr(m, attr)
    store.read(0, path)
    assert all(torch.equal(block.state_dict()[k], v) for k, v in saved.items())
    assert q.quant_state.grid == Grid(4, 32, False) and torch.equal(q.quant_state.scales, state.scales)
    assert torch.equal(q.quant_state.g_idx, state.g_idx) and torch.equal(q.quant_state.zeros, state.zeros)
    assert gate.quant_state.fmt.name == "q4_0" and torch.equal(gate.quant_state.d, gstate.d)
    assert torch.equal(gate.quant_state.codes(gate.weight.data), gstate.codes(W))
    assert block.mlp.up_proj.bnb_format == "nf4"


def test_a_store_without_a_folder_keeps_nothing_on_disk():
    """Library use (a stage applied to a bare model): passes run, nothing is written."""
    model = tiny_model("llama")
    store = ResidentBlocks(model, None)
    assert store.begin_pass() == (0, None)
    with store.loaded(0) as state:
        state["changed"] = True
    store.checkpoint(1, [torch.zeros(1)])
    store.end_stage(0, {})
    assert store.stage == 1 and not store.dirty


def test_a_streamed_block_is_counted_from_its_file_without_reading_it(tmp_path):
    """The run's size table (zeros, stored bits, nonzero parameters) needs no pass of its own over
    a streamed model: each block file says what it holds."""
    model = tiny_model("llama", layers=2)
    q = model.model.layers[1].self_attn.q_proj
    q.weight.data, q.quant_state = rtn(q.weight.data, Grid(4, 32, True))
    q.weight.data[:, :8] = 0
    expected = [block_counts(b) for b in model.model.layers]
    store = StreamedBlocks(model, source=None, staging=tmp_path, dtype=torch.float32)
    for i in range(2):
        store.write(i, store.path(0, i))

    def no_reading(*args):
        raise AssertionError("a block was read to be counted")

    store.load = no_reading
    assert [store.counts(i) for i in range(2)] == expected
    assert expected[1]["zeros"] >= 8 * q.weight.shape[0] and expected[1]["bits"] < expected[0]["bits"]
    states_path(store.path(0, 1)).unlink()  # no counts beside it (a file of an older version): read, and counted
    with pytest.raises(AssertionError, match="read to be counted"):
        store.counts(1)
