"""Exports that need no extra runtime: sparse safetensors and the recipe's export section
(`compress export` on a finished run and GGUF files: tests/export/test_gguf.py)."""

import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.export import hf
from compress.export.hf import sparse
from compress.model import sparse_folder
from compress.run import engine
from compress.run.recipe import load_recipe

from conftest import build_tokenizer, model_from_config


@pytest.fixture(scope="module")
def tokenizer():
    """512 tokens with real merges, as many as the models' embedding rows (GGUF needs both equal)."""
    return build_tokenizer(512)


def wide_model(layers=2, seed=0, vocab=512):
    """Linear sides multiples of 32 (GPTQ packing, Q4_0 blocks) and blocks big next to the embedding."""
    return model_from_config("llama", seed, vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)


def prune_blocks(model, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                p[torch.rand(p.shape, generator=g) < sparsity] = 0


def test_sparse_file_of_a_70pct_model_is_under_half_and_reloads_bit_identical(tmp_path, tokenizer):
    model = wide_model(layers=4, vocab=256)  # the blocks hold 90% of the weights, as in real models
    prune_blocks(model, 0.7)
    dense, small = tmp_path / "dense", tmp_path / "sparse"
    model.save_pretrained(dense)
    info = hf.save(model, tokenizer, small, hf.HfExport(format="sparse"), tmp_path / "scratch")
    dense_bytes = (dense / "model.safetensors").stat().st_size
    sparse_bytes = (small / sparse_folder.WEIGHTS_FILE).stat().st_size
    assert sparse_bytes < 0.5 * dense_bytes, (sparse_bytes, dense_bytes)
    assert info["compressed_tensors"] == 28 and 0.69 < info["compressed_sparsity"] < 0.71
    assert hf.verify(model, small, info, hf.HfExport(format="sparse"))["weights"]["identical"]
    reloaded = sparse_folder.load_sparse(small)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr() or not model.config.tie_word_embeddings


def test_bitmask_round_trip_keeps_values_and_layout():
    t = torch.tensor([[0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.0], [0.0] * 9, [4.0] + [0.0] * 8])
    parts = sparse.compress(t)
    assert parts[".compressed"].tolist() == [1.5, -2.0, 3.0, 4.0]
    assert parts[".row_offsets"].tolist() == [0, 3, 3] and parts[".bitmask"].shape == (3, 2)
    assert parts[".bitmask"][0, 0].item() == 0b00001010  # little-endian bits: columns 1 and 3
    assert torch.equal(sparse_folder.decompress(parts), t)


def test_transformers_refuses_a_sparse_folder_instead_of_loading_random_weights(tmp_path, tokenizer):
    model = wide_model()
    prune_blocks(model, 0.5)
    hf.save(model, tokenizer, tmp_path / "s", hf.HfExport(format="sparse"), tmp_path / "scratch")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "s")


def recipe(tmp_path, folder, stages, export, name="e"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{source: {folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 64}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 64}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 64}}
        stages: {stages}
        eval: {{dense: false}}
        export: {export}
        output_dir: {tmp_path / name}
        """))
    return path


@pytest.fixture
def wide_folder(tmp_path, tokenizer):
    folder = tmp_path / "wide"
    wide_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sparse_export_in_a_run_reloads_identically_and_evaluates(tmp_path, wide_folder):
    path = recipe(tmp_path, wide_folder, "[{kind: prune, method: wanda, sparsity: 0.7}]", "{hf: {format: sparse}}")
    result = engine.run(load_recipe(path), path)
    out, info = result.output_dir, result.results["export"]["hf"]
    assert info["kind"] == "sparse" and info["weights"]["identical"]
    assert info["parity"]["identical"] and info["parity"]["loader"] == "compress.model.sparse_folder.load_sparse"
    assert not (out / "model.safetensors").exists() and (out / sparse_folder.WEIGHTS_FILE).is_file()
    assert result.results["size"]["files_mb"]["hf"] < 0.6 * result.results["size"]["dense_mb"]
    # every command that takes a model takes the folder: same perplexity as the run measured
    from compress.blocks.forward import perplexity
    from compress.data.windows import build_segments
    from compress.model.load import load_model

    loaded = load_model(str(out))
    d = load_recipe(path).data
    segments = build_segments({"calibration": d.calibration, "validation": d.validation, "evaluation": d.evaluation}, loaded.tokenizer)
    assert perplexity(loaded.model, segments["evaluation"].tokens).ppl == pytest.approx(result.results["perplexity"]["compressed"]["ppl"], rel=1e-6)
    assert "## Export: hf (sparse)" in (out / "report.md").read_text()
