"""ONNX export: tiny models exported once per architecture (module fixture), then run in ONNX
Runtime against the torch model: logits, dynamic shapes with left padding, the KV-cache decode
graph, greedy generation, and tampering that the checks must catch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compress.algorithms.quant import Grid, rtn
from compress.errors import CompressError
from compress.export import onnx as onnx_export
from compress.export.reference import take_reference

from conftest import tiny_model

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'atp-compress[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'atp-compress[onnx]')")

ARCHS = ["llama", "qwen2", "gemma3_text"]
# Blocks per test model: gemma3_text needs two (a sliding and a full one); qwen2 differs from
# llama only inside the block, so one keeps the file fast (an export costs ~2.5 s per graph and block)
LAYERS = {"llama": 2, "qwen2": 1, "gemma3_text": 2}
LENGTH = 24  # longer than gemma3_text's sliding window (8): the window must be in the graph


def probe(seed: int = 1, batch: int = 2, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """arch -> (model, folder, info), each exported once for the whole module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = tiny_model(arch, LAYERS[arch])
            folder = tmp_path_factory.mktemp(f"onnx-{arch}")
            info = onnx_export.save(model, tokenizer, folder, onnx_export.OnnxExport(), folder / "scratch")
            cache[arch] = (model, folder, info)
        return cache[arch]

    return get


def torch_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits with the positions the graphs count (padding skipped)."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=onnx_export.positions(mask, ids.shape[1]), use_cache=False).logits


def relative_diff(got: np.ndarray, expected: torch.Tensor) -> float:
    return float((torch.from_numpy(got) - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_check(exported, tokenizer, arch):
    model, folder, info = exported(arch)
    assert info["format"] == "onnx" and info["exporter"] == "dynamo" and info["opset"] == 18
    assert info["graphs"] == {"prefill": "prefill.onnx", "decode": "decode.onnx"}
    assert {"prefill.onnx", "prefill.onnx.data", "decode.onnx", "config.json", "tokenizer.json"} <= set(info["files"])
    assert "decode.onnx.data" not in info["files"]  # decode reads the prefill graph's weights
    assert info["mb"] > 0

    ref = take_reference(model, probe(), tokenizer, evaluation=probe(seed=2, batch=3, length=16))
    result = onnx_export.check(folder, info, ref, onnx_export.OnnxExport())
    parity = result["parity"]
    scale = ref.logits.abs().max().item()
    assert parity["within_tolerance"] and 0 <= parity["max_abs_logit_diff"] < parity["tolerance"]
    assert parity["tolerance"] == pytest.approx(onnx_export.RELATIVE_TOLERANCE * scale)
    assert parity["relative"] == pytest.approx(parity["max_abs_logit_diff"] / scale)
    assert parity["relative"] < 1e-5  # measured ~1e-7: float32 summation order only
    assert result["greedy"]["equal"] and result["greedy"]["tokens"] == ref.greedy[0].tolist()
    assert result["greedy"]["graphs"] == "prefill + decode"
    assert result["tokenizer"]["equal"]
    ppl = result["perplexity"]
    assert ppl["windows"] == 3 and ppl["relative_difference"] < 1e-5
    assert onnx_export.verify(model, folder, info, onnx_export.OnnxExport())["weights"]["identical"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_bfloat16_model_is_held_to_the_float32_bound(tokenizer, tmp_path, arch):
    """Exported in float32 (exactly its weights), the graph is compared with the reference's float32
    forward of those weights at the float32 bound, greedy path required, not with torch's
    bfloat16 forward (whose own rounding is ~1e-2 of the largest logit here)."""
    model = tiny_model(arch, LAYERS[arch]).to(torch.bfloat16)
    info = onnx_export.save(model, tokenizer, tmp_path, onnx_export.OnnxExport(), tmp_path / "scratch")
    ref = take_reference(model, probe(), tokenizer, evaluation=probe(seed=2, batch=3, length=16))
    assert next(model.parameters()).dtype == torch.bfloat16  # the float32 pass leaves the model as it was
    assert (ref.logits - ref.float_logits).abs().max() > 1e-3 * ref.float_logits.abs().max()  # torch's bf16 rounding
    result = onnx_export.check(tmp_path, info, ref, onnx_export.OnnxExport())
    assert result["parity"]["relative"] < 1e-5 and result["parity"]["tolerance"] == pytest.approx(
        onnx_export.RELATIVE_TOLERANCE * ref.float_logits.abs().max().item())
    assert result["greedy"]["required"] and result["greedy"]["equal"]
    assert result["perplexity"]["relative_difference"] < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_batch_length_and_left_padding(exported, arch):
    """Batch 3 and length 19 (traced at 2 x 8), one row left-padded by 5: real positions match torch."""
    model, folder, info = exported(arch)
    ids = probe(seed=3, batch=3, length=19)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    sess = onnx_export.session(folder / "prefill.onnx")
    logits, *present = onnx_export.run(sess, ids, mask)
    expected = torch_logits(model, ids, mask)
    real = mask.bool()
    assert relative_diff(logits[real.numpy()], expected[real]) < onnx_export.RELATIVE_TOLERANCE
    assert len(present) == 2 * info["layers"] and present[0].shape[:3] == (3, 2, 19)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_continues_the_prefill(exported, arch):
    """Prefill the first tokens, decode the rest with that past: the logits equal the full
    sequence's, also for a past of 1 and a left-padded row (traced at past 5, 2 new tokens)."""
    model, folder, _ = exported(arch)
    ids = probe(seed=4, batch=2, length=LENGTH)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    full = torch_logits(model, ids, mask)
    prefill = onnx_export.session(folder / "prefill.onnx")
    decode = onnx_export.session(folder / "decode.onnx")
    for past_length in (LENGTH - 1, LENGTH - 3, 1):
        past = onnx_export.run(prefill, ids[:, :past_length], mask[:, :past_length])[1:]
        logits, *present = onnx_export.run(decode, ids[:, past_length:], mask, past=past)
        real = mask[:, past_length:].bool()  # padding's own outputs are never used
        assert relative_diff(logits[real.numpy()], full[:, past_length:][real]) < onnx_export.RELATIVE_TOLERANCE
        assert present[0].shape[2] == LENGTH


def test_check_catches_other_weights(exported, tokenizer):
    _, folder, info = exported("llama")
    other = tiny_model("llama", 2, seed=1)
    ref = take_reference(other, probe(), tokenizer)
    with pytest.raises(CompressError, match=r"^export check failed: onnx prefill logits differ"):
        onnx_export.check(folder, info, ref, onnx_export.OnnxExport())
    with pytest.raises(CompressError, match=r"^export check failed: onnx prefill.onnx does not hold the model's"):
        onnx_export.verify(other, folder, info, onnx_export.OnnxExport())


def test_check_catches_tampered_weights(exported, tokenizer, tmp_path):
    """Bytes changed in prefill.onnx.data (which decode.onnx reads too): both checks fail."""
    model, folder, info = exported("qwen2")
    ref = take_reference(model, probe(), tokenizer)
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    data = np.fromfile(copy / "prefill.onnx.data", dtype=np.float32)
    data[: data.size // 2] *= 1.5
    data.tofile(copy / "prefill.onnx.data")
    with pytest.raises(CompressError, match=r"^export check failed: onnx "):
        onnx_export.check(copy, info, ref, onnx_export.OnnxExport())
    with pytest.raises(CompressError, match=r"^export check failed: onnx "):
        onnx_export.verify(model, copy, info, onnx_export.OnnxExport())


def test_quantised_model_without_cache(tokenizer, tmp_path):
    """matmul_nbits off: a GPTQ-grid layer goes in densely; no decode graph; the model comes back as it was."""
    model = tiny_model("llama", 1)
    layer = model.model.layers[0].mlp.down_proj
    weight, state = rtn(layer.weight.data, Grid(bits=4, group_size=32))
    layer.weight.data.copy_(weight)
    layer.quant_state = state
    attention, before = model.config._attn_implementation, torch_logits(model, probe())
    model.train()
    cfg = onnx_export.OnnxExport(kv_cache=False, matmul_nbits=False)
    info = onnx_export.save(model, tokenizer, tmp_path, cfg, tmp_path / "scratch")

    assert model.config._attn_implementation == attention and model.training
    model.eval()
    assert torch.equal(torch_logits(model, probe()), before)
    assert any("quantised Linears exported densely" in note for note in info["notes"]) and info["matmul_nbits"] == {}
    assert info["graphs"] == {"prefill": "prefill.onnx"} and "decode.onnx" not in info["files"]
    assert onnx_export.verify(model, tmp_path, info, cfg)["weights"]["identical"]
    # without decode.onnx, greedy generation reruns the whole sequence through prefill
    result = onnx_export.check(tmp_path, info, take_reference(model, probe(), tokenizer), cfg)
    assert result["parity"]["within_tolerance"]
    assert result["greedy"]["equal"] and result["greedy"]["graphs"] == "prefill only"
    assert "perplexity" not in result


def on_grid(layer, weight, state) -> None:
    layer.weight.data.copy_(weight)
    layer.quant_state = state


def test_quantised_layers_run_as_matmul_nbits_exactly(tokenizer, tmp_path):
    """GPTQ / RTN grids of 2, 4 and 8 bits (symmetric or not, grouped or per channel) and the
    q4_0 / q8_0 block formats become MatMulNBits, whose codes and scales decode to the model's
    weights bit for bit; 3-bit codes and K-quants stay dense, named. ORT's logits and greedy
    path are the model's, through prefill and decode; the graphs hold the codes, not floats."""
    from compress.algorithms import ggml_formats
    from compress.export.onnx import nbits as onnx_nbits

    model = tiny_model("llama", 2)
    first, second = model.model.layers
    on_grid(first.mlp.down_proj, *rtn(first.mlp.down_proj.weight.data, Grid(bits=4, group_size=32)))
    on_grid(first.mlp.up_proj, *rtn(first.mlp.up_proj.weight.data, Grid(bits=8, group_size=16, sym=False)))
    on_grid(first.mlp.gate_proj, *rtn(first.mlp.gate_proj.weight.data, Grid(bits=2, group_size=-1, sym=False)))
    on_grid(second.self_attn.q_proj, *rtn(second.self_attn.q_proj.weight.data, Grid(bits=4, group_size=32, sym=False)))
    on_grid(second.mlp.up_proj, *rtn(second.mlp.up_proj.weight.data, Grid(bits=3, group_size=32)))
    for layer, fmt in ((second.mlp.gate_proj, "q4_0"), (second.mlp.down_proj, "q8_0"), (second.self_attn.o_proj, "q4_1")):
        on_grid(layer, *ggml_formats.rtn(layer.weight.data, ggml_formats.FORMATS[fmt]))
    cfg = onnx_export.OnnxExport()
    info = onnx_export.save(model, tokenizer, tmp_path, cfg, tmp_path / "scratch")

    assert info["matmul_nbits"] == {
        "model.layers.0.mlp.gate_proj": {"bits": 2, "block_size": 32},  # per channel: one padded block of 32 >= 32 columns
        "model.layers.0.mlp.up_proj": {"bits": 8, "block_size": 16},
        "model.layers.0.mlp.down_proj": {"bits": 4, "block_size": 32},
        "model.layers.1.self_attn.q_proj": {"bits": 4, "block_size": 32},
        "model.layers.1.mlp.gate_proj": {"bits": 4, "block_size": 32},
        "model.layers.1.mlp.down_proj": {"bits": 8, "block_size": 32},
    }
    notes = " ".join(info["notes"])
    assert "3-bit codes" in notes and "model.layers.1.mlp.up_proj" in notes and "q4_1 blocks have no exact MatMulNBits form" in notes
    assert onnx_export.verify(model, tmp_path, info, cfg)["weights"] == {"checked": True, "matrices": 16, "matmul_nbits": 6, "identical": True}
    result = onnx_export.check(tmp_path, info, take_reference(model, probe(), tokenizer), cfg)
    assert result["parity"]["relative"] < 1e-5 and result["greedy"]["equal"] and result["greedy"]["graphs"] == "prefill + decode"

    import onnx_ir

    graph = onnx_ir.load(str(tmp_path / "prefill.onnx")).graph
    ops = [node.op_type for node in graph]
    assert ops.count("MatMulNBits") == 6
    down = graph.initializers["model.layers.0.mlp.down_proj.qweight"].const_value.numpy()
    assert down.dtype == np.uint8 and down.shape == (32, 2, 16)  # 32 rows x 2 blocks x 32 codes of 4 bits
    dense = onnx_export.digest(first.mlp.down_proj.weight.detach().t().contiguous().numpy())
    assert dense not in {onnx_export.digest(v.const_value.numpy()) for v in graph.initializers.values()}  # no float copy left
    decode = onnx_ir.load(str(tmp_path / "decode.onnx")).graph
    assert [n.op_type for n in decode].count("MatMulNBits") == 6

    # a changed code is caught by verify (the model's weights are the reference)
    copy = tmp_path.parent / f"{tmp_path.name}-tampered"
    shutil.copytree(tmp_path, copy)
    model_copy = onnx_ir.load(str(copy / "prefill.onnx"))
    codes = model_copy.graph.initializers["model.layers.1.mlp.gate_proj.qweight"]
    tampered = codes.const_value.numpy().copy()
    tampered[0, 0, 0] ^= 0x01
    codes.const_value = onnx_ir.tensor(tampered, name=codes.name)
    onnx_ir.save(model_copy, str(copy / "prefill.onnx"), external_data="prefill.onnx.data")
    with pytest.raises(CompressError, match=r"does not hold the model's model.layers.1.mlp.gate_proj.weight bit for bit"):
        onnx_export.verify(model, copy, info, cfg)
    assert onnx_nbits.unpack_values(onnx_nbits.pack_values(np.arange(16, dtype=np.uint8).reshape(2, 8), 4), 4).tolist() == \
        np.arange(16).reshape(2, 8).tolist()


def test_refusals(tokenizer, tmp_path):
    with pytest.raises(ValidationError):
        onnx_export.OnnxExport(opset=13)
    with pytest.raises(ValidationError):
        onnx_export.OnnxExport(external_data=False)
    model = tiny_model("llama", 1)
    model.model.layers[0].mlp.up_proj.bnb_format = "nf4"
    with pytest.raises(CompressError, match="bitsandbytes layers have no ONNX form"):
        onnx_export.save(model, tokenizer, tmp_path, onnx_export.OnnxExport(), tmp_path / "scratch")


def test_check_without_onnxruntime(monkeypatch, tmp_path):
    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    result = onnx_export.check(tmp_path, {"graphs": {"prefill": "prefill.onnx"}}, None, onnx_export.OnnxExport())
    assert result == {"checked": False, "reason": "onnxruntime is not installed: pip install 'atp-compress[onnx]'"}
