"""The lowrank stage: ranks and weight counts, reconstruction (Eckart-Young, whitened), asvd vs svd
on correlated inputs, allocation, refusals, save/reload, and later stages on the factors."""

import copy
import textwrap

import pytest
import torch
from pydantic import ValidationError

from compress.algorithms import allocate
from compress.blocks.forward import perplexity
from compress.errors import CompressError
from compress.export import hf
from compress.model.anatomy import block_linears, decoder_blocks, get_weight
from compress.model.load import load_model
from compress.model.modules import LowRankLinear
from compress.run import engine
from compress.run.recipe import load_recipe
from compress.stages import lowrank, quantize
from compress.stages.context import StageContext
from compress.stages.lowrank import LowRankConfig, low_rank, rank_for
from compress.stages.quantize import QuantizeConfig

from conftest import context, segments, tiny_model


def run(model, **cfg):
    return lowrank.apply(model, context(), LowRankConfig(**cfg))


def linears(model) -> dict:
    """{full name: module} of every block's top-level projections (LowRankLinear or Linear)."""
    return {f"{i}.{name}": m for i, block in enumerate(decoder_blocks(model)) for name, m in block.named_modules()
            if name.endswith("_proj") or name.split(".")[-1] in ("c_attn", "c_proj", "c_fc", "fc1", "fc2")}


def correlated(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(tokens, n) inputs X = Z M: a random mix with singular values from 1 to 1e-3 (strongly
    anisotropic, as LLM activations are)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    M = Q * torch.logspace(0, -3, n)[None, :] @ torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    return torch.randn(tokens, n, generator=g) @ M


# ---------------------------------------------------------------- primitives


def test_rank_for_keeps_fewer_weights_than_the_layer():
    assert rank_for(32, 64, 0.3) == 14  # floor(0.7 * 2048 / 96) = floor(14.93)
    assert rank_for(32, 32, 0.5) == 8  # exactly 8: no float slip to 7
    assert rank_for(576, 1536, 0.3, multiple=32) == 288  # 293 rounded down
    assert rank_for(32, 64, 0.3, residual_sparsity=0.9) == 12  # (1433.6 - 32 * 6 kept residual entries) / 96
    for m, n, ratio in [(16, 32, 0.01), (64, 32, 0.5), (576, 1536, 0.9)]:
        r = rank_for(m, n, ratio)
        assert r * (m + n) <= (1 - ratio) * m * n < (r + 1) * (m + n)


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_full_rank_reproduces_the_layer(shape):
    """Both factorisations are exact at full rank (the whitening is undone by C^-1)."""
    torch.manual_seed(0)
    W = torch.randn(shape, dtype=torch.float64)
    X = correlated(shape[1], 200)
    C = torch.linalg.cholesky(X.double().T @ X.double())
    for factor in (None, C):
        up, down = low_rank(W, min(shape), factor)
        assert torch.allclose(up @ down, W, atol=1e-9)
        module = LowRankLinear(shape[1], shape[0], min(shape), dtype=torch.float64)
        module.up.weight.data, module.down.weight.data = up, down
        assert torch.allclose(module(X.double()), X.double() @ W.T, atol=1e-9)


def test_truncated_svd_error_is_the_discarded_spectrum():
    """Eckart-Young: the weight error of svd is the sum of the discarded squared singular values;
    asvd's output error is the same sum for W C (SVD-LLM's theorem)."""
    torch.manual_seed(0)
    W = torch.randn(24, 40, dtype=torch.float64)
    X = correlated(40, 500).double()
    H = X.T @ X
    C = torch.linalg.cholesky(H)
    for r in (1, 5, 12):
        up, down = low_rank(W, r)
        S = torch.linalg.svdvals(W)
        assert ((W - up @ down) ** 2).sum() == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-9)
        up, down = low_rank(W, r, C)
        S = torch.linalg.svdvals(W @ C)
        E = W - up @ down
        assert float(torch.trace(E @ H @ E.T)) == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-9)


def test_asvd_beats_svd_on_correlated_inputs_for_one_layer():
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    X = correlated(64, 1000)
    H = X.T @ X
    errors = {}
    for method in ("svd", "asvd"):
        cfg = LowRankConfig(method=method, ratio=0.5, dampening=1e-6)
        factors = lowrank.factorize(W, H, rank_for(48, 64, 0.5), cfg)
        Y, Y_hat = X @ W.T, X @ factors.dense().T
        errors[method] = float(((Y - Y_hat) ** 2).sum() / (Y**2).sum())
        assert factors.error == pytest.approx(errors[method], rel=1e-3)  # the recorded error is the output error
    assert errors["asvd"] < 0.2 * errors["svd"], errors  # measured 0.038 vs 0.364


# ---------------------------------------------------------------- the stage on tiny models


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_weight_counts_follow_the_rank_and_match_the_record(arch):
    model = tiny_model(arch, layers=2)
    shapes = {name: (tuple(get_weight(m).shape), m.bias is not None) for name, m in linears(model).items()}
    _, record = run(model, method="asvd", ratio=0.4)
    total_before = total_after = 0
    for (short, module), full in zip(linears(model).items(), record.layer_rank):
        (m, n), bias = shapes[short]
        r = rank_for(m, n, 0.4)
        assert isinstance(module, LowRankLinear) and module.rank == r == record.layer_rank[full], full
        assert (module.in_features, module.out_features) == (n, m)
        assert module.parameter_count() == r * (m + n) + (m if bias else 0)
        assert record.layer_params[full] == (m * n, r * (m + n))
        total_before, total_after = total_before + m * n, total_after + r * (m + n)
    assert (record.params_before, record.params_after) == (total_before, total_after)
    assert record.achieved == pytest.approx(1 - total_after / total_before)
    assert 0.4 <= record.achieved < 0.5  # ranks round down: at least the target is removed
    assert all(0 < e < 1 for e in record.layer_output_error.values())


def with_correlated_embeddings(model):
    """Token embeddings in a few dominant directions, so every block's inputs are correlated."""
    E = model.get_input_embeddings().weight.data
    E.copy_(correlated(E.shape[1], E.shape[0], seed=1) * 3)
    return model


def test_asvd_beats_svd_on_a_tiny_model():
    dense = with_correlated_embeddings(tiny_model("llama", layers=2))
    tokens = segments().tokens
    with torch.no_grad():
        reference = dense(tokens).logits
    errors, layer_errors = {}, {}
    for method in ("svd", "asvd"):
        model, record = run(copy.deepcopy(dense), method=method, ratio=0.3)
        with torch.no_grad():
            errors[method] = float(((model(tokens).logits - reference) ** 2).mean())
        layer_errors[method] = record.layer_output_error
    assert errors["asvd"] < 0.5 * errors["svd"], errors
    assert all(layer_errors["asvd"][k] < layer_errors["svd"][k] for k in layer_errors["svd"]), layer_errors


def test_allocations_give_the_expected_ranks_and_ratio_0_stays_dense():
    model = tiny_model("llama", layers=4)
    _, record = run(model, ratio=0.3, allocation={"kind": "atp", "beta": 0.1})
    ratios = allocate.atp(4, 0.3, 0.1).tolist()
    assert record.block_ratios == pytest.approx(ratios, abs=1e-6)
    for i, block in enumerate(decoder_blocks(model)):
        q = block.self_attn.q_proj
        assert q.rank == rank_for(32, 32, ratios[i]), i
        assert record.layer_rank[f"model.layers.{i}.mlp.down_proj"] == rank_for(32, 64, ratios[i])
    assert record.block_achieved[0] < record.block_achieved[3]

    model = tiny_model("llama", layers=2)
    _, record = run(model, allocation={"kind": "explicit", "ratios": [0.0, 0.5]})
    assert record.target == 0.25
    block0, block1 = decoder_blocks(model)
    assert all(type(m) is torch.nn.Linear for m in block_linears(block0).values())  # no down/up inside
    assert not any(hasattr(m, lowrank.FACTORS) for m in block_linears(block0).values())
    assert isinstance(block1.mlp.up_proj, LowRankLinear) and block1.mlp.up_proj.rank == rank_for(64, 32, 0.5)
    assert record.layer_rank["model.layers.0.self_attn.q_proj"] is None and record.block_achieved[0] == 0
    assert "left dense" in record.notes[0]

    model = tiny_model("llama", layers=2)
    _, record = run(model, ratio=0.5, targets=[r"\.mlp\."])
    assert isinstance(decoder_blocks(model)[0].mlp.gate_proj, LowRankLinear)
    assert type(decoder_blocks(model)[0].self_attn.q_proj) is torch.nn.Linear
    assert "model.layers.1.self_attn.o_proj" in record.skipped


def test_beta_search_leaves_the_model_a_direct_run_with_that_beta_gives():
    dense = tiny_model("llama", layers=4)
    searched, record = run(copy.deepcopy(dense), ratio=0.4, allocation={"kind": "atp", "beta": "auto", "trials": 3})
    assert [t["beta"] for t in record.search][0] == 0.0 and len(record.search) == 3
    hi = min(lowrank.max_ratio(m, n) for m, n in [(32, 32), (16, 32), (64, 32), (32, 64)])
    assert max(t["beta"] for t in record.search) <= allocate.atp_beta_max(4, 0.4, hi)
    direct, _ = run(copy.deepcopy(dense), ratio=0.4, allocation={"kind": "atp", "beta": record.beta})
    for a, b in zip(searched.parameters(), direct.parameters()):
        assert torch.equal(a, b)
    chosen = next(t for t in record.search if t["beta"] == record.beta)
    # the trial was scored with the dense equivalent of the factors: the same up to float rounding
    assert perplexity(searched, context().validation.tokens).ppl == pytest.approx(chosen["score"], rel=1e-4)


def test_refusals_name_the_key_and_the_layer():
    with pytest.raises(CompressError, match=r"stages.ratio: block 0 ratio 0.9700 leaves model.layers.0.self_attn.q_proj \(32x32\) "
                                            r"no rank >= 1; this layer allows a ratio of at most 0.9375"):
        run(tiny_model("llama"), ratio=0.97)
    with pytest.raises(CompressError, match=r"stages.allocation.ratios: block 1 ratio 0.9900 leaves .*q_proj"):
        run(tiny_model("llama"), allocation={"kind": "explicit", "ratios": [0.1, 0.99]})
    with pytest.raises(CompressError, match=r"stages.allocation.ratios: 3 entries, the model has 2 blocks"):
        run(tiny_model("llama"), allocation={"kind": "explicit", "ratios": [0.1, 0.2, 0.3]})
    with pytest.raises(CompressError, match=r"q_proj \(32x32\) no rank >= 16; this layer allows a ratio of at most 0.0000"):
        run(tiny_model("llama"), ratio=0.5, rank_multiple=16)
    with pytest.raises(CompressError, match="needs validation data"):
        lowrank.apply(tiny_model("llama"), StageContext(segments(), None), LowRankConfig(ratio=0.3, allocation={"kind": "atp"}))
    with pytest.raises(ValidationError, match="ratio is required"):
        LowRankConfig()
    with pytest.raises(ValidationError, match="residual_sparsity 0.3 must exceed ratio 0.5"):
        LowRankConfig(ratio=0.5, residual_sparsity=0.3)
    model = tiny_model("llama")
    quantize.apply(model, context(), QuantizeConfig(method="rtn", bits=4, group_size=-1))
    with pytest.raises(CompressError, match="quantised already; .* put lowrank before quantize"):
        run(model, ratio=0.3)


def test_residual_keeps_the_budget_and_lowers_the_error():
    """On random weights (a flat spectrum: low rank fits them badly) a sparse residual helps (mean
    layer error 0.172 -> 0.088). With strongly correlated inputs (with_correlated_embeddings) whitened
    low rank alone is about as good (0.0171 plain, 0.0183 with the residual). On SmolLM2-135M at
    ratio 0.2 it pays: perplexity 28.7 plain asvd, 17.2 / 15.4 with residual_sparsity 0.9 / 0.8."""
    dense = tiny_model("llama", layers=2)
    plain_model, plain = run(copy.deepcopy(dense), ratio=0.3)
    model, mixed = run(copy.deepcopy(dense), ratio=0.3, residual_sparsity=0.9)
    for name, (before, after) in mixed.layer_params.items():
        assert after <= 0.7 * before, name
        module = model.get_submodule(name)
        m, n = module.out_features, module.in_features
        assert module.rank == rank_for(m, n, 0.3, residual_sparsity=0.9)
        assert int(torch.count_nonzero(module.residual.weight)) == m * (n - round(0.9 * n))  # per row, as Wanda
    mean = lambda r: sum(r.layer_output_error.values()) / len(r.layer_output_error)
    assert mean(mixed) < mean(plain)


# ---------------------------------------------------------------- saving, and later stages on the factors


@pytest.mark.parametrize("fmt,residual", [("dense", None), ("sparse", 0.9)])
def test_save_and_reload_gives_identical_logits(tmp_path, tokenizer, fmt, residual):
    model, _ = run(tiny_model("llama"), ratio=0.3, residual_sparsity=residual)
    tokens = segments().tokens
    with torch.no_grad():
        expected = model(tokens).logits
    info = hf.save(model, tokenizer, tmp_path, hf.HfExport(format=fmt), tmp_path)
    assert hf.verify(model, tmp_path, info, hf.HfExport(format=fmt))["weights"]["identical"]
    reloaded = load_model(str(tmp_path)).model
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)


def test_lowrank_then_prune_then_quantize_recipe(tmp_path, tiny_folder):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{source: {tiny_folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 32}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 32}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
        stages:
          - {{kind: lowrank, method: asvd, ratio: 0.3, allocation: {{kind: atp, beta: 0.05}}}}
          - {{kind: prune, method: wanda, sparsity: 0.5}}
          - {{kind: quantize, method: gptq, bits: 4, group_size: -1}}
        output_dir: {tmp_path / "out"}
        """))
    result = engine.run(load_recipe(path), path)
    low, pruned, quant = result.results["stages"]
    assert low["kind"] == "lowrank" and low["achieved"] >= 0.3
    # prune and quantize work on the factors: their names are ...q_proj.down / ...q_proj.up
    assert "model.layers.0.self_attn.q_proj.down" in pruned["layer_achieved"]
    assert pruned["achieved"] == pytest.approx(0.5, abs=0.02)
    assert quant["layer_bits"]["model.layers.1.mlp.down_proj.up"] == 4
    assert quant["zeros_kept"] == quant["zeros_before"] > 0
    assert result.results["export"]["hf"]["format"] == "layout"
    assert result.results["export"]["hf"]["parity"]["identical"] is True
    reloaded = load_model(str(tmp_path / "out")).model
    q = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank == low["layer_rank"]["model.layers.0.self_attn.q_proj"]
    assert "Stage 0: lowrank" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "stage0_lowrank.png").is_file()
