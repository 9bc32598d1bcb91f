"""Exports that need no extra runtime: sparse safetensors, GGUF files written from GPTQ grids, the
recipe's export section and `compress export` on a finished run."""

import json
import textwrap

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from compress import engine
from compress.errors import CompressError
from compress.export import gguf as gguf_export
from compress.export import hf, sparse
from compress.export.gguf import GgufExport
from compress.export_run import export_run
from compress.recipe import load_recipe
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
    sparse_bytes = (small / sparse.WEIGHTS_FILE).stat().st_size
    assert sparse_bytes < 0.5 * dense_bytes, (sparse_bytes, dense_bytes)
    assert info["compressed_tensors"] == 28 and 0.69 < info["compressed_sparsity"] < 0.71
    assert hf.verify(model, small, info, hf.HfExport(format="sparse"))["weights"]["identical"]
    reloaded = sparse.load_sparse(small)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr() or not model.config.tie_word_embeddings


def test_bitmask_round_trip_keeps_values_and_layout():
    t = torch.tensor([[0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.0], [0.0] * 9, [4.0] + [0.0] * 8])
    parts = sparse.compress(t)
    assert parts[".compressed"].tolist() == [1.5, -2.0, 3.0, 4.0]
    assert parts[".row_offsets"].tolist() == [0, 3, 3] and parts[".bitmask"].shape == (3, 2)
    assert parts[".bitmask"][0, 0].item() == 0b00001010  # little-endian bits: columns 1 and 3
    assert torch.equal(sparse.decompress(parts), t)


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
    assert info["parity"]["identical"] and info["parity"]["loader"] == "compress.export.sparse.load_sparse"
    assert not (out / "model.safetensors").exists() and (out / sparse.WEIGHTS_FILE).is_file()
    assert result.results["size"]["files_mb"]["hf"] < 0.6 * result.results["size"]["dense_mb"]
    # every command that takes a model takes the folder: same perplexity as the run measured
    from compress.data import build_segments
    from compress.evaluate import perplexity
    from compress.model import load_model

    loaded = load_model(str(out))
    d = load_recipe(path).data
    segments = build_segments({"calibration": d.calibration, "validation": d.validation, "evaluation": d.evaluation}, loaded.tokenizer)
    assert perplexity(loaded.model, segments["evaluation"].tokens).ppl == pytest.approx(result.results["perplexity"]["compressed"]["ppl"], rel=1e-6)
    assert "## Export: hf (sparse)" in (out / "report.md").read_text()


def quantised_model(tmp_path, tokenizer, bits, group_size=32, sym=True, act_order=False):
    """A wide model through the quantize stage (GPTQ on python-docs windows)."""
    from compress.context import StageContext
    from compress.data import SegmentsConfig, build_segments
    from compress.stages.quantize import QuantizeConfig, apply

    model = wide_model()
    segments = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)
    cfg = QuantizeConfig(kind="quantize", method="gptq", bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    model, _ = apply(model, StageContext(segments["calibration"], None, torch.float32, scratch_dir=tmp_path / "s"), cfg)
    return model


def gguf_weights(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)) for t in reader.tensors}


@pytest.mark.parametrize("bits,kind,qtype", [(4, "q4_0", gguf.GGMLQuantizationType.Q4_0), (8, "q8_0", gguf.GGMLQuantizationType.Q8_0)])
def test_gptq_g32_grid_is_written_as_its_gguf_type_with_the_same_weights(tmp_path, tokenizer, bits, kind, qtype):
    model = quantised_model(tmp_path, tokenizer, bits)
    cfg = GgufExport(types=[kind])
    info = gguf_export.save(model, tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    entry = info["files"][kind]
    assert entry["how"].startswith("GPTQ grid written block for block")
    assert gguf_export.verify(model, tmp_path / "g", info, cfg)["weights"][kind] == {"tensors": 14, "identical": True}
    # independently: gguf's own dequantiser, the llama rows permuted back
    stored = gguf_weights(tmp_path / "g" / entry["file"])
    c = model.config
    for name, module in model.named_modules():
        if getattr(module, "quant_state", None) is None:
            continue
        i, rest = name.split(".layers.")[1].split(".", 1)
        short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[rest]
        qt, values = stored[f"blk.{i}.{short}.weight"]
        assert qt == qtype
        W = module.weight.detach()
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(short)
        expected = gguf_export.permute_rows(W, heads) if heads else W
        assert np.array_equal(values.reshape(W.shape), expected.numpy()), name
    assert stored["token_embd.weight"][0] == gguf.GGMLQuantizationType.Q8_0  # not on a grid: Q8_0, as the note says
    assert any("not on a" in n for n in info["notes"])


def test_a_grid_that_is_not_a_gguf_type_is_not_written_directly(tmp_path, tokenizer):
    model = quantised_model(tmp_path, tokenizer, 4, group_size=64)
    assert gguf_export.grid_blocks(model.model.layers[0].mlp.up_proj, None) is None


def test_f32_gguf_holds_the_model_weights_exactly(tmp_path, tokenizer):
    model = wide_model()
    prune_blocks(model, 0.5)
    cfg = GgufExport(types=["f32", "f16"])
    info = gguf_export.save(model, tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    assert gguf_export.verify(model, tmp_path / "g", info, cfg)["weights"]["f32"]["identical"]
    assert info["files"]["f32"]["zeros_kept"] == 1.0 and info["files"]["f16"]["zeros_kept"] == 1.0
    assert info["files"]["f16"]["mb"] < 0.55 * info["files"]["f32"]["mb"]
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model-f16.gguf"))
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre", "add_bos_token"))}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 512 and len(reader.fields["tokenizer.ggml.merges"].data) > 200


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path):
    with pytest.raises(CompressError, match="257 tokens but the model's embedding only 256 rows"):
        gguf_export.save(wide_model(vocab=256), build_tokenizer(256), tmp_path / "g", GgufExport(types=["f32"]), tmp_path / "scratch")


def test_rope_permutation_interleaves_the_halves_of_each_head():
    w = torch.arange(8).float().reshape(8, 1)  # 2 heads of 4 rows: (0 1 | 2 3), (4 5 | 6 7)
    assert gguf_export.permute_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_compress_export_on_a_finished_run(tmp_path, wide_folder, monkeypatch):
    path = recipe(tmp_path, wide_folder, "[{kind: prune, method: wanda, sparsity: 0.6}]", "{hf: true}")
    out = engine.run(load_recipe(path), path).output_dir
    before = json.loads((out / "results.json").read_text())
    info = export_run(out, "hf", [], "sparse")
    assert info["weights"]["identical"] and info["parity"]["identical"]
    info = export_run(out, "gguf", ["f32"])
    assert info["files"]["f32"]["zeros_kept"] == 1.0 and info["weights"]["f32"]["identical"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["export"]) == {"hf", "hf-sparse", "gguf"} and results["perplexity"] == before["perplexity"]
    assert (out / "hf-sparse" / sparse.WEIGHTS_FILE).is_file() and (out / "gguf" / "model-f32.gguf").is_file()
    assert "## Export: gguf" in (out / "report.md").read_text()
    with pytest.raises(CompressError, match="already exists; pass --overwrite"):
        export_run(out, "gguf", ["f32"])
    with pytest.raises(CompressError, match="--type: "):
        export_run(out, "gguf", ["q5_1"], overwrite=True)
    assert not list(out.glob(".*partial*")) and not list(out.glob(".scratch-*"))


def test_compress_export_of_a_gptq_run_keeps_the_grid(tmp_path, tokenizer):
    folder = tmp_path / "wide"
    wide_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = recipe(tmp_path, folder, "[{kind: quantize, method: gptq, bits: 4, group_size: 32, act_order: false}]", "{hf: true, check: false}")
    out = engine.run(load_recipe(path), path).output_dir
    info = export_run(out, "gguf", ["q4_0"], check=False)
    assert info["files"]["q4_0"]["how"].startswith("GPTQ grid written block for block")
    stored = gguf_weights(out / "gguf" / "model-q4_0.gguf")
    from compress.export.gptq import read_dequantized

    down = read_dequantized(out)["model.layers.1.mlp.down_proj"]
    assert np.array_equal(stored["blk.1.ffn_down.weight"][1].reshape(down.shape), down.numpy())
