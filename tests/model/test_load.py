import pytest
import torch

from compress.errors import CompressError
from compress.model.anatomy import BLOCK_PATHS, block_linears, context_length, decoder_blocks, get_weight, set_weight, skeleton
from compress.model.load import load_model, read_config

from conftest import TINY_CONFIGS, needs_default_model, tiny_model

EXPECTED_LINEARS = {
    "llama": 7, "mistral": 7, "qwen2": 7, "gemma": 7, "gemma3_text": 7, "gemma3": 7, "opt": 6, "gpt2": 4,
}


@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_blocks_and_linears_found(arch):
    model = tiny_model(arch, layers=3)
    blocks = decoder_blocks(model)
    assert len(blocks) == 3
    linears = block_linears(blocks[1])
    assert len(linears) == EXPECTED_LINEARS[arch]
    for module in linears.values():
        W = get_weight(module)
        assert W.shape[1] in (32, 64, 128)  # (out, in): inputs are the hidden or the MLP size


def test_gpt2_conv1d_weight_is_transposed_view():
    model = tiny_model("gpt2")
    c_fc = decoder_blocks(model)[0].mlp.c_fc  # Conv1D stores (in, out)
    W = get_weight(c_fc)
    assert W.shape == (c_fc.weight.shape[1], c_fc.weight.shape[0])
    W[0, 0] = 0.0  # a write through the view lands in the module
    assert c_fc.weight[0, 0] == 0.0
    set_weight(c_fc, torch.ones_like(W))
    assert torch.equal(c_fc.weight, torch.ones_like(c_fc.weight))


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(CompressError, match=r"unsupported architecture 'bloom'.*supported: .*gpt2.*llama"):
        decoder_blocks(model)


def test_load_local_folder_and_count_blocks(tiny_folder):
    loaded = load_model(str(tiny_folder))
    assert loaded.kind == "folder" and len(decoder_blocks(loaded.model)) == 2
    assert not any(p.requires_grad for p in loaded.model.parameters())
    meta = skeleton(read_config(str(tiny_folder)))  # names and shapes only, no weights
    assert len(decoder_blocks(meta)) == 2 and next(meta.parameters()).is_meta


def test_pickle_checkpoint_needs_opt_in(tmp_path, tokenizer):
    folder = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # an old-style pickle checkpoint
    tokenizer.save_pretrained(folder)
    with pytest.raises(CompressError, match=r"only pickle weights .*allow_pickle: true"):
        load_model(str(folder))
    assert load_model(str(folder), allow_pickle=True).kind == "folder"


@pytest.mark.parametrize(
    "source,expected",
    [
        ("./no/such/dir", r"does not exist"),
        ("missing.gguf", r"does not exist"),
    ],
)
def test_bad_sources(source, expected):
    with pytest.raises(CompressError, match=expected):
        load_model(source)


def test_folder_without_config(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(CompressError, match=r"no config.json; to load a GGUF give the file itself"):
        load_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(CompressError, match="not a .gguf"):
        load_model(str(f))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(CompressError, match=r"could not be loaded as a hub id"):
        load_model("some-org/some-model-that-is-not-cached")


def test_supported_table_covers_the_tested_architectures():
    assert set(TINY_CONFIGS) <= set(BLOCK_PATHS)


@needs_default_model
def test_registered_default_model_blocks_from_metadata():
    config = read_config("smollm2-135m")  # the GGUF's metadata only
    assert len(decoder_blocks(skeleton(config))) == 30 and context_length(config) == 8192
