"""GGUF files loaded in llama.cpp itself (llama-cpp-python, the `gguf` extra): tokenization,
logits and perplexity against the in-memory model, llama.cpp's own quantizer, GPTQ grids as Q4_0."""

import importlib.util

import pytest
import torch
from tokenizers import pre_tokenizers

from compress.data import SegmentsConfig, build_segments
from compress.errors import CompressError
from compress.export import gguf as gguf_export
from compress.export.gguf import GgufExport
from compress.export.reference import take_reference
from conftest import build_tokenizer, model_from_config, needs_default_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'atp-compress[gguf]'; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(512)


def model_for(arch, seed=0, sparsity=0.0):
    """Rows of 256 so that the K-quants apply; half the block weights zero when asked."""
    model = model_from_config(arch, seed, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    if sparsity:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and ".layers." in name:
                    p[p.abs() < p.abs().flatten().kthvalue(int(sparsity * p.numel())).values] = 0
    return model


def reference(model, tokenizer):
    windows = build_segments({"evaluation": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["evaluation"].tokens
    return take_reference(model, windows[:2], tokenizer, windows)


def export_and_check(tmp_path, model, tokenizer, types):
    cfg = GgufExport(types=types)
    info = gguf_export.save(model, tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    info.update(gguf_export.verify(model, tmp_path / "g", info, cfg))
    info.update(gguf_export.check(tmp_path / "g", info, reference(model, tokenizer), cfg))
    return info


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f32_and_f16_match_the_model_in_llama_cpp(tmp_path, tokenizer, arch):
    info = export_and_check(tmp_path, model_for(arch), tokenizer, ["f32", "f16"])
    f32, f16 = info["files_checked"]["f32"], info["files_checked"]["f16"]
    assert f32["tokenization_equal"] and f16["tokenization_equal"]
    assert f32["relative"] < 1e-3 and f32["top1_agreement"] == 1.0, f32
    assert f32["perplexity"] == pytest.approx(f32["reference_perplexity"], rel=1e-3)
    assert f16["relative"] < 2e-2 and f16["perplexity"] == pytest.approx(f16["reference_perplexity"], rel=1e-2)


def test_llama_cpp_quantizer_types_report_fallbacks_and_kept_zeros(tmp_path, tokenizer):
    model = model_for("llama", sparsity=0.5)
    info = export_and_check(tmp_path, model, tokenizer, ["q8_0", "q6_k", "q4_k_m", "q4_0"])
    files, checked = info["files"], info["files_checked"]
    assert files["q8_0"]["tensor_types"]["Q8_0"] >= 14 and files["q4_0"]["tensor_types"]["Q4_0"] >= 14
    assert files["q4_k_m"]["tensor_types"].get("Q4_K", 0) > 0
    # a zero lands on zero in the symmetric block types; K-quants subtract a block minimum
    assert files["q8_0"]["zeros_kept"] == 1.0 and files["q4_0"]["zeros_kept"] == 1.0
    assert files["q4_k_m"]["zeros_kept"] < 0.5
    for kind, c in checked.items():
        assert c["tokenization_equal"] and c["top1_agreement"] >= gguf_export.TOP1_AGREEMENT[kind], (kind, c)
    ppl = {k: c["perplexity"] / c["reference_perplexity"] for k, c in checked.items()}
    assert ppl["q8_0"] == pytest.approx(1.0, abs=0.01) and ppl["q4_0"] > ppl["q8_0"] - 0.005


def test_k_quants_on_rows_not_divisible_by_256_say_what_they_fell_back_to(tmp_path, tokenizer):
    model = model_from_config("llama", vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=3, num_key_value_heads=1)
    info = export_and_check(tmp_path, model, tokenizer, ["q4_k_m"])
    assert info["files"]["q4_k_m"]["fallbacks"] and any("rows divisible by 256" in n for n in info["notes"])


def test_gptq_grid_written_as_q4_0_runs_in_llama_cpp_without_requantising(tmp_path, tokenizer):
    from compress.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = model_for("llama")
    calibration = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["calibration"]
    cfg = QuantizeConfig(kind="quantize", method="gptq", bits=4, group_size=32, act_order=False)
    model, _ = apply(model, StageContext(calibration, None, torch.float32, scratch_dir=tmp_path / "s"), cfg)
    info = export_and_check(tmp_path, model, tokenizer, ["q4_0"])
    assert info["files"]["q4_0"]["how"].startswith("GPTQ grid") and info["weights"]["q4_0"]["identical"]
    c = info["files_checked"]["q4_0"]
    # the weights are the model's own: only llama.cpp's 8-bit activations differ
    assert c["top1_agreement"] >= 0.95 and c["perplexity"] == pytest.approx(c["reference_perplexity"], rel=0.02)


def test_a_gptq_grid_that_is_not_q4_0_is_requantised_by_llama_cpp_and_says_so(tmp_path, tokenizer):
    """Groups of 128 are not Q4_0's 32-value blocks: the q4_0 file comes from llama.cpp's quantizer
    (it used to be written as mostly Q8_0 under the q4_0 name, and failed its own check)."""
    from compress.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = model_for("llama")
    calibration = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["calibration"]
    cfg = QuantizeConfig(kind="quantize", method="gptq", bits=4, group_size=128, act_order=False)
    model, _ = apply(model, StageContext(calibration, None, torch.float32, scratch_dir=tmp_path / "s"), cfg)
    info = export_and_check(tmp_path, model, tokenizer, ["q4_0"])
    entry = info["files"]["q4_0"]
    assert entry["how"] == "llama.cpp quantize from F32" and entry["tensor_types"].get("Q4_0", 0) >= 14  # 7 matrices x 2 blocks
    assert any("dequantised and requantised by llama.cpp" in n for n in info["notes"])


def test_digit_splitting_tokenizer_is_written_as_smollm(tmp_path):
    tokenizer = build_tokenizer(512)
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    info = export_and_check(tmp_path, model_for("llama"), tokenizer, ["f32"])
    assert info["files_checked"]["f32"]["tokenization_equal"]


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused_or_caught(tmp_path, monkeypatch):
    tokenizer = build_tokenizer(512)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # "The" -> "ĠThe"
    with pytest.raises(CompressError, match="adds a prefix space"):
        export_and_check(tmp_path, model_for("llama"), tokenizer, ["f32"])
    # were the layout mapped wrongly, the tokenization check after loading catches it
    monkeypatch.setattr(gguf_export, "pre_tokenizer_name", lambda backend: "gpt-2")
    with pytest.raises(CompressError, match="gguf tokenization differs from the HF tokenizer's at token 0"):
        export_and_check(tmp_path / "again", model_for("llama"), tokenizer, ["f32"])


@pytest.mark.slow
@needs_default_model
def test_smollm2_gguf_matches_in_llama_cpp(tmp_path):
    from compress.model import load_model

    loaded = load_model("smollm2-135m")
    info = export_and_check(tmp_path, loaded.model, loaded.tokenizer, ["f16", "q8_0", "q4_k_m"])
    checked = info["files_checked"]
    assert all(c["tokenization_equal"] for c in checked.values())
    assert checked["f16"]["relative"] < 2e-2 and checked["q8_0"]["top1_agreement"] >= 0.93
    assert checked["q4_k_m"]["perplexity"] < 1.5 * checked["q4_k_m"]["reference_perplexity"]
    assert info["files"]["q4_k_m"]["fallbacks"]  # 576 columns: most matrices cannot be Q4_K


def test_compress_export_checks_on_the_windows_the_run_used(tmp_path, tokenizer):
    """`compress export` cuts the run's data again: with every role of the run (roles sharing a
    source split it), so its reference perplexity is the run's own on the same windows."""
    import textwrap

    from compress import engine
    from compress.export_run import export_run
    from compress.recipe import load_recipe

    folder = tmp_path / "model"
    model_for("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{source: {folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 64}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 64}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 64}}
        stages: [{{kind: prune, method: wanda, sparsity: 0.5}}]
        export: {{hf: {{format: sparse}}, gguf: {{types: [f32]}}}}
        output_dir: {tmp_path / "run"}
        """))
    run = engine.run(load_recipe(path), path).results["export"]["gguf"]["files_checked"]["f32"]
    again = export_run(tmp_path / "run", "gguf", ["f32"], overwrite=True)["files_checked"]["f32"]
    assert again["reference_perplexity"] == pytest.approx(run["reference_perplexity"], rel=1e-6)
    assert again["perplexity"] == pytest.approx(run["perplexity"], rel=1e-4)
