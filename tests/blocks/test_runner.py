import pytest
import torch

from compress.algorithms.accumulators import Hessian, InputNorms
from compress.blocks.runner import capture_inputs, no_cache, run_block, sequential
from compress.model.anatomy import decoder_blocks

from conftest import TINY_CONFIGS, tiny_model


@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_blockwise_outputs_equal_the_full_forward(arch):
    """Running the blocks one at a time on captured inputs reproduces the model's own hidden
    states, also where blocks get different masks (Gemma 3 sliding / full attention)."""
    model = tiny_model(arch, layers=3)
    tokens = torch.randint(0, 256, (3, 24))  # longer than the sliding window (8)
    inputs = capture_inputs(model, tokens)
    assert len(inputs.hidden) == 3 and inputs.hidden[0].shape == (1, 24, 32)
    with torch.no_grad():
        reference = model(tokens, output_hidden_states=True).hidden_states
    hidden = inputs.hidden
    blocks = decoder_blocks(model)
    with no_cache(model):
        for i in range(len(blocks) - 1):  # the last entry of hidden_states has the final norm applied
            hidden = run_block(blocks[i], hidden, inputs.extras[i])
            for k, h in enumerate(hidden):
                assert torch.allclose(h, reference[i + 1][k : k + 1], atol=1e-5), f"block {i} segment {k}"


def test_sequential_feeds_each_block_the_previous_compressed_outputs():
    model = tiny_model("llama", layers=3)
    tokens = torch.randint(0, 256, (2, 16))
    inputs = capture_inputs(model, tokens)
    blocks = decoder_blocks(model)
    seen = {}

    def observe(i, block):
        seen[i] = InputNorms(32)
        return {block.self_attn.q_proj: seen[i]}

    def compress(i, block):
        block.mlp.down_proj.weight.zero_()  # the MLP now adds nothing: the block is attention only
        return True

    sequential(model, inputs, observe, compress)
    assert [seen[i].tokens for i in range(3)] == [32, 32, 32]  # 2 segments x 16 tokens per block
    # block 1 saw the outputs of the *changed* block 0: recompute them by hand and compare
    with no_cache(model):
        expected = run_block(blocks[0], inputs.hidden, inputs.extras[0])
        normed = [blocks[1].input_layernorm(h) for h in expected]
    direct = InputNorms(32)
    for x in normed:
        direct.add(x)
    assert torch.allclose(seen[1].norm2, direct.norm2, atol=1e-6)


def test_no_cache_restores_state_on_error():
    model = tiny_model("llama")
    model.config.use_cache = True
    model.train()
    with pytest.raises(RuntimeError):
        with no_cache(model):
            assert model.config.use_cache is False and not model.training
            raise RuntimeError
    assert model.config.use_cache is True and model.training


def test_bfloat16_passes_change_float32_weights_with_close_statistics():
    tokens = torch.randint(0, 256, (2, 16))
    norms = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_model("llama", layers=2)
        inputs = capture_inputs(model, tokens)
        acc = {}

        def observe(i, block):
            acc[i] = InputNorms(64)
            return {block.mlp.down_proj: acc[i]}

        def compress(i, block):
            block.mlp.down_proj.weight.mul_(0.5)
            return True

        sequential(model, inputs, observe, compress, dtype=dtype)
        assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
        norms[dtype] = acc[1].norm2
    assert torch.allclose(norms[None], norms[torch.bfloat16], rtol=0.05, atol=1e-4)


def test_layers_reading_one_tensor_share_one_fed_accumulator():
    model = tiny_model("llama", layers=1)
    inputs = capture_inputs(model, torch.randint(0, 256, (2, 16)))
    block = decoder_blocks(model)[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]
    fed = []

    class Counted(Hessian):
        def add(self, x):
            fed.append(self.name)
            super().add(x)

    acc = {name: Counted(block.get_submodule(name).in_features) for name in names}
    for name, a in acc.items():
        a.name = name

    sequential(model, inputs, lambda i, b: {b.get_submodule(n): acc[n] for n in names}, lambda i, b: False)

    assert sorted(set(fed)) == ["mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj"]  # one per input tensor
    assert acc["self_attn.k_proj"].sum is acc["self_attn.q_proj"].sum and acc["mlp.up_proj"].tokens == 32
    with no_cache(model):  # the shared totals are the ones feeding each layer on its own would give
        normed = [block.input_layernorm(h) for h in inputs.hidden]
    direct = Hessian(32)
    for x in normed:
        direct.add(x)
    assert torch.allclose(acc["self_attn.v_proj"].H, direct.H, atol=1e-6)
