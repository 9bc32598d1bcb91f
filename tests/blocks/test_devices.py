"""model.device: cuda onloads one block at a time to the GPU for the block loop (compress/blocks/devices.py).

These machines have no GPU: the tests resolve 'cuda' to the CPU so that the onloading code path
runs (every move, the passthrough capture, activations on the block device), record the moves,
and check their order and that the weights equal those of a plain run bit for bit. The GPU itself
is exercised only on a GPU machine (README)."""

from contextlib import contextmanager

import pytest
import torch

from compress.blocks import devices
from compress.model.anatomy import decoder_blocks
from compress.stages import STAGES

from conftest import context, tiny_model


@pytest.fixture
def onload_moves(monkeypatch):
    """'cuda' resolves to the CPU; returns the list of (event, block index) the block loop makes."""
    monkeypatch.setattr(devices, "block_device", lambda name: None if name == "cpu" else torch.device("cpu"))
    moves = []
    real = devices.onloaded

    @contextmanager
    def recording(module, device):
        if device is None:  # the plain run: nothing moves
            with real(module, device):
                yield module
            return
        moves.append(("on", getattr(module, "index", None)))
        with real(module, device):
            yield module
        moves.append(("off", getattr(module, "index", None)))

    monkeypatch.setattr(devices, "onloaded", recording)
    return moves


BLOCK_LOOP_STAGES = [  # every stage that runs the block loop, with what it keeps on modules afterwards
    {"kind": "prune", "method": "wanda", "sparsity": 0.5, "allocation": {"kind": "atp", "beta": 0.05}},
    {"kind": "prune", "method": "sparsegpt", "sparsity": 0.5, "quantize": {"bits": 4, "group_size": 16}},
    {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 16},
    {"kind": "lowrank", "method": "asvd", "ratio": 0.3},
    {"kind": "structured", "ratio": 0.25, "channel_multiple": 8},
]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma3: blocks take different masks
@pytest.mark.parametrize("stage", BLOCK_LOOP_STAGES, ids=lambda s: f"{s['kind']}-{s.get('method', '')}")
def test_onloaded_block_loop_equals_the_plain_run(onload_moves, arch, stage):
    config_class, apply = STAGES[stage["kind"]]
    plain = tiny_model(arch, layers=4)
    onloaded = tiny_model(arch, layers=4)
    onloaded.load_state_dict(plain.state_dict())
    for i, block in enumerate(decoder_blocks(onloaded)):
        block.index = i
    apply(plain, context(), config_class(**stage))
    devices.attach(onloaded, "cuda")
    apply(onloaded, context(), config_class(**stage))

    expected, got = plain.state_dict(), onloaded.state_dict()
    assert list(expected) == list(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    # one block on the device at a time, in order; the last block is not propagated but still visits
    assert onload_moves == [(event, i) for i in range(4) for event in ("on", "off")]
    for module in onloaded.modules():  # what stages keep on modules (grids) is in CPU RAM too
        state = getattr(module, "quant_state", None)
        assert state is None or state.scales.device.type == "cpu"


def test_device_names():
    assert devices.block_device("cpu") is None
    assert devices.block_device("cuda") == torch.device("cuda:0")
    assert devices.block_device("auto") == torch.device("cuda:0")
    assert devices.block_device("cuda:2") == torch.device("cuda:2")
    nested = devices.move(({"a": torch.zeros(1), "n": 3}, [torch.ones(1)]), torch.device("cpu"))
    assert nested[0]["n"] == 3 and torch.equal(nested[1][0], torch.ones(1))
