"""The prune stage on tiny random models: measured sparsity, patterns, allocation, selection."""

import copy

import pytest
import torch

from compress.algorithms import allocate
from compress.algorithms.sparsity import is_nm
from compress.blocks.forward import perplexity
from compress.errors import CompressError
from compress.model.anatomy import block_linears, decoder_blocks, get_weight
from compress.stages import prune
from compress.stages.context import StageContext
from compress.stages.prune import PruneConfig

from conftest import context, segments, tiny_model


def run(model, **cfg):
    return prune.apply(model, context(), PruneConfig(**cfg))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_block_sparsity_follows_the_atp_schedule(method, arch):
    model = tiny_model(arch, layers=4)
    beta = 0.08
    _, record = run(model, method=method, sparsity=0.5, allocation={"kind": "atp", "beta": beta})
    expected = allocate.atp(4, 0.5, beta).tolist()
    assert record.block_ratios == pytest.approx(expected, abs=1e-6)
    for i, block in enumerate(decoder_blocks(model)):
        for rel, module in block_linears(block).items():
            W = get_weight(module)
            # within one weight per row of the target (rounding of round(s * in_features))
            assert abs((W == 0).float().mean().item() - expected[i]) <= 1 / W.shape[1] + 1e-6, rel
    assert record.achieved == pytest.approx(0.5, abs=1 / 32)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_row_scope_prunes_the_same_count_in_every_row(method):
    model = tiny_model("llama", layers=2)
    run(model, method=method, sparsity=0.6, scope="row")
    for block in decoder_blocks(model):
        for module in block_linears(block).values():
            W = get_weight(module)
            assert torch.all((W == 0).sum(dim=1) == round(0.6 * W.shape[1]))


def test_nm_pattern_with_atp_gives_per_block_patterns():
    model = tiny_model("llama", layers=4)
    _, record = run(model, method="wanda", pattern="4:8", allocation={"kind": "atp", "beta": 0.1})
    assert record.block_patterns == ["5:8", "4:8", "4:8", "3:8"]  # ratios 0.35 .. 0.65, total kept 16 of 32
    for block, pattern in zip(decoder_blocks(model), record.block_patterns):
        n, m = map(int, pattern.split(":"))
        for module in block_linears(block).values():
            assert is_nm(get_weight(module), n, m)
            assert (get_weight(module) == 0).float().mean().item() == pytest.approx(1 - n / m)
    assert record.achieved == pytest.approx(0.5)


def test_sparsegpt_nm_is_valid_on_every_row():
    model = tiny_model("llama", layers=2)
    run(model, method="sparsegpt", pattern="2:4", blocksize=16)
    for block in decoder_blocks(model):
        for module in block_linears(block).values():
            assert is_nm(get_weight(module), 2, 4)


def test_targets_and_ignore():
    model = tiny_model("llama", layers=2)
    _, record = run(model, method="magnitude", sparsity=0.5, targets=[r"\.mlp\."], ignore=[r"down_proj"])
    for block in decoder_blocks(model):
        assert (block.mlp.gate_proj.weight == 0).float().mean() == pytest.approx(0.5)
        assert (block.mlp.down_proj.weight == 0).sum() == 0
        assert (block.self_attn.q_proj.weight == 0).sum() == 0
    assert "model.layers.0.mlp.down_proj" in record.skipped and "model.layers.1.self_attn.q_proj" in record.skipped
    assert (model.lm_head.weight == 0).sum() == 0 and (model.model.embed_tokens.weight == 0).sum() == 0


def test_targets_matching_nothing_is_an_error():
    with pytest.raises(CompressError, match=r"stages.*targets/ignore select no Linear layer"):
        run(tiny_model("llama"), method="magnitude", sparsity=0.5, targets=["nothing_matches"])


@pytest.mark.parametrize("kind", ["owl", "alpha"])
def test_data_driven_allocators_hit_the_mean(kind):
    model = tiny_model("llama", layers=4)
    _, record = run(model, method="wanda", sparsity=0.6, allocation={"kind": kind})
    assert sum(record.block_ratios) / 4 == pytest.approx(0.6, abs=1e-5)
    assert len(set(round(r, 4) for r in record.block_ratios)) > 1  # not uniform
    assert record.achieved == pytest.approx(0.6, abs=1 / 32)


def test_explicit_allocation_length_is_checked():
    with pytest.raises(CompressError, match=r"stages.allocation.ratios: 3 entries, the model has 2 blocks"):
        run(tiny_model("llama"), method="magnitude", allocation={"kind": "explicit", "ratios": [0.1, 0.2, 0.3]})


def test_sparsegpt_beats_magnitude_on_model_outputs():
    dense = tiny_model("llama", layers=2)
    tokens = segments().tokens
    with torch.no_grad():
        reference = dense(tokens).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        run(model, method=method, sparsity=0.6)
        with torch.no_grad():
            errors[method] = ((model(tokens).logits - reference) ** 2).mean().item()
    assert errors["sparsegpt"] < errors["magnitude"]


def test_beta_search_logs_trials_and_starts_at_uniform():
    model = tiny_model("llama", layers=4)
    _, record = run(model, method="wanda", sparsity=0.5, allocation={"kind": "atp", "beta": "auto", "trials": 3})
    betas = [t["beta"] for t in record.search]
    assert betas[0] == 0.0 and len(betas) == 3
    assert max(betas) <= allocate.atp_beta_max(4, 0.5)
    best = min(record.search, key=lambda t: (t["score"], t["beta"]))
    assert record.beta == best["beta"]
    assert record.block_ratios == pytest.approx(allocate.atp(4, 0.5, record.beta).tolist(), abs=1e-6)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_beta_search_leaves_the_weights_a_direct_prune_with_that_beta_gives(method):
    """The best trial's weights are kept instead of pruning again: they must be the same weights,
    and score the validation perplexity the search logged for that beta."""
    model = tiny_model("llama", layers=4)
    searched = copy.deepcopy(model)
    _, record = run(searched, method=method, sparsity=0.6, allocation={"kind": "atp", "beta": "auto", "trials": 4})
    run(model, method=method, sparsity=0.6, allocation={"kind": "atp", "beta": record.beta})
    for a, b in zip(decoder_blocks(searched), decoder_blocks(model)):
        for (name, x), y in zip(block_linears(a).items(), block_linears(b).values()):
            assert torch.equal(get_weight(x), get_weight(y)), name
    chosen = next(t for t in record.search if t["beta"] == record.beta)
    assert perplexity(searched, context().validation.tokens).ppl == pytest.approx(chosen["score"], rel=1e-6)


def eight_window_context():
    return StageContext(segments(8), segments(2, seed=1, role="validation"))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_trials_on_fewer_windows_then_the_chosen_beta_pruned_once_on_all(method):
    """trial_samples 2 of 8: every trial calibrates on 2 windows, and the model ends as a direct
    prune with the chosen beta on all 8 (not as the 2-window trial)."""
    model = tiny_model("llama", layers=4)
    searched, direct, two = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    auto = {"kind": "atp", "beta": "auto", "trials": 4, "trial_samples": 2}
    _, record = prune.apply(searched, eight_window_context(), PruneConfig(method=method, sparsity=0.6, allocation=auto))
    assert [t["calibration_windows"] for t in record.search] == [2] * 4
    fixed = PruneConfig(method=method, sparsity=0.6, allocation={"kind": "atp", "beta": record.beta})
    prune.apply(direct, eight_window_context(), fixed)
    ctx = eight_window_context()
    with ctx.calibrating_on(2):
        prune.apply(two, ctx, fixed)
    weights = [[get_weight(m) for b in decoder_blocks(x) for m in block_linears(b).values()] for x in (searched, direct, two)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))
    chosen = next(t for t in record.search if t["beta"] == record.beta)
    assert perplexity(two, ctx.validation.tokens).ppl == pytest.approx(chosen["score"], rel=1e-6)  # what the trial scored


def test_magnitude_trials_take_no_windows_and_keep_their_best():
    model = tiny_model("llama", layers=4)
    _, record = prune.apply(model, eight_window_context(), PruneConfig(method="magnitude", sparsity=0.6,
                            allocation={"kind": "atp", "beta": "auto", "trials": 3, "trial_samples": 2}))
    assert [t["calibration_windows"] for t in record.search] == [None] * 3
    chosen = next(t for t in record.search if t["beta"] == record.beta)
    assert perplexity(model, eight_window_context().validation.tokens).ppl == pytest.approx(chosen["score"], rel=1e-6)


def test_calibrating_on_spreads_the_windows_over_the_text():
    ctx = eight_window_context()
    model = tiny_model("llama", layers=2)
    every = ctx.block_inputs(model).hidden
    with ctx.calibrating_on(3) as subset:
        picked = ctx.block_inputs(model).hidden
    assert subset.used and [next(k for k, h in enumerate(every) if h is p) for p in picked] == [0, 4, 7]
    with ctx.calibrating_on(8) as subset:
        assert ctx.block_inputs(model).hidden is every
    assert not subset.used and ctx.block_inputs(model).hidden is every


def test_same_seed_same_masks():
    masks = []
    for _ in range(2):
        model = tiny_model("llama", layers=2)
        run(model, method="wanda", sparsity=0.5)
        masks.append([get_weight(m) == 0 for b in decoder_blocks(model) for m in block_linears(b).values()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_beta_auto_needs_validation():
    model = tiny_model("llama")
    ctx = StageContext(segments(), None)
    with pytest.raises(CompressError, match="needs validation data"):
        prune.apply(model, ctx, PruneConfig(sparsity=0.5, allocation={"kind": "atp", "beta": "auto"}))
