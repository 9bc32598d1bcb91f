"""Restructured models (compress/model/layout.py) through the GGUF and ONNX exporters: blocks that kept
different numbers of KV groups and MLP channels, o_proj / down_proj biases the config does not
have (FLAP bias compensation), and LowRankLinear factors; logits checked in llama.cpp and ONNX
Runtime against the torch model, refusals asserted."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from compress.data.windows import SegmentsConfig, build_segments
from compress.errors import CompressError
from compress.export import gguf as gguf_export
from compress.export.gguf import GgufExport
from compress.export.gguf import arch as gguf_arch
from compress.export.reference import take_reference
from compress.model.anatomy import head_dim
from compress.model.gguf_file import GgufIndex, permute_rows
from compress.model.modules import LowRankLinear

from conftest import has_converter, model_from_config, tiny_model

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'atp-compress[gguf]'; .ci/run installs it)",
)
VOCAB = 32000  # Llama 2's real tokenizer (the spm_tokenizer fixture): the converter knows it
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnxscript")),
    reason="onnxruntime / onnxscript are not installed (pip install 'atp-compress[onnx]')",
)

# Block i keeps KV groups GROUPS[i] (with the query heads that read them) and the given share of
# its MLP channels; block 1 gets o_proj / down_proj biases. 4 query heads, 2 KV heads per block.
GROUPS = [[0, 1], [1], [0]]


# ---------------------------------------------------------------- building restructured models


def sliced(old: nn.Linear, rows=None, cols=None, bias: bool = False) -> nn.Linear:
    """old restricted to rows / cols; bias=True adds a random bias where old had none."""
    W = old.weight.data
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias or old.bias is not None)
    new.weight.data = W.clone()
    if old.bias is not None:
        new.bias.data = (old.bias.data if rows is None else old.bias.data[rows]).clone()
    elif bias:
        new.bias.data = 0.1 * torch.randn(W.shape[0])
    return new


def remove_units(model, groups: list[list[int]], channels: list[int], biased: tuple[int, ...] = ()) -> None:
    """What the structured stage leaves: block i keeps KV groups groups[i] (k/v rows, the q rows of
    their query heads, o columns) and channels[i] MLP channels (gate/up rows, down columns)."""
    c = model.config
    size = head_dim(c)
    rep = c.num_attention_heads // c.num_key_value_heads
    generator = torch.Generator().manual_seed(0)
    for i, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        kv_rows = torch.cat([torch.arange(g * size, (g + 1) * size) for g in groups[i]])
        q_rows = torch.cat([torch.arange(g * rep * size, (g + 1) * rep * size) for g in groups[i]])
        attn.q_proj, attn.k_proj, attn.v_proj = sliced(attn.q_proj, q_rows), sliced(attn.k_proj, kv_rows), sliced(attn.v_proj, kv_rows)
        attn.o_proj = sliced(attn.o_proj, cols=q_rows, bias=i in biased)
        keep = torch.randperm(mlp.gate_proj.out_features, generator=generator)[: channels[i]].sort().values
        mlp.gate_proj, mlp.up_proj = sliced(mlp.gate_proj, keep), sliced(mlp.up_proj, keep)
        mlp.down_proj = sliced(mlp.down_proj, cols=keep, bias=i in biased)


def to_lowrank(model, name: str, rank: int, residual: bool = True) -> None:
    """name as a rank-`rank` SVD (U S, V) plus, when asked, the largest 10% of what it misses."""
    old = model.get_submodule(name)
    U, S, Vh = torch.linalg.svd(old.weight.data.float(), full_matrices=False)
    low = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None, residual=residual)
    low.down.weight.data = Vh[:rank].contiguous()
    low.up.weight.data = (U[:, :rank] * S[:rank]).contiguous()
    if old.bias is not None:
        low.up.bias.data = old.bias.data.clone()
    if residual:
        R = old.weight.data - low.up.weight.data @ low.down.weight.data
        R[R.abs() < R.abs().flatten().kthvalue(int(0.9 * R.numel())).values] = 0
        low.residual.weight.data = R
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, low)


def restructured(arch: str = "llama", hidden: int = 32, channels: tuple[int, ...] | None = None, lowrank: bool = True):
    """3 blocks (4 heads of hidden/4, 2 KV heads, 2*hidden MLP channels) restructured per block:
    heads 4/2/2, KV heads 2/1/1, MLP channels `channels`, biases in block 1, block 0's q_proj low-rank."""
    model = model_from_config(arch, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2)
    remove_units(model, GROUPS, list(channels or (2 * hidden, 40, 24)), biased=(1,))
    if lowrank:
        to_lowrank(model, "model.layers.0.self_attn.q_proj", hidden // 8)
    return model.eval()


# ---------------------------------------------------------------- GGUF


@pytest.fixture
def gguf_tokenizer(spm_tokenizer):
    return spm_tokenizer


def reference(model, tokenizer):
    windows = build_segments({"evaluation": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["evaluation"].tokens
    return take_reference(model, windows[:2], tokenizer, windows)


def export_gguf(tmp_path, model, tokenizer, types, check=True):
    if not has_converter():
        pytest.skip("llama.cpp's converter is not installed: compress install-converter")
    cfg = GgufExport(types=types)
    info = gguf_export.save(model, tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    info.update(gguf_export.verify(model, tmp_path / "g", info, cfg))
    if check:
        info.update(gguf_export.check(tmp_path / "g", info, reference(model, tokenizer), cfg))
    return info


def gguf_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.")}



@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_per_block_widths_are_written_as_deci_and_match_in_llama_cpp(tmp_path, gguf_tokenizer, arch):
    model = restructured(arch)
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["f32", "f16"])
    assert info["arch"] == "deci"
    assert any("architecture 'deci'" in n and "heads [4, 2, 2], KV heads [2, 1, 1], FFN [64, 40, 24]" in n for n in info["notes"])
    assert any("1 low-rank modules written as their dense product" in n for n in info["notes"])
    fields = gguf_fields(tmp_path / "g" / "model-f32.gguf")
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 2, 2] and fields["deci.attention.head_count_kv"] == [2, 1, 1]
    assert fields["deci.feed_forward_length"] == [64, 40, 24]
    assert info["weights"]["f32"]["identical"]
    f32, f16 = info["files_checked"]["f32"], info["files_checked"]["f16"]
    assert f32["tokenization_equal"] and f32["relative"] < 1e-3 and f32["top1_agreement"] == 1.0, f32
    assert f32["perplexity"] == pytest.approx(f32["reference_perplexity"], rel=1e-3)
    assert f16["relative"] < 2e-2


@needs_llama_cpp
def test_llama_cpp_llama_graph_reads_the_arrays_but_builds_block_0_widths(tmp_path, gguf_tokenizer, monkeypatch):
    """Why deci: llama.cpp's llama graph sizes every block's tensors with block 0's head count
    (src/models/llama.cpp, LLAMA_LOAD_LOCALS), so the file does not load."""
    from dataclasses import replace

    model = restructured("llama", lowrank=False)
    plan = gguf_arch.plan
    monkeypatch.setattr(gguf_arch, "plan", lambda m, family: replace(plan(m, family), deci=False))
    with pytest.raises(CompressError, match="llama.cpp cannot load model-f32.gguf"):
        export_gguf(tmp_path, model, gguf_tokenizer, ["f32"])


@needs_llama_cpp
def test_uniform_narrowing_and_biases_stay_llama(tmp_path, gguf_tokenizer):
    """Every block with the same (narrower) widths: llama.cpp's llama graph carries it, biases too."""
    model = model_from_config("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    remove_units(model, [[1], [0]], [40, 40], biased=(0, 1))
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["f32"])
    assert info["arch"] == "llama" and info["notes"] == []
    fields = gguf_fields(tmp_path / "g" / "model-f32.gguf")
    assert fields["llama.attention.head_count"] == 2 and fields["llama.attention.head_count_kv"] == 1
    assert fields["llama.feed_forward_length"] == 40
    f32 = info["files_checked"]["f32"]
    assert f32["relative"] < 1e-3 and f32["top1_agreement"] == 1.0, f32


@needs_llama_cpp
def test_qwen2_with_compensation_biases_only_is_written_as_deci(tmp_path, gguf_tokenizer):
    """The config's widths, but o_proj / down_proj biases: llama.cpp's qwen2 graph has no slot for them."""
    model = model_from_config("qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    remove_units(model, [[0, 1], [0, 1]], [64, 64], biased=(1,))
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["f32"])
    assert info["arch"] == "deci"
    assert any("qwen2 graph loads no o_proj/down_proj bias" in n for n in info["notes"])
    assert info["files_checked"]["f32"]["relative"] < 1e-3


@needs_llama_cpp
def test_llama_q_k_biases_are_permuted_with_their_rows(tmp_path, gguf_tokenizer):
    model = model_from_config("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_()
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["f32"])
    assert info["arch"] == "llama" and info["files_checked"]["f32"]["relative"] < 1e-3


@needs_llama_cpp
def test_quantised_types_on_narrow_rows_fall_back_and_still_match(tmp_path, gguf_tokenizer):
    """Rows of 320 (not whole 256-blocks) and 200 (not whole 32-blocks): llama.cpp's quantizer
    falls back per matrix (Q5_0 / Q8_0, F16 for 200), and the files still agree with the model."""
    model = restructured("llama", hidden=256, channels=(512, 320, 200))
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["q8_0", "q4_k_m", "q4_0"])
    files = info["files"]
    assert files["q8_0"]["fallbacks"] == {"F16": 1} and files["q4_0"]["fallbacks"] == {"F16": 1}
    assert files["q4_k_m"]["tensor_types"]["Q4_K"] > 0 and files["q4_k_m"]["fallbacks"]["F16"] == 1
    assert any(n.startswith("q8_0: 1 block matrices are not Q8_0") and "not divisible by 32" in n for n in info["notes"])
    assert any(n.startswith("q4_k_m:") and "rows divisible by 256" in n for n in info["notes"])
    for kind, c in info["files_checked"].items():  # check() enforces the floors; these are the numbers
        assert c["tokenization_equal"] and c["top1_agreement"] >= gguf_export.TOP1_AGREEMENT[kind], (kind, c)
    assert info["files_checked"]["q8_0"]["perplexity"] == pytest.approx(info["files_checked"]["q8_0"]["reference_perplexity"], rel=0.01)


@needs_llama_cpp
def test_gptq_grid_on_narrow_rows_goes_in_block_for_block_except_partial_rows(tmp_path, gguf_tokenizer):
    from compress.stages.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = restructured("llama", hidden=256, channels=(512, 320, 200), lowrank=False)
    calibration = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, gguf_tokenizer)["calibration"]
    cfg = QuantizeConfig(kind="quantize", method="gptq", bits=4, group_size=32, act_order=False)
    model, _ = apply(model, StageContext(calibration, None, torch.float32, scratch_dir=tmp_path / "s"), cfg)
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["q4_0"])
    entry = info["files"]["q4_0"]
    assert entry["how"] == gguf_export.GRID_WRITTEN and entry["grid_matrices"] == 20
    # 200 columns: no whole Q4_0 blocks, so no grid there either: llama.cpp keeps it F16
    assert GgufIndex(tmp_path / "g" / entry["file"]).types()["blk.2.ffn_down.weight"] == "F16"
    assert info["weights"]["q4_0"] == {"tensors": 20, "identical": True}
    c = info["files_checked"]["q4_0"]
    assert c["perplexity"] == pytest.approx(c["reference_perplexity"], rel=0.02)


def test_blocks_llama_cpp_cannot_build_are_refused(tmp_path, gguf_tokenizer):
    model = restructured("llama", lowrank=False)
    assert gguf_arch.block_widths(model)[1] == gguf_arch.Widths(2, 1, 40)
    attn = model.model.layers[1].self_attn
    attn.v_proj = sliced(attn.v_proj, torch.arange(4))  # half a head
    with pytest.raises(CompressError, match=r"^export.gguf: block 1 has projections llama.cpp cannot build \(head_dim 8: q 16, k 8, v 4"):
        export_gguf(tmp_path, model, gguf_tokenizer, ["f32"], check=False)


def test_lowrank_modules_go_in_as_their_dense_product(tmp_path, gguf_tokenizer):
    model = restructured("llama")
    low = model.model.layers[0].self_attn.q_proj
    info = export_gguf(tmp_path, model, gguf_tokenizer, ["f32"], check=False)
    stored = GgufIndex(tmp_path / "g" / "model-f32.gguf")
    expected = permute_rows(low.dense_weight().detach(), 4)
    assert np.array_equal(stored.values("blk.0.attn_q.weight"), expected.numpy())
    assert not any(".down." in n or ".up." in n for n in stored.tensors)
    assert info["weights"]["f32"]["identical"]


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_exported(tmp_path_factory, tokenizer):
    """A 2-block tiny llama: block 0 with all heads and a low-rank q_proj (sparse residual), block 1
    with one KV group, 40 of 64 MLP channels and compensation biases. Exported once."""
    from compress.export import onnx as onnx_export

    model = tiny_model("llama", 2)
    remove_units(model, GROUPS[:2], [64, 40], biased=(1,))
    to_lowrank(model, "model.layers.0.self_attn.q_proj", 4)
    folder = tmp_path_factory.mktemp("onnx-restructured")
    info = onnx_export.save(model, tokenizer, folder, onnx_export.OnnxExport(), folder / "scratch")
    return model, folder, info


def probe(seed: int, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@needs_onnx
def test_onnx_restructured_model_matches_and_its_cache_is_per_layer(onnx_exported, tokenizer):
    from compress.export import onnx as onnx_export

    model, folder, info = onnx_exported
    assert info["cache"] == {"kv_heads": [2, 1], "head_dim": [8, 8]}
    assert any("1 low-rank Linears exported as their factors" in n for n in info["notes"])
    assert any("sparse residual, stored as a dense matrix" in n for n in info["notes"])
    decode = onnx_export.session(folder / "decode.onnx")
    shapes = {i.name: i.shape for i in decode.get_inputs()}
    assert shapes["past_key_values.0.key"][1:] == [2, "past_sequence", 8]
    assert shapes["past_key_values.1.value"][1:] == [1, "past_sequence", 8]

    ref = take_reference(model, probe(1), tokenizer, evaluation=probe(2, batch=3, length=16))
    result = onnx_export.check(folder, info, ref, onnx_export.OnnxExport())
    assert result["parity"]["relative"] < 1e-5 and result["greedy"]["equal"]
    assert result["perplexity"]["relative_difference"] < 1e-5
    assert onnx_export.verify(model, folder, info, onnx_export.OnnxExport())["weights"]["identical"]


@needs_onnx
def test_onnx_decode_with_per_layer_past_continues_the_prefill(onnx_exported):
    """Prefill a left-padded batch, decode the rest with its per-layer past: the full sequence's logits."""
    from compress.export import onnx as onnx_export

    model, folder, _ = onnx_exported
    ids = probe(4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=onnx_export.positions(mask, ids.shape[1]), use_cache=False).logits
    prefill = onnx_export.session(folder / "prefill.onnx")
    decode = onnx_export.session(folder / "decode.onnx")
    for past_length in (ids.shape[1] - 1, 7):
        past = onnx_export.run(prefill, ids[:, :past_length], mask[:, :past_length])[1:]
        assert [p.shape[1] for p in past] == [2, 2, 1, 1]
        logits, *present = onnx_export.run(decode, ids[:, past_length:], mask, past=past)
        real = mask[:, past_length:].bool()
        got, expected = torch.from_numpy(logits[real.numpy()]), full[:, past_length:][real]
        assert float((got - expected).abs().max() / expected.abs().max()) < onnx_export.RELATIVE_TOLERANCE
        assert [p.shape[1:3] for p in present[::2]] == [(2, ids.shape[1]), (1, ids.shape[1])]
