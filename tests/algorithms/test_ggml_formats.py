"""llama.cpp's block formats as quantisation grids (compress/algorithms/ggml_formats.py): parameters chosen as
the formats store them, GPTQ's error feedback on them, the bytes gguf decodes, the quantize stage's
`grid:` with allocation by depth, and GGUF files that carry the grids block for block."""

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compress.algorithms import allocate
from compress.algorithms.ggml_formats import FORMATS, GgufState, choose, fitting, ladder_of, rtn
from compress.algorithms.obs import gptq_quantize
from compress.export.gguf import pack as gguf_pack

from conftest import model_from_config, needs_converter

# bits per weight as stored (ggml-common.h block sizes): what a file of each format costs
BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}


def layer(rows=48, cols=512, seed=0, zeros=0.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    X = torch.randn(1024, cols, generator=g) * torch.linspace(0.2, 3, cols)  # uneven input scales
    if zeros:
        W[torch.rand(W.shape, generator=g) < zeros] = 0
    return W, 2 * X.t() @ X / X.shape[0]


def output_error(W, Wq, H):
    E = W - Wq
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_decodes_in_gguf_to_our_weights_bit_for_bit(name):
    fmt = FORMATS[name]
    assert fmt.bits_per_weight == BPW[name]
    W, _ = layer(cols=512)
    W[:3, :40] = 0  # an all-zero run: zero scales must survive packing
    Wq, state = rtn(W, fmt)
    raw = gguf_pack.pack(state, state.codes(Wq))
    assert raw.shape == (W.shape[0], 512 // fmt.span * gguf.GGML_QUANT_SIZES[fmt.qtype][1])
    decoded = gguf.quants.dequantize(raw, fmt.qtype).reshape(W.shape)
    assert np.array_equal(decoded, Wq.numpy())
    # below a uniform quantiser over +-3 sigma with as many levels: (6 sigma / levels)^2 / 12
    levels = fmt.hi - fmt.lo + 1
    assert float(((Wq - W) ** 2).mean() / (W**2).mean()) < 3 / levels**2


def test_k_quant_scales_are_stored_in_their_bits_under_a_float16_super_scale():
    W, _ = layer(rows=8, cols=256)
    p = choose(FORMATS["q4_k"], W)
    assert p.sc.min() >= 0 and p.sc.max() <= 63 and p.m.max() <= 63 and p.sc.shape == (8, 8)
    assert torch.equal(p.d, p.d.half().float()) and torch.equal(p.dmin, p.dmin.half().float())
    p = choose(FORMATS["q6_k"], W)
    assert p.sc.min() >= -128 and p.sc.max() <= 127 and p.sc.shape == (8, 16)
    p = choose(FORMATS["q2_k"], W)
    assert p.sc.max() <= 15 and p.m.max() <= 15


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q3_k", "q6_k", "q5_1"])
def test_gptq_on_block_formats_beats_round_to_nearest_and_packs_exactly(name):
    fmt = FORMATS[name]
    W, H = layer(zeros=0.3)
    frozen = W == 0
    Wr, _ = rtn(W, fmt)
    Wg, _, state = gptq_quantize(W, H, fmt, frozen=frozen, act_order="group")
    assert isinstance(state, GgufState) and state.fmt is fmt
    assert output_error(W, Wg, H) < 0.95 * output_error(W, Wr, H)
    decoded = gguf.quants.dequantize(gguf_pack.pack(state, state.codes(Wg)), fmt.qtype).reshape(W.shape)
    assert np.array_equal(decoded, Wg.numpy())
    kept = float((Wg[frozen] == 0).float().mean())
    assert kept == 1.0 if fmt.holds_zero else kept < 0.05  # asymmetric formats have no exact 0 in general


def test_block_formats_refuse_scattered_column_orders_and_partial_blocks():
    from compress.errors import CompressError

    W, H = layer(cols=512)
    with pytest.raises(CompressError, match="act_order true scatters columns"):
        gptq_quantize(W, H, FORMATS["q4_k"], act_order=True)
    with pytest.raises(CompressError, match="whole 256-column blocks, got 320"):
        gptq_quantize(W[:, :320], H[:320, :320], FORMATS["q4_k"])


def test_rows_that_are_not_whole_blocks_take_llama_cpp_s_fallback():
    assert fitting("q4_k", 576).name == "q5_0" and fitting("q6_k", 576).name == "q8_0"
    assert fitting("q2_k", 576).name == "q4_0" and fitting("q5_k", 576).name == "q5_1"
    assert fitting("q4_k", 200) is None and fitting("q4_0", 200) is None and fitting("q4_k", 1536).name == "q4_k"


def test_atp_over_formats_gives_more_bits_early_and_never_exceeds_the_budget():
    ladder = tuple(FORMATS[n].bits_per_weight for n in ladder_of("q4_k"))
    assert ladder_of("q4_k") == ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0") and ladder_of("q4_0") == ("q4_0", "q5_0", "q8_0")
    sizes = torch.ones(30)
    for target in (3.4375, 4.5, 4.85):
        for beta in (0.0, 0.05, allocate.atp_ladder_beta_max(30, target, ladder)):
            bits = allocate.atp_ladder(30, target, beta, ladder, sizes)
            assert allocate.weighted_bits(bits, sizes) <= target + 1e-9
            assert bits == sorted(bits, reverse=True)  # non-increasing with depth
    mixed = allocate.atp_ladder(30, 4.85, 0.05, ladder, sizes)
    assert mixed[0] > 4.85 > mixed[-1] and allocate.weighted_bits(mixed, sizes) > 4.6  # the budget is mostly spent


def test_atp_over_formats_counts_the_fallbacks_in_the_budget():
    """SmolLM2's blocks: six 576-column matrices (q4_k -> q5_0 at 5.5 bits, q3_k -> q4_0 at 4.5) and
    one 1536-column down projection (true K-quants). The file's real bits stay within the target."""
    from compress.algorithms.ggml_formats import stored_bits_per_weight

    names = ladder_of("q4_k")
    ladder = tuple(FORMATS[n].bits_per_weight for n in names)
    by_bits = dict(zip(ladder, names))
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    weights = sum(r * c for r, c in shapes)

    def stored(i, rung):
        return sum(r * c * stored_bits_per_weight(by_bits[rung], c) for r, c in shapes)

    assert stored_bits_per_weight("q4_k", 576) == 5.5 and stored_bits_per_weight("q4_k", 1536) == 4.5
    assert stored_bits_per_weight("q4_k", 100) == 16  # nothing fits: float16
    sizes = torch.full((30,), float(weights))
    for target in (5.0, 5.5, 6.0):
        for beta in (0.0, 0.03, allocate.atp_ladder_beta_max(30, target, ladder)):
            bits = allocate.atp_ladder(30, target, beta, ladder, sizes, stored)
            real = sum(stored(i, b) for i, b in enumerate(bits)) / (30 * weights)
            assert real <= target + 1e-9 and bits == sorted(bits, reverse=True)
            assert real > target - 1.0  # not all pushed to the bottom
    # nominal accounting would have put every block on q4_k (4.5 <= 5.0), storing 5.29 bits: over the budget
    assert sum(stored(0, 4.5) for _ in range(30)) / (30 * weights) > 5.0


def test_quantize_config_with_a_grid():
    from compress.stages.quantize import QuantizeConfig

    cfg = QuantizeConfig(method="gptq", grid="q4_k")
    assert cfg.target_bits == 4.5
    for extra, message in [({"bits": 4}, "bits: grid q4_k fixes"), ({"group_size": 32}, "group_size: grid q4_k fixes"),
                           ({"sym": False}, "sym: grid q4_k fixes"), ({"act_order": True}, "act_order true scatters"),
                           ({"bits_per_weight": 4.0}, "bits_per_weight is the mean an atp allocation"),
                           ({"allocation": {"kind": "explicit", "bits": [4, 4]}}, "allocation explicit takes grids"),
                           ({"allocation": {"kind": "atp", "beta": "auto"}, "bits_per_weight": 9.0}, r"within \[2.625, 8.5\]"),
                           ({"method": "bnb"}, "grid .llama.cpp block formats. applies to gptq and rtn")]:
        with pytest.raises(ValidationError, match=message):
            QuantizeConfig(grid="q4_k", **extra)
    with pytest.raises(ValidationError, match="allocation.grids needs grid"):
        QuantizeConfig(allocation={"kind": "explicit", "grids": ["q4_k"]})
    atp = QuantizeConfig(grid="q4_k", allocation={"kind": "atp", "beta": "auto"}, bits_per_weight=4.85)
    assert atp.target_bits == 4.85 and atp.ladder[0] == 2.625
    # a resolved recipe (metadata.json) writes every field out, defaults included: it validates again
    assert QuantizeConfig.model_validate(atp.model_dump()) == atp


def test_the_quantize_stage_on_grids_records_formats_and_fallbacks(tmp_path, tokenizer):
    """An MLP of 320 channels: its down projection has rows of 320, not whole Q4_K blocks, and
    takes Q5_0 as llama.cpp would; the other matrices are Q4_K (hidden 256)."""
    from compress.data.windows import SegmentsConfig, build_segments
    from compress.stages.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = model_from_config("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    calibration = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, tokenizer)["calibration"]
    cfg = QuantizeConfig(method="gptq", grid="q4_k", allocation={"kind": "explicit", "grids": ["q6_k", "q4_k"]})
    model, record = apply(model, StageContext(calibration, None, torch.float32, scratch_dir=tmp_path / "s"), cfg)
    assert record.block_grids == ["q6_k", "q4_k"] and record.format == "q4_k blocks group-aware order"
    assert record.layer_grids["model.layers.0.mlp.down_proj"] == "q8_0" and record.layer_grids["model.layers.1.mlp.down_proj"] == "q5_0"
    assert record.layer_grids["model.layers.1.self_attn.q_proj"] == "q4_k"
    assert any("took llama.cpp's fallback (q5_0, q8_0)" in n for n in record.notes)
    state = model.model.layers[1].mlp.up_proj.quant_state
    assert isinstance(state, GgufState) and torch.equal(state.dequantized(state.codes(model.model.layers[1].mlp.up_proj.weight)), model.model.layers[1].mlp.up_proj.weight)
    assert 4.5 < record.bits_per_weight < 6.6


@needs_converter
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_a_gptq_q4_k_model_goes_into_gguf_block_for_block(tmp_path, spm_tokenizer):
    """`types: [grid]` writes every gridded matrix as its own Q4_K blocks; `q4_k_m` is llama.cpp's
    mix, and carries ours wherever that mix chose Q4_K. Both decode to the model's weights."""
    from compress.data.windows import SegmentsConfig, build_segments
    from compress.export import gguf as gguf_export
    from compress.export.reference import take_reference
    from compress.model.gguf_file import GgufIndex
    from compress.stages.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = model_from_config("llama", vocab_size=len(spm_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    segments = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64),
                               "evaluation": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64)}, spm_tokenizer)
    model, _ = apply(model, StageContext(segments["calibration"], None, torch.float32, scratch_dir=tmp_path / "s"), QuantizeConfig(grid="q4_k"))
    cfg = gguf_export.GgufExport(types=["grid", "q4_k_m"])
    info = gguf_export.save(model, spm_tokenizer, tmp_path / "g", cfg, tmp_path / "scratch")
    info.update(gguf_export.verify(model, tmp_path / "g", info, cfg))
    grid, mix = info["files"]["grid"], info["files"]["q4_k_m"]
    assert grid["how"] == mix["how"] == gguf_export.GRID_WRITTEN and grid["base"] == "q4_k_m"
    assert grid["grid_matrices"] == 14 and info["weights"]["grid"] == {"tensors": 14, "identical": True}
    assert GgufIndex(tmp_path / "g" / grid["file"]).types()["blk.1.attn_v.weight"] == "Q4_K"  # our format everywhere
    assert GgufIndex(tmp_path / "g" / mix["file"]).types()["blk.1.attn_v.weight"] == "Q6_K"  # llama.cpp's mix keeps v wider (last layer)
    assert 0 < mix["grid_matrices"] < 14 and info["weights"]["q4_k_m"]["tensors"] == mix["grid_matrices"]
    windows = segments["evaluation"].tokens
    checked = gguf_export.check(tmp_path / "g", info, take_reference(model, windows[:2], spm_tokenizer, windows), cfg)["files_checked"]
    # the block matrices are the model's own: llama.cpp's perplexity is ours but for its 8-bit activations
    assert checked["grid"]["perplexity"] == pytest.approx(checked["grid"]["reference_perplexity"], rel=0.01)


def test_formats_by_depth_are_searched_on_the_validation_text(tmp_path, tokenizer):
    """allocation atp with beta auto over the K-quant family: each trial's plan a list of formats,
    scored on the validation windows; the chosen plan spends at most the budget."""
    from compress.data.windows import SegmentsConfig, build_segments
    from compress.stages.context import StageContext
    from compress.stages.quantize import QuantizeConfig, apply

    model = model_from_config("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2)
    segments = build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64),
                               "validation": SegmentsConfig(source="python-docs", nsamples=2, seqlen=64)}, tokenizer)
    cfg = QuantizeConfig(method="rtn", grid="q4_k", bits_per_weight=4.85, allocation={"kind": "atp", "beta": "auto", "trials": 3})
    ctx = StageContext(segments["calibration"], segments["validation"], torch.float32, scratch_dir=tmp_path / "s")
    model, record = apply(model, ctx, cfg)
    assert len(record.search) == 3 and record.search[0]["beta"] == 0.0
    assert all(g in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0") for g in record.block_grids)
    assert record.achieved <= 4.85 + 1e-9 and record.block_bits == sorted(record.block_bits, reverse=True)
    state = model.model.layers[0].mlp.down_proj.quant_state
    assert state.fmt.name == record.block_grids[0]  # the model holds the chosen trial's grids, not the last one's


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q3_k", "q4_k", "q2_k", "q6_k"])
def test_the_scale_refit_keeps_the_codes_lowers_the_output_error_and_never_raises_a_row(name):
    """ggml_refit.refit after GPTQ: same codes, parameters still storable (the file decodes to
    the weights), a lower total output error, and no row worse than GPTQ left it; zeros stay."""
    from compress.algorithms.ggml_refit import refit, row_error

    W, H = layer(zeros=0.3)
    frozen = W == 0
    Wq, _, state = gptq_quantize(W, H, FORMATS[name], frozen, act_order="group")
    q = state.codes(Wq)
    new = refit(state, q, W, H)
    W2 = new.dequantized(q)
    assert torch.equal(new.codes(W2), q)  # on its grid, with GPTQ's codes
    before, after = row_error(W - Wq, H), row_error(W - W2, H)
    assert bool((after <= before * (1 + 1e-6)).all()) and after.sum() < before.sum()
    if FORMATS[name].holds_zero:
        assert bool((W2[frozen] == 0).all())
    if FORMATS[name].sub_bits:
        assert int(new.sc.min()) >= (0 if FORMATS[name].asym else -(1 << (FORMATS[name].sub_bits - 1)))


def test_obs_scale_weights_are_gptqs_own_loss_per_column():
    """scale_weights obs: 1 / [chol(H^-1)]_jj^2: the first column's is its damped H entry less
    what every later column can compensate (its Schur complement), the last column's, which
    nothing follows, its damped H entry; with a diagonal H it is diag(H) (damped), the hessian
    weights; the pass with them stays on the grid."""
    from compress.algorithms.obs import inverse_hessian_factor, obs_importance

    W, H = layer()
    U, frac = inverse_hessian_factor(H, 0.01)
    weights = obs_importance(U, None)
    damped = H + frac * H.diagonal().mean() * torch.eye(H.shape[0])
    schur = damped[0, 0] - damped[0, 1:] @ torch.linalg.solve(damped[1:, 1:], damped[1:, 0])
    assert float(weights[0]) == pytest.approx(float(schur), rel=1e-3)
    assert float(weights[-1]) == pytest.approx(float(damped[-1, -1]), rel=1e-4)
    assert bool((weights <= damped.diagonal() * (1 + 1e-4)).all())  # compensation only lowers a column's cost
    diagonal = torch.diag(H.diagonal())
    U, frac = inverse_hessian_factor(diagonal, 0.01)
    assert torch.allclose(obs_importance(U, None), diagonal.diagonal() + frac * diagonal.diagonal().mean(), rtol=1e-4)
    perm = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(obs_importance(U[perm][:, perm], perm), obs_importance(U, None), rtol=1e-5)
    Wq, _, state = gptq_quantize(W, H, FORMATS["q4_k"], act_order="group", scale_weights="obs")
    assert torch.equal(state.dequantized(state.codes(Wq)), Wq)


def test_scale_tuning_needs_gptq_onto_a_grid():
    from compress.stages.quantize import QuantizeConfig

    for bad in ({"method": "rtn", "grid": "q4_0", "scale_weights": "obs"}, {"method": "gptq", "bits": 4, "scale_refit": True}):
        with pytest.raises(ValidationError, match="method gptq with a grid"):
            QuantizeConfig(**bad)
    assert QuantizeConfig(method="gptq", grid="q4_k_m", scale_weights="obs").scale_weights == "obs"
