"""The recover stage on tiny random models: LoRA lowers perplexity, every zero stays zero, the
model comes back with its own structure, per-block ranks reach the adapters, refusals."""

import copy
import json
import textwrap

import pytest
import torch
from torch import nn

from compress.blocks.forward import perplexity
from compress.data.windows import Segments
from compress.errors import CompressError
from compress.model.anatomy import decoder_blocks, get_weight, select_linears
from compress.run import engine
from compress.run.recipe import load_recipe
from compress.stages import prune, quantize, recover
from compress.stages.context import StageContext
from compress.stages.prune import PruneConfig
from compress.stages.quantize import QuantizeConfig
from compress.stages.recover import RecoverConfig

from conftest import ATTENTION, VOCAB, model_from_config, tiny_model

pytest.importorskip("peft", reason="peft is not installed (pip install 'atp-compress[recover]')")


def periodic(n, seqlen, offset=0, period=24, role="calibration"):
    """A random motif repeated: text a tiny model can learn in a few dozen steps."""
    motif = torch.randint(0, 256, (period,), generator=torch.Generator().manual_seed(0))
    tokens = motif[(torch.arange(n * seqlen) + offset) % period].view(n, seqlen)
    return Segments(tokens, role, "periodic", (0.0, 1.0), n * seqlen)


def context(validation=True):
    return StageContext(periodic(8, 64), periodic(2, 64, offset=7, role="validation") if validation else None)


def pruned(arch="llama", sparsity=0.6, layers=2):
    model = tiny_model(arch, layers=layers)
    prune.apply(model, context(), PruneConfig(method="magnitude", sparsity=sparsity))
    return model


def run(model, ctx=None, **cfg):
    cfg = {"seqlen": 32, **cfg}
    return recover.apply(model, ctx or context(), RecoverConfig(**cfg))


def block_weights(model):
    """Every Linear weight inside decoder blocks by full name (GPT-2's Conv1D as (out, in))."""
    layers, _ = select_linears(model, [".*"], [], "test")
    return {name: get_weight(m).clone() for block in layers for name, m in block.items()}


# ---------------------------------------------------------------- recovery


def test_recovery_lowers_perplexity_and_keeps_every_zero():
    # initializer_range 0.1, not 0.02: with the frozen random lm_head of std 0.02 behind a norm,
    # logits cannot spread far enough for any training to move perplexity much
    model = model_from_config("llama", num_hidden_layers=2, vocab_size=VOCAB, initializer_range=0.1, **ATTENTION)
    prune.apply(model, context(), PruneConfig(method="magnitude", sparsity=0.6))
    before = copy.deepcopy(model.state_dict())
    zeros = {name: W == 0 for name, W in block_weights(model).items()}
    val = context().validation.tokens
    ppl_pruned = perplexity(model, val).ppl

    _, record = run(model, steps=40, lr=1e-2, rank=4, ignore=[r"down_proj"])

    ppl_recovered = perplexity(model, val).ppl
    assert record.ppl_before == pytest.approx(ppl_pruned) and record.ppl_after == pytest.approx(ppl_recovered)
    assert ppl_recovered < 0.5 * ppl_pruned, (ppl_pruned, ppl_recovered)  # measured: 312.0 -> 85.1
    assert record.loss_last < record.loss_first and len(record.losses) == 40
    after = block_weights(model)
    for name, zero in zeros.items():
        assert torch.all(after[name][zero] == 0), name  # pruned weights exactly zero
        if "down_proj" not in name:
            assert not torch.equal(after[name], before[f"{name}.weight"]), name  # the merge reached W
    assert record.zeros_before == record.zeros_kept == sum(int(z.sum()) for name, z in zeros.items() if "down_proj" not in name)
    # not targeted: ignored Linears, embeddings, norms, lm_head are bit for bit the same
    for key, value in model.state_dict().items():
        if "down_proj" in key or not key.endswith("proj.weight"):
            assert torch.equal(value, before[key]), key
    assert record.layers == 2 * 6 and sorted(record.skipped) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_without_keep_sparsity_the_merge_fills_zeros():
    _, record = run(pruned(), steps=5, lr=1e-2, keep_sparsity=False)
    assert record.zeros_kept < 0.01 * record.zeros_before


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_model_comes_back_plain_with_its_zeros(arch):
    """No peft module, parameter name or trainable parameter left; eval mode and use_cache restored;
    GPT-2's Conv1D (stored (in, out)) merges in its own layout."""
    model = pruned(arch)
    keys, types = list(model.state_dict()), {n: type(m) for n, m in model.named_modules()}
    zeros = {name: W == 0 for name, W in block_weights(model).items()}
    model.config.use_cache = True
    _, record = run(model, steps=3, lr=1e-2)
    assert list(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and model.config.use_cache is True
    assert all(torch.all(block_weights(model)[name][z] == 0) for name, z in zeros.items())
    assert record.zeros_kept == record.zeros_before > 0


def test_bfloat16_model_trains_in_float32_and_comes_back_bfloat16():
    model = pruned().to(torch.bfloat16)
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    zeros = {name: W == 0 for name, W in block_weights(model).items()}
    _, record = run(model, steps=5, lr=1e-2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in model.named_buffers()} == buffers  # RoPE's float32 inv_freq untouched
    assert all(torch.all(block_weights(model)[name][z] == 0) for name, z in zeros.items())
    assert record.ppl_after < record.ppl_before

def test_thin_layers_of_a_low_rank_model_are_adapted():
    """A low-rank stage replaces a Linear by two thin ones (`down`, `up`): they are Linears like
    any other, adapted and merged in place, and the module tree is unchanged."""

    class Thin(nn.Module):
        def __init__(self, linear, k):
            super().__init__()
            self.down = nn.Linear(linear.in_features, k, bias=False)
            self.up = nn.Linear(k, linear.out_features, bias=False)

        def forward(self, x):
            return self.up(self.down(x))

    model = tiny_model("llama")
    for block in decoder_blocks(model):
        block.self_attn.q_proj = Thin(block.self_attn.q_proj, 4)
    model.requires_grad_(False)
    thin = model.model.layers[0].self_attn.q_proj
    down_before = thin.down.weight.clone()
    _, record = run(model, steps=3, lr=1e-2, rank=2, targets=[r"q_proj\.(down|up)$"])
    assert model.model.layers[0].self_attn.q_proj is thin and type(thin.down) is nn.Linear
    assert record.layers == 4 and record.trainable_params == 2 * (2 * (32 + 4) + 2 * (4 + 32))
    assert not torch.equal(thin.down.weight, down_before)


def test_same_seed_same_weights_and_global_rng_untouched():
    a, b = pruned(), pruned()
    rng = torch.get_rng_state()
    run(a, steps=5, lr=1e-2, dropout=0.1)
    run(b, steps=5, lr=1e-2, dropout=0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_without_validation_data_no_perplexity():
    _, record = run(pruned(), context(validation=False), steps=2)
    assert record.ppl_before is None and record.ppl_after is None
    assert "LoRA r8 2 steps" in record.summary()


# ---------------------------------------------------------------- per-block ranks


@pytest.mark.parametrize(
    "allocation,ranks",
    [
        ({"kind": "uniform"}, [4, 4, 4, 4]),
        ({"kind": "atp", "beta": 2.0}, [1, 3, 5, 7]),  # 4 + 2 (i - 1.5)
        ({"kind": "atp", "beta": 3.0}, [1, 3, 6, 9]),  # -0.5 clipped to 1; 2.5 and 5.5 round up
        ({"kind": "explicit", "ranks": [2, 2, 5, 7]}, [2, 2, 5, 7]),
    ],
)
def test_block_ranks(allocation, ranks):
    assert recover.block_ranks(RecoverConfig(rank=4, allocation=allocation), 4) == ranks


def test_per_block_ranks_reach_the_adapters():
    model = tiny_model("llama", layers=4)
    cfg = RecoverConfig(rank=4, alpha=8, allocation={"kind": "atp", "beta": 2.0})
    layers, _ = select_linears(model, cfg.targets, cfg.ignore, "stages[0]")
    ranks = recover.block_ranks(cfg, 4)
    with recover.lora_attached(model, recover.lora_config(cfg, layers, ranks)) as wrapped:
        inner = wrapped.get_base_model()
        for block, r in zip(layers, ranks):
            for name, module in block.items():
                lora = inner.get_submodule(name)
                assert lora.lora_A["default"].weight.shape == (r, module.in_features), name
                assert lora.lora_B["default"].weight.shape == (module.out_features, r), name
                assert lora.scaling["default"] == pytest.approx(8 / 4)  # alpha_i / r_i = alpha / rank
    assert not any("lora" in n for n, _ in model.named_modules())

    # through the stage: trainable parameters count r_i (in + out) per layer
    _, record = run(model, steps=2, rank=4, alpha=8, allocation={"kind": "explicit", "ranks": [1, 2, 3, 4]})
    per_rank = sum(m.in_features + m.out_features for m in layers[0].values())
    assert record.block_ranks == [1, 2, 3, 4] and record.trainable_params == (1 + 2 + 3 + 4) * per_rank


# ---------------------------------------------------------------- refusals


def test_quantised_layers_are_refused():
    model = tiny_model("llama")
    quantize.apply(model, context(), QuantizeConfig(method="rtn", bits=4, group_size=-1))
    with pytest.raises(CompressError, match=r"^stages\.targets: model\.layers\.0\.self_attn\.q_proj is already quantised; "
                                            r".*put the recover stage before quantize"):
        run(model, steps=2)


def test_explicit_ranks_length_is_checked():
    with pytest.raises(CompressError, match=r"stages\.allocation\.ranks: 3 entries, the model has 2 blocks"):
        run(tiny_model("llama"), steps=2, allocation={"kind": "explicit", "ranks": [1, 2, 3]})


def test_seqlen_longer_than_calibration_is_refused():
    with pytest.raises(CompressError, match=r"stages\.seqlen: 128 is longer than data\.calibration\.seqlen \(64\)"):
        run(tiny_model("llama"), steps=2, seqlen=128)


def test_atp_beta_auto_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - {kind: prune, sparsity: 0.5}\n  - kind: recover\n    allocation: {kind: atp, beta: auto}\n")
    with pytest.raises(CompressError, match=r"r\.yaml:4: stages\[1\]\.allocation\.beta: auto is not available for recover "
                                            r"\(each trial of a search would be a full training run\)"):
        load_recipe(path)


# ---------------------------------------------------------------- a recipe


def test_recipe_prune_then_recover(tmp_path, tiny_folder):
    out = tmp_path / "out"
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{source: {tiny_folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 8, seqlen: 32}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 32}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
        stages:
          - {{kind: prune, method: magnitude, sparsity: 0.6}}
          - {{kind: recover, steps: 30, lr: 1.0e-2, rank: 4, seqlen: 16}}
        output_dir: {out}
        """))
    result = engine.run(load_recipe(path), path)
    results = json.loads((out / "results.json").read_text())
    rec = results["stages"][1]
    assert rec["kind"] == "recover" and len(rec["losses"]) == 30 and rec["windows"] == 16
    assert rec["ppl_after"] < rec["ppl_before"]
    assert rec["zeros_kept"] == rec["zeros_before"] > 0
    assert results["size"]["block_linear_sparsity"] == pytest.approx(results["stages"][0]["achieved"])  # no zero lost
    report = (out / "report.md").read_text()
    assert "## Stage 1: recover (LoRA r4, uniform)" in report and "![training loss](stage1_loss.png)" in report
    assert (out / "stage1_loss.png").stat().st_size > 1000
    assert result.results["export"]["hf"]["parity"]["identical"] is True
