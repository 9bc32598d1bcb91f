"""llama.cpp's named file types as per-matrix plans (compress/algorithms/ggml_mixes.py): every plan is
checked against the types llama.cpp's own quantizer writes, and `quantize: {grid: q4_k_m}` gives a
GGUF file with llama.cpp's exact tensor types and bytes, every block matrix ours."""

import importlib.util

import pytest
import torch
from conftest import model_from_config, needs_converter
from pydantic import ValidationError

from compress.algorithms.ggml_mixes import (
    MIXES,
    ModelFacts,
    chosen_type,
    layer_format,
    use_more_bits,
)

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")


def test_use_more_bits_is_the_first_and_last_eighth_and_every_third_between():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_a_mix_widens_v_output_and_down_where_llama_cpp_does():
    facts = ModelFacts(n_layers=30, n_gqa=3)
    assert chosen_type("q4_k_m", "attn_v", 0, facts) == "q6_k" and chosen_type("q4_k_m", "attn_v", 3, facts) == "q4_k"
    assert chosen_type("q4_k_m", "ffn_down", 29, facts) == "q6_k" and chosen_type("q4_k_m", "attn_q", 0, facts) == "q4_k"
    assert chosen_type("q3_k_m", "attn_output", 7, facts) == "q4_k" and chosen_type("q3_k_m", "ffn_down", 0, facts) == "q5_k" and chosen_type("q3_k_m", "ffn_down", 1, facts) == "q4_k"
    assert chosen_type("q2_k", "attn_v", 5, facts) == "q3_k" and chosen_type("q2_k", "attn_v", 5, ModelFacts(30, 4)) == "q4_k"
    # SmolLM2's 576-wide rows are not whole 256-blocks: llama.cpp's fallbacks
    assert layer_format("q4_k_m", "model.layers.0.self_attn.v_proj", 0, 576, facts).name == "q8_0"
    assert layer_format("q2_k", "model.layers.4.self_attn.q_proj", 4, 576, facts).name == "q4_0"
    assert layer_format("q4_k_m", "model.layers.4.mlp.down_proj", 4, 1536, facts).name == "q4_k"


def test_quantize_config_takes_mixes_and_refuses_what_does_not_fit_them():
    from compress.stages.quantize import QuantizeConfig

    assert QuantizeConfig(grid="q4_k_m").mix == "q4_k_m" and QuantizeConfig(grid="q4_k").mix is None
    assert QuantizeConfig(grid="q2_k").mix == "q2_k" and QuantizeConfig(grid="q2_k", pure=True).mix is None
    with pytest.raises(ValidationError, match="an allocation by block chooses among block formats: give grid q4_k"):
        QuantizeConfig(grid="q4_k_m", allocation={"kind": "atp", "beta": "auto"})
    with pytest.raises(ValidationError, match="pure applies to grid q2_k"):
        QuantizeConfig(grid="q4_k", pure=True)


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory, spm_tokenizer):
    """Two Llamas in F32 GGUF: 16 blocks with one KV head for four (GQA 4), 9 blocks with GQA 2;
    the MLP's 320 columns are not whole 256-blocks (its down projection takes the fallbacks)."""
    from compress.export import gguf as gguf_export

    out = {}
    for kv_heads, layers in ((1, 16), (2, 9)):
        model = model_from_config("llama", vocab_size=len(spm_tokenizer), hidden_size=256, intermediate_size=320,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads)
        tmp = tmp_path_factory.mktemp(f"mix-{kv_heads}-{layers}")
        info = gguf_export.save(model, spm_tokenizer, tmp / "g", gguf_export.GgufExport(types=["f32"]), tmp / "scratch")
        out[(kv_heads, layers)] = (model, tmp / "g" / info["files"]["f32"]["file"], tmp)
    return out


@needs_converter
@needs_llama_cpp
@pytest.mark.parametrize("shape", [(1, 16), (2, 9)], ids=["gqa4-16blocks", "gqa2-9blocks"])
def test_every_mix_plan_is_the_type_llama_cpp_s_quantizer_writes(f32_files, shape):
    from compress.export import gguf as gguf_export
    from compress.model.anatomy import select_linears
    from compress.model.gguf_file import GgufIndex
    from compress.stages.quantize import QuantizeConfig, layer_targets, mix_facts

    model, f32, tmp = f32_files[shape]
    layers, _ = select_linears(model, [".*"], [], "stages[0]")
    names = gguf_export.name_map("llama", len(layers))
    facts = mix_facts(model, layers)
    for mix in MIXES:
        out = tmp / f"{mix}.gguf"
        gguf_export.llama_quantize(f32, out, mix, 2, tmp / "llama.cpp.log")
        written = GgufIndex(out).types()
        targets = layer_targets(QuantizeConfig(grid=mix), layers, [mix] * len(layers), facts)
        for i, block in enumerate(layers):
            for name, module in block.items():
                fmt = ggml_formats_fitting(targets[name], module.in_features)
                assert written[names.get_name(name + ".weight", try_suffixes=(".weight",))] == fmt, (mix, name)
        out.unlink()


def ggml_formats_fitting(target: str, cols: int) -> str:
    from compress.algorithms.ggml_formats import fitting

    fmt = fitting(target, cols)
    return "F16" if fmt is None else fmt.qtype.name


@needs_converter
@needs_llama_cpp
def test_a_q4_k_m_grid_file_is_llama_cpp_s_q4_k_m_byte_for_byte_in_size_with_every_block_matrix_ours(tmp_path, spm_tokenizer):
    """GPTQ onto the Q4_K_M mix: `types: [grid, q4_k_m]` are the same file type as llama.cpp's
    Q4_K_M of the same model (same tensor types, same bytes), and no block matrix is requantised."""
    from compress.data.windows import SegmentsConfig, build_segments
    from compress.export import gguf as gguf_export
    from compress.model.gguf_file import GgufIndex
    from compress.stages.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = model_from_config("llama", vocab_size=len(spm_tokenizer), hidden_size=256, intermediate_size=320, num_hidden_layers=8,
                              num_attention_heads=4, num_key_value_heads=1)
    plain = gguf_export.save(model, spm_tokenizer, tmp_path / "plain", gguf_export.GgufExport(types=["q4_k_m"]), tmp_path / "s1")
    segments = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, spm_tokenizer)
    model, record = apply(model, StageContext(segments["calibration"], None, torch.float32, scratch_dir=tmp_path / "s"), QuantizeConfig(grid="q4_k_m"))
    assert record.format == "q4_k_m mix group-aware order" and record.block_grids == ["q4_k_m"] * 8
    assert record.layer_grids["model.layers.0.self_attn.v_proj"] == "q6_k" and record.layer_grids["model.layers.2.self_attn.v_proj"] == "q4_k"
    assert record.layer_grids["model.layers.0.mlp.down_proj"] == "q8_0"  # q6_k asked, 320 columns: llama.cpp's fallback
    assert record.block_bits[0] > record.block_bits[2]  # the first eighth is wider
    cfg = gguf_export.GgufExport(types=["grid", "q4_k_m"])
    info = gguf_export.save(model, spm_tokenizer, tmp_path / "g", cfg, tmp_path / "s2")
    info.update(gguf_export.verify(model, tmp_path / "g", info, cfg))
    theirs = tmp_path / "plain" / plain["files"]["q4_k_m"]["file"]
    for kind in ("grid", "q4_k_m"):
        entry, ours = info["files"][kind], tmp_path / "g" / info["files"][kind]["file"]
        assert entry["grid_matrices"] == 7 * 8 and info["weights"][kind] == {"tensors": 56, "identical": True}
        assert GgufIndex(ours).types() == GgufIndex(theirs).types()
        assert ours.stat().st_size == theirs.stat().st_size
    assert not any("requantised by llama.cpp" in n for n in info["notes"])
