"""GGUF files made by llama.cpp's own converter and quantizer, loaded in llama.cpp itself
(llama-cpp-python, the `gguf` extra): weights decoded exactly, tokenization, logits, greedy
continuation and perplexity against the in-memory model, GPTQ grids written as Q4_0 / Q8_0 blocks.
Models here are tiny Llamas with Llama 2's real tokenizer; tests/export/test_gguf_families.py runs every
family."""

import copy
import importlib.util
import json
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from compress.data.windows import SegmentsConfig, build_segments
from compress.errors import CompressError
from compress.export import gguf as gguf_export
from compress.export.gguf import GgufExport
from compress.export.gguf import convert as llama_convert
from compress.export.gguf import llama_check as gguf_check
from compress.export.gguf.llama_check import LOGIT_TOLERANCE
from compress.export.reference import take_reference
from compress.model.gguf_file import GgufIndex
from compress.run import engine
from compress.run.recipe import load_recipe
from compress.run.reexport import export_run

from conftest import build_tokenizer, model_from_config, needs_converter, needs_default_model

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'atp-compress[gguf]'; .ci/run installs it)",
)


def model_for(tokenizer, arch="llama", seed=0, sparsity=0.0, hidden=256):
    """Rows of 256 so that the K-quants apply; half the block weights zero when asked."""
    model = model_from_config(arch, seed, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if sparsity:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and ".layers." in name:
                    p[p.abs() < p.abs().flatten().kthvalue(int(sparsity * p.numel())).values] = 0
    return model


def gptq(model, tokenizer, tmp_path, bits=4, group_size=32):
    from compress.stages.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    calibration = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["calibration"]
    cfg = QuantizeConfig(kind="quantize", method="gptq", bits=bits, group_size=group_size, act_order=False)
    return apply(model, StageContext(calibration, None, torch.float32, scratch_dir=tmp_path / "s"), cfg)[0]


def reference(model, tokenizer):
    windows = build_segments({"evaluation": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["evaluation"].tokens
    return take_reference(model, windows[:2], tokenizer, windows)


def export_and_check(tmp_path, model, tokenizer, types, check=True):
    cfg = GgufExport(types=types)
    info = gguf_export.save(model, tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    info.update(gguf_export.verify(model, tmp_path / "g", info, cfg))
    if check:
        info.update(gguf_export.check(tmp_path / "g", info, reference(model, tokenizer), cfg))
    return info


# ---------------------------------------------------------------- pieces that need no converter


def test_gguf_index_reads_the_tensor_table_and_scalars_as_gguf_reader_does(tmp_path):
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_token_list([f"tok{i}" for i in range(1000)])
    writer.add_token_scores([float(-i) for i in range(1000)])
    writer.add_tokenizer_model("llama")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((32, 256)).astype(np.float32)
    writer.add_tensor("a", a)
    writer.add_tensor("b", gguf.quants.quantize(b, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c", gguf.quants.quantize(b, gguf.GGMLQuantizationType.F16), raw_dtype=gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    index, reader = GgufIndex(path), gguf.GGUFReader(str(path))
    assert index.arch == "llama" and index.fields["llama.block_count"] == 3 and index.fields["tokenizer.ggml.tokens"] == 1000
    assert index.fields["tokenizer.ggml.model"] == "llama"
    for t in reader.tensors:
        assert index.tensors[t.name].type == t.tensor_type
        expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(index.tensors[t.name].shape)
        assert np.array_equal(index.values(t.name), expected), t.name
    assert np.array_equal(index.values("a"), a)


def test_row_order_pairs_each_file_row_with_the_models():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert gguf_export.row_order(w, w).tolist() == [0, 1, 2, 3]
    perm = np.array([2, 0, 3, 1])
    assert gguf_export.row_order(w[perm], w).tolist() == perm.tolist()
    assert gguf_export.row_order(w[perm] + 1, w) is None
    assert gguf_export.row_order(w[:3], w) is None
    z = np.zeros((3, 2), dtype=np.float32)  # equal rows pair either way
    assert sorted(gguf_export.row_order(z, z).tolist()) == [0, 1, 2]
    # a zero code times a negative scale decodes to -0.0: equal to the model's 0.0 (SmolLM2's q4_0 rows)
    signed = w[perm].copy()
    signed[0, 0], w[2, 0] = -0.0, 0.0
    assert gguf_export.row_order(signed, w).tolist() == perm.tolist()


def test_rope_permutation_interleaves_the_halves_of_each_head():
    from compress.model.gguf_file import permute_rows, unpermute_rows

    w = torch.arange(8).float().reshape(8, 1)  # 2 heads of 4 rows: (0 1 | 2 3), (4 5 | 6 7)
    assert permute_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(unpermute_rows(permute_rows(w, 2), 2), w)


class FakeLlama:
    """What the checks ask of llama_cpp.Llama: a tokenizer, and logits whose top token after the
    prompt is next_tokens[0], then next_tokens[1], ..."""

    def __init__(self, ids=(), next_tokens=(), prompt_length=0):
        self.ids, self.next_tokens, self.prompt_length = list(ids), list(next_tokens), prompt_length
        self.n_tokens, self.scores = 0, []

    def tokenize(self, text, add_bos, special):
        return self.ids + ([9] if add_bos else [])

    def reset(self):
        self.n_tokens, self.scores = 0, []

    def eval(self, tokens):
        for _ in tokens:
            row, step = np.zeros(10, dtype=np.float32), self.n_tokens - self.prompt_length + 1
            if 0 <= step < len(self.next_tokens):
                row[self.next_tokens[step]] = 1.0
            self.scores.append(row)
            self.n_tokens += 1


def test_tokenization_check_names_the_first_token_that_differs():
    from compress.export.reference import Reference

    ref = Reference(None, None, None, None, None, None, sample_text="x", sample_ids=[1, 2, 3, 4], sample_ids_added=[1, 2, 3, 4, 9])
    assert gguf_check.check_tokenization(FakeLlama([1, 2, 3, 4]), ref)["tokenization_equal"]
    with pytest.raises(CompressError, match=r"tokenization of the sample text differs from the HF tokenizer's at token 2 \(llama.cpp \[1, 2, 7, 4\], HF \[1, 2, 3, 4\]\)"):
        gguf_check.check_tokenization(FakeLlama([1, 2, 7, 4]), ref)


class PieceLlama:
    """llama.cpp's SentencePiece rule: the text after a special token starts with a space again."""

    def __init__(self, metadata):
        self.metadata = metadata
        self.table = {b"a": [5], b"</s>": [2], b"b": [6], b"a</s>b": [5, 2, 7]}  # "▁b" after </s>, not "b"

    def tokenize(self, text, add_bos, special):
        return ([1] if add_bos else []) + self.table[text]


def test_tokenization_after_a_special_token_is_compared_piece_by_piece_for_sentencepiece_files():
    from compress.export.reference import Reference

    ref = Reference(None, None, None, None, None, None, sample_text="a</s>b", sample_ids=[5, 2, 6], sample_ids_added=[1, 5, 2, 6],
                    sample_pieces=[("a", [5]), ("</s>", [2]), ("b", [6])])
    out = gguf_check.check_tokenization(PieceLlama({"tokenizer.ggml.model": "llama"}), ref)
    assert out["tokenization_equal"] == "piece by piece" and out["first_difference_whole"] == 2
    with pytest.raises(CompressError, match=r"differs from the HF tokenizer's at token 2"):  # a byte-level BPE file has no such rule
        gguf_check.check_tokenization(PieceLlama({"tokenizer.ggml.model": "gpt2"}), ref)
    with pytest.raises(CompressError, match=r"gguf adds \(\[1\], \[\]\) .* the HF tokenizer \(\[\], \[\]\)"):
        gguf_check.check_tokenization(PieceLlama({"tokenizer.ggml.model": "llama"}), Reference(
            None, None, None, None, None, None, sample_text="a</s>b", sample_ids=[5, 2, 6], sample_ids_added=[5, 2, 6],
            sample_pieces=ref.sample_pieces))


def test_greedy_check_accepts_a_different_token_only_where_the_model_nearly_tied():
    from compress.export.reference import Reference

    ref = Reference(None, None, None, None, prompt=torch.tensor([[5, 6]]), greedy=torch.tensor([[1, 2, 3]]),
                    greedy_margins=torch.tensor([2.0, 0.001, 2.0]))
    assert gguf_check.check_greedy(FakeLlama(next_tokens=[1, 2, 3], prompt_length=2), ref, "f16", scale=10.0)["greedy_equal"]
    out = gguf_check.check_greedy(FakeLlama(next_tokens=[1, 4, 3], prompt_length=2), ref, "f16", scale=10.0)
    assert out["greedy_diverged_at"] == 1 and not out["greedy_equal"]  # 0.001 apart: f16 rounding may flip it
    wrong = FakeLlama(next_tokens=[4, 2, 3], prompt_length=2)
    with pytest.raises(CompressError, match="greedy continuation differs from the model's at token 0"):
        gguf_check.check_greedy(wrong, ref, "f16", scale=10.0)
    assert gguf_check.check_greedy(wrong, ref, "q4_0", scale=10.0)["greedy_diverged_at"] == 0  # lossy types: recorded only


def test_a_missing_converter_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv(llama_convert.ENV, str(tmp_path))
    with pytest.raises(CompressError, match=r"converter \(convert_hf_to_gguf.py\) is not in ATP_LLAMA_CPP=.*run `compress install-converter`"):
        llama_convert.converter_dir()


# ---------------------------------------------------------------- through the converter


@needs_converter
def test_a_tokenizer_the_converter_does_not_know_is_refused_before_compressing(tmp_path):
    """A BPE tokenizer trained here splits words in no way llama.cpp knows: the converter does not
    recognise its pre-tokenizer, and says so at preflight, before any compression."""
    tokenizer = build_tokenizer(512)
    model = model_for(tokenizer, hidden=32)
    with pytest.raises(CompressError, match="converter refused the model: .*BPE pre-tokenizer was not recognized"):
        gguf_export.preflight(model, tokenizer, GgufExport(types=["f32"]), tmp_path).result()


@needs_converter
@needs_llama_cpp
def test_a_bfloat16_model_goes_through_a_bf16_base_that_is_the_model_exactly(tmp_path, spm_tokenizer):
    """A model whose weights are all bfloat16 is converted to BF16, not F32 (lossless, half the
    disk of a 7B's base file); that file is verified matrix for matrix, and q4_0 is quantised from it."""
    model = model_for(spm_tokenizer, sparsity=0.5).to(torch.bfloat16)
    assert gguf_export.base_type(model) == "bf16"
    info = export_and_check(tmp_path / "dense", model, spm_tokenizer, ["bf16", "q4_0"])
    assert info["base"] == "bf16" and info["weights"]["bf16"] == {"tensors": 16, "identical": True}
    assert info["files"]["bf16"]["tensor_types"]["BF16"] == 16  # the norms stay F32, as llama.cpp keeps them
    assert info["files"]["q4_0"]["how"] == "llama.cpp quantize from BF16" and info["files"]["bf16"]["zeros_kept"] == 1.0
    assert info["files_checked"]["bf16"]["greedy_equal"] and info["files_checked"]["bf16"]["tokenization_equal"]
    # GPTQ on Q4_0's grid in a bfloat16 model: the weights are the grid values rounded to bfloat16,
    # the file holds the grid itself, and the two agree once rounded the same way
    model = gptq(model, spm_tokenizer, tmp_path)
    info = export_and_check(tmp_path / "gptq", model, spm_tokenizer, ["q4_0"], check=False)
    assert info["files"]["q4_0"]["how"] == gguf_export.GRID_WRITTEN and info["weights"]["q4_0"] == {"tensors": 14, "identical": True}


@needs_converter
@needs_llama_cpp
def test_a_bfloat16_low_rank_model_is_checked_against_the_float32_forward_of_its_weights(tmp_path, spm_tokenizer):
    """llama.cpp computes a BF16 file in float32; torch rounds every activation of a bfloat16 model
    (a low-rank layer's rank-r product too), so the GGUF check compares with the reference's
    float32 forward of the same weights: on a compressed SmolLM2 (structured -> ASVD -> GPTQ,
    bfloat16) torch's own forward was 4.64 from it, the file 0.62 (largest logit 39.5)."""
    from compress.model.modules import LowRankLinear

    model = model_for(spm_tokenizer)
    attn = model.model.layers[0].self_attn
    low = LowRankLinear(attn.q_proj.in_features, attn.q_proj.out_features, rank=16)
    attn.q_proj = low
    model = model.to(torch.bfloat16)
    ref = reference(model, spm_tokenizer)
    upcast = copy.deepcopy(model).float()
    with torch.no_grad():
        exact = upcast(ref.tokens, use_cache=False).logits
    assert torch.equal(ref.float_logits, exact) and next(model.parameters()).dtype == torch.bfloat16
    assert not torch.equal(ref.logits, ref.float_logits)  # torch's bfloat16 forward is not what llama.cpp computes
    info = export_and_check(tmp_path, model, spm_tokenizer, ["bf16"])
    checked = info["files_checked"]["bf16"]
    assert checked["relative"] < LOGIT_TOLERANCE["bf16"] and checked["max_abs_logit_diff"] == pytest.approx(
        float((torch.from_numpy(gguf_logits(tmp_path / "g" / "model-bf16.gguf", ref)) - ref.float_logits[0]).abs().max()), rel=1e-6)
    assert checked["perplexity"] == pytest.approx(checked["reference_perplexity"], rel=2e-2)


def gguf_logits(path, ref):
    from compress.export.gguf.llama_check import open_llama, window_logits

    llm = open_llama(path, ref.tokens.shape[1])
    try:
        return window_logits(llm, ref.tokens[0].tolist())
    finally:
        llm.close()


@needs_converter
@needs_llama_cpp
def test_f32_is_the_model_exactly_and_f16_keeps_the_zeros(tmp_path, spm_tokenizer):
    model = model_for(spm_tokenizer, sparsity=0.5)
    info = export_and_check(tmp_path, model, spm_tokenizer, ["f32", "f16"])
    assert info["arch"] == info["family"] == "llama"
    assert info["weights"]["f32"] == {"tensors": 16, "identical": True}  # 7 matrices x 2 blocks, embedding, head
    assert info["files"]["f32"]["zeros_kept"] == info["files"]["f16"]["zeros_kept"] == 1.0
    assert info["files"]["f16"]["mb"] < 0.55 * info["files"]["f32"]["mb"]
    f32, f16 = info["files_checked"]["f32"], info["files_checked"]["f16"]
    assert f32["tokenization_equal"] and f16["tokenization_equal"] and f32["sample_tokens"] > 100
    assert f32["relative"] < 1e-3 and f32["top1_agreement"] == 1.0 and f32["greedy_equal"], f32
    assert f32["perplexity"] == pytest.approx(f32["reference_perplexity"], rel=1e-3)
    assert f16["relative"] < 2e-2 and f16["perplexity"] == pytest.approx(f16["reference_perplexity"], rel=1e-2)
    fields = GgufIndex(tmp_path / "g" / "model-f16.gguf").fields
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True


@needs_converter
@needs_llama_cpp
def test_llama_cpp_quantizer_types_report_fallbacks_and_kept_zeros(tmp_path, spm_tokenizer):
    model = model_for(spm_tokenizer, sparsity=0.5)
    info = export_and_check(tmp_path, model, spm_tokenizer, ["q8_0", "q6_k", "q4_k_m", "q4_0"])
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


@needs_converter
@needs_llama_cpp
def test_the_check_reads_quantised_weights_from_the_file_not_from_llama_cpps_repacked_copy(tmp_path, spm_tokenizer):
    """Repacking (llama.cpp's default) copies a q4_0 file's weights for the AVX-512 kernels, which
    doubled a 7B's memory in the check; without it the logits are the same up to summation order."""
    import llama_cpp.llama_cpp as bindings

    model = model_for(spm_tokenizer)
    info = export_and_check(tmp_path, model, spm_tokenizer, ["q4_0"], check=False)
    path = tmp_path / "g" / info["files"]["q4_0"]["file"]
    tokens = reference(model, spm_tokenizer).evaluation[0].tolist()
    logits = {}
    for repack in (False, True):
        llm = gguf_check.open_llama(path, len(tokens), repack=repack)
        assert llm.model_params.use_extra_bufts is repack
        logits[repack] = gguf_check.window_logits(llm, tokens)
        llm.close()
    assert bindings.llama_model_default_params().use_extra_bufts  # llama.cpp's default is left as it was
    np.testing.assert_allclose(logits[False], logits[True], atol=2e-2 * np.abs(logits[True]).max())
    assert (logits[False].argmax(-1) == logits[True].argmax(-1)).mean() >= 0.95


@needs_converter
@needs_llama_cpp
def test_k_quants_on_rows_not_divisible_by_256_say_what_they_fell_back_to(tmp_path, spm_tokenizer):
    model = model_from_config("llama", vocab_size=len(spm_tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=3, num_key_value_heads=1)
    info = export_and_check(tmp_path, model, spm_tokenizer, ["q4_k_m"])
    assert info["files"]["q4_k_m"]["fallbacks"] and any("rows divisible by 256" in n for n in info["notes"])


@needs_converter
@needs_llama_cpp
@pytest.mark.parametrize("bits,kind", [(4, "q4_0"), (8, "q8_0")])
def test_gptq_grid_goes_in_block_for_block_without_requantising(tmp_path, spm_tokenizer, bits, kind):
    model = gptq(model_for(spm_tokenizer), spm_tokenizer, tmp_path, bits)
    info = export_and_check(tmp_path, model, spm_tokenizer, [kind])
    entry = info["files"][kind]
    assert entry["how"] == gguf_export.GRID_WRITTEN and entry["grid_matrices"] == 14
    assert info["weights"][kind] == {"tensors": 14, "identical": True}
    # independently: gguf's own dequantiser gives the model's weights, in some row order (q / k rows
    # are interleaved for llama's rope)
    stored = GgufIndex(tmp_path / "g" / entry["file"])
    W = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    assert stored.tensors["blk.1.attn_k.weight"].type.name == kind.upper()
    assert gguf_export.row_order(stored.values("blk.1.attn_k.weight"), W) is not None
    assert not np.array_equal(stored.values("blk.1.attn_k.weight"), W)  # permuted: the converter's row order was followed
    # the block matrices are the model's own; the embedding and output take llama.cpp's choice for
    # the type (q4_0: Q4_0 and Q6_K), which moves the flat logits of a random model most
    c = info["files_checked"][kind]
    assert c["perplexity"] == pytest.approx(c["reference_perplexity"], rel=0.02)
    assert info["files"][kind]["tensor_types"][kind.upper()] >= 15


@needs_converter
@needs_llama_cpp
def test_a_gptq_grid_that_is_not_q4_0_is_requantised_by_llama_cpp_and_says_so(tmp_path, spm_tokenizer):
    """Groups of 128 are not Q4_0's 32-value blocks: llama.cpp's quantizer makes the q4_0 file."""
    model = gptq(model_for(spm_tokenizer), spm_tokenizer, tmp_path, 4, group_size=128)
    assert gguf_export.grid_blocks(model.model.layers[0].mlp.up_proj) is None
    info = export_and_check(tmp_path, model, spm_tokenizer, ["q4_0"], check=False)
    entry = info["files"]["q4_0"]
    assert entry["how"] == "llama.cpp quantize from F32" and entry["tensor_types"].get("Q4_0", 0) >= 14
    assert any("dequantised and requantised by llama.cpp" in n for n in info["notes"])


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
@needs_default_model
def test_smollm2_gguf_matches_in_llama_cpp(tmp_path):
    from compress.model.load import load_model

    loaded = load_model("smollm2-135m")
    info = export_and_check(tmp_path, loaded.model, loaded.tokenizer, ["f16", "q8_0", "q4_k_m"])
    checked = info["files_checked"]
    assert all(c["tokenization_equal"] for c in checked.values())
    assert checked["f16"]["relative"] < 2e-2 and checked["f16"]["greedy_equal"] and checked["q8_0"]["top1_agreement"] >= 0.93
    assert checked["q4_k_m"]["perplexity"] < 1.5 * checked["q4_k_m"]["reference_perplexity"]
    assert info["files"]["q4_k_m"]["fallbacks"]  # 576 columns: most matrices cannot be Q4_K
    assert GgufIndex(tmp_path / "g" / "model-f16.gguf").fields["tokenizer.ggml.pre"] == "smollm"


# ---------------------------------------------------------------- compress run / compress export


def recipe(tmp_path, folder, stages: str, export: str):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{source: {folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 64}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 64}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 64}}
        stages: {stages}
        export: {export}
        output_dir: {tmp_path / "run"}
        """))
    return path


@pytest.fixture
def spm_folder(tmp_path, spm_tokenizer):
    folder = tmp_path / "model"
    model_for(spm_tokenizer).save_pretrained(folder)
    spm_tokenizer.save_pretrained(folder)
    import shutil

    shutil.copyfile(spm_tokenizer.name_or_path + "/tokenizer.model", folder / "tokenizer.model")
    return folder


@needs_converter
@needs_llama_cpp
def test_compress_export_checks_on_the_windows_the_run_used(tmp_path, spm_folder):
    """`compress export` cuts the run's data again: with every role of the run (roles sharing a
    source split it), so its reference perplexity is the run's own on the same windows."""
    path = recipe(tmp_path, spm_folder, "[{kind: prune, method: wanda, sparsity: 0.5}]", "{hf: {format: sparse}, gguf: {types: [f32]}}")
    run = engine.run(load_recipe(path), path).results["export"]["gguf"]["files_checked"]["f32"]
    again = export_run(tmp_path / "run", "gguf", ["f32"], overwrite=True)["files_checked"]["f32"]
    assert again["reference_perplexity"] == pytest.approx(run["reference_perplexity"], rel=1e-6)
    assert again["perplexity"] == pytest.approx(run["perplexity"], rel=1e-4)


@needs_converter
@needs_llama_cpp
def test_compress_export_on_a_finished_run(tmp_path, spm_folder):
    from compress.model import sparse_folder

    path = recipe(tmp_path, spm_folder, "[{kind: prune, method: wanda, sparsity: 0.6}]", "{hf: true}")
    out = engine.run(load_recipe(path), path).output_dir
    before = json.loads((out / "results.json").read_text())
    info = export_run(out, "hf", [], "sparse")
    assert info["weights"]["identical"] and info["parity"]["identical"]
    info = export_run(out, "gguf", ["f32"])
    assert info["files"]["f32"]["zeros_kept"] == 1.0 and info["weights"]["f32"]["identical"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["export"]) == {"hf", "hf-sparse", "gguf"} and results["perplexity"] == before["perplexity"]
    assert (out / "hf-sparse" / sparse_folder.WEIGHTS_FILE).is_file() and (out / "gguf" / "model-f32.gguf").is_file()
    assert "## Export: gguf" in (out / "report.md").read_text()
    with pytest.raises(CompressError, match="already exists; pass --overwrite"):
        export_run(out, "gguf", ["f32"])
    with pytest.raises(CompressError, match="--type: "):
        export_run(out, "gguf", ["q5_9"], overwrite=True)
    assert not list(out.glob(".*partial*")) and not list(out.glob(".scratch-*"))


@needs_converter
@needs_llama_cpp
def test_compress_export_of_a_gptq_run_keeps_the_grid(tmp_path, spm_folder):
    path = recipe(tmp_path, spm_folder, "[{kind: quantize, method: gptq, bits: 4, group_size: 32, act_order: false}]", "{hf: true, check: false}")
    out = engine.run(load_recipe(path), path).output_dir
    info = export_run(out, "gguf", ["q4_0"], check=False)
    assert info["files"]["q4_0"]["how"] == gguf_export.GRID_WRITTEN
    from compress.export.hf.gptq import read_dequantized

    down = read_dequantized(out)["model.layers.1.mlp.down_proj"]
    assert np.array_equal(GgufIndex(out / "gguf" / "model-q4_0.gguf").values("blk.1.ffn_down.weight"), down.numpy())



@needs_converter
@needs_llama_cpp
def test_compress_export_of_a_block_format_run_writes_the_same_blocks(tmp_path, spm_folder):
    """A run on llama.cpp's formats keeps their parameters beside its HF folder (ggml_grids.safetensors),
    so a later `compress export --to gguf` writes the run's own Q4_K blocks, not llama.cpp's requantisation."""
    from compress.export import hf as hf_export

    path = recipe(tmp_path, spm_folder, "[{kind: quantize, method: rtn, grid: q4_k}]", "{hf: true, gguf: {types: [grid]}, check: false}")
    out = engine.run(load_recipe(path), path).output_dir
    assert (out / hf_export.GRIDS_FILE).is_file()
    first = (out / "gguf" / "model-grid.gguf").read_bytes()
    info = export_run(out, "gguf", ["grid"], check=False, overwrite=True)
    assert info["files"]["grid"]["how"] == gguf_export.GRID_WRITTEN and info["files"]["grid"]["grid_matrices"] == 14
    assert (out / "gguf" / "model-grid.gguf").read_bytes() == first  # the same file, byte for byte
    # weights moved off their blocks are refused, naming the layer
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressError, match=r"model.layers.0.mlp.up_proj's weights in the folder are not on its q4_k blocks"):
        export_run(out, "gguf", ["grid"], check=False, overwrite=True)

@needs_converter
def test_without_llama_cpp_the_converter_writes_f16_and_the_check_says_it_did_not_run(tmp_path, spm_tokenizer, monkeypatch):
    """llama-cpp-python is a 15-minute build: without it the converter still writes the types it
    knows (f32, f16, bf16, q8_0); the others refuse before compressing, and nothing is checked."""
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    model = model_for(spm_tokenizer, hidden=64)
    cfg = GgufExport(types=["f16"])
    info = gguf_export.save(model, spm_tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    assert info["files"]["f16"]["how"] == "llama.cpp's converter" and info["files"]["f16"]["tensor_types"]["F16"] == 16
    assert gguf_export.check(tmp_path / "g", info, None, cfg) == {"checked": False, "reason": gguf_check.NO_LLAMA_CPP}
    with pytest.raises(CompressError, match=r"types \['q4_k_m'\] need llama.cpp's quantizer"):
        gguf_export.preflight(model, spm_tokenizer, GgufExport(types=["f16", "q4_k_m"]))


@needs_converter
def test_the_converter_takes_paths_relative_to_the_run(tmp_path, spm_tokenizer, monkeypatch):
    """A recipe's output_dir is usually relative (runs/name); the converter runs in its own folder."""
    monkeypatch.chdir(tmp_path)
    model = model_for(spm_tokenizer, hidden=64)
    info = gguf_export.save(model, spm_tokenizer, Path("g"), GgufExport(types=["f32"]), Path("scratch"))
    assert (tmp_path / "g" / "model-f32.gguf").is_file() and info["files"]["f32"]["tensor_types"]["F32"] > 0
