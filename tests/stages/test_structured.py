"""The structured stage on tiny random models: shapes, parameter counts, zeroing = removal,
bias compensation, allocation, reload from disk, and a chained recipe."""

import json
import textwrap

import pytest
import torch
from torch import nn

from compress.data.windows import Segments
from compress.errors import CompressError
from compress.export import hf
from compress.model import layout
from compress.model.anatomy import decoder_blocks
from compress.model.load import load_model
from compress.run import engine
from compress.run.recipe import load_recipe
from compress.stages import structured
from compress.stages.context import StageContext
from compress.stages.structured import StructuredConfig

from conftest import model_from_config, tiny_model


def segments(n=4, seqlen=32, seed=0, role="calibration"):
    g = torch.Generator().manual_seed(seed)
    return Segments(torch.randint(0, 256, (n, seqlen), generator=g), role, "random", (0.0, 1.0), n * seqlen)


def context():
    return StageContext(segments(), segments(2, seed=1, role="validation"))


def grouped_model(layers=4, arch="llama"):
    """8 query heads in 4 KV groups of 2, head_dim 8, 128 MLP channels."""
    return model_from_config(arch, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=8, num_hidden_layers=layers, vocab_size=256)


def run(model, **cfg):
    cfg.setdefault("channel_multiple", 8)
    return structured.apply(model, context(), StructuredConfig(**cfg))


def projection_params(model) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for block in decoder_blocks(model) for m in block.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3_text"])
def test_whole_kv_groups_and_channels_go_and_the_model_still_runs(arch):
    model = grouped_model(arch=arch)
    before = projection_params(model)
    tokens = torch.randint(0, 256, (1, 12))
    _, record = run(model, ratio=0.4, allocation={"kind": "explicit", "ratios": [0.2, 0.3, 0.5, 0.6]})
    assert record.params_before == before and record.params_after == projection_params(model)
    assert record.achieved == pytest.approx(1 - record.params_after / before)
    assert record.achieved == pytest.approx(0.4, abs=0.06)
    for block, kv, heads, channels in zip(decoder_blocks(model), record.block_kv_heads, record.block_heads, record.block_channels):
        attn, mlp = block.self_attn, block.mlp
        assert heads == 2 * kv and 1 <= kv <= 4  # whole groups: the query/KV ratio stays 2
        assert attn.q_proj.out_features == attn.o_proj.in_features == heads * 8
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv * 8
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == channels
        assert channels % 8 == 0
    assert record.block_channels[0] > record.block_channels[-1]  # more removed where the ratio is higher
    logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    generated = model.generate(tokens, max_new_tokens=4, do_sample=False)  # the KV cache takes per-block head counts
    assert generated.shape == (1, 16)


def test_zeroed_units_compute_exactly_what_the_sliced_model_computes():
    model = grouped_model()
    blocks = structured.find_blocks(model, [
        {f"model.layers.{i}.{p}": m for p, m in [(n, b.get_submodule(n)) for n in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]}
        for i, b in enumerate(decoder_blocks(model))])
    slots = structured.add_bias_slots(model, blocks)
    cfg = StructuredConfig(ratio=0.5, channel_multiple=8)
    structured.zero_model(model, context(), cfg, blocks, [0.5] * 4, slots)
    tokens = torch.randint(0, 256, (2, 16))
    zeroed = model(tokens).logits
    for block in blocks:
        structured.slice_block(model, block, slots)
    assert decoder_blocks(model)[0].self_attn.k_proj.out_features < 32
    torch.testing.assert_close(model(tokens).logits, zeroed, rtol=1e-5, atol=1e-5)


def mlp_error(compensate: bool) -> float:
    """Mean squared error of block 0's MLP output on its calibration inputs, after removing half its channels."""
    model = grouped_model(layers=2)
    inputs = []
    hook = decoder_blocks(model)[0].mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(segments().tokens)
    hook.remove()
    mlp = decoder_blocks(model)[0].mlp
    x = torch.cat(inputs)
    with torch.no_grad():
        expected = mlp(x)
        run(model, remove="channels", bias_compensation=compensate, allocation={"kind": "explicit", "ratios": [0.3, 0.0]})
        return float(((decoder_blocks(model)[0].mlp(x) - expected) ** 2).mean())


def test_bias_compensation_lowers_the_output_error_on_calibration_data():
    assert mlp_error(True) < mlp_error(False)


def test_bias_compensation_adds_biases_only_where_something_was_removed():
    model = grouped_model(layers=2)
    run(model, ratio=0.3, allocation={"kind": "explicit", "ratios": [0.6, 0.0]})
    first, second = decoder_blocks(model)
    assert first.mlp.down_proj.bias is not None and first.mlp.down_proj.bias.abs().sum() > 0
    assert second.mlp.down_proj.bias is None and second.self_attn.o_proj.bias is None
    assert second.mlp.down_proj.in_features == 128  # ratio 0: untouched


def test_atp_removes_more_from_deeper_blocks():
    model = grouped_model(layers=4)
    _, record = run(model, ratio=0.3, allocation={"kind": "atp", "beta": 0.1}, remove="channels")
    assert record.block_ratios == pytest.approx([0.15, 0.25, 0.35, 0.45], abs=1e-6)
    assert record.block_channels == sorted(record.block_channels, reverse=True)
    assert record.block_channels[0] > record.block_channels[-1]


def test_atp_beta_search_restores_the_weights_between_trials():
    model = grouped_model(layers=4)
    _, record = run(model, ratio=0.3, allocation={"kind": "atp", "beta": "auto", "trials": 3})
    assert len(record.search) == 3 and record.search[0]["beta"] == 0.0
    best = min(record.search, key=lambda t: (t["score"], t["beta"]))
    assert record.beta == best["beta"]
    # the model holds the chosen trial: its validation perplexity is the one the search scored
    from compress.blocks.forward import perplexity
    assert perplexity(model, segments(2, seed=1, role="validation").tokens).ppl == pytest.approx(best["score"], rel=1e-4)


@pytest.mark.parametrize("split", ["proportional", "adaptive"])
@pytest.mark.parametrize("metric", ["fluctuation", "wanda"])
def test_splits_and_metrics_hit_the_budget(split, metric):
    model = grouped_model(layers=2)
    _, record = run(model, ratio=0.35, split=split, metric=metric)
    assert record.achieved == pytest.approx(0.35, abs=0.05)


def test_a_structured_model_reloads_from_disk_with_identical_logits(tmp_path, tokenizer):
    model = grouped_model()
    run(model, ratio=0.4, allocation={"kind": "atp", "beta": 0.1})
    tokens = torch.randint(0, 256, (1, 12))
    expected = model(tokens).logits
    info = hf.save(model, tokenizer, tmp_path, hf.HfExport(), tmp_path)
    assert info["kind"] == "layout"
    shapes = layout.read(tmp_path)
    assert shapes["model.layers.3.self_attn.k_proj"]["out"] < 32
    reloaded = load_model(str(tmp_path)).model
    assert torch.equal(reloaded(tokens).logits, expected)


def test_blocks_without_separate_projections_are_refused():
    with pytest.raises(CompressError, match=r"stages\[0\]: structured pruning needs every projection.*q_proj"):
        structured.apply(tiny_model("gpt2"), StageContext(segments(), None, stage_key="stages[0]"), StructuredConfig(ratio=0.3))


def test_explicit_ratios_must_match_the_block_count():
    with pytest.raises(CompressError, match=r"allocation.ratios: 3 entries, the model has 4 blocks"):
        run(grouped_model(), allocation={"kind": "explicit", "ratios": [0.1, 0.2, 0.3]})


def test_ratio_is_required():
    with pytest.raises(ValueError, match="ratio is required"):
        StructuredConfig()


def test_structured_then_prune_then_quantize_in_one_recipe(tmp_path, tokenizer):
    folder = tmp_path / "model"
    grouped_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    path = tmp_path / "chain.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: chain
        model: {{source: {folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 32}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
        stages:
          - {{kind: structured, ratio: 0.3, channel_multiple: 8, allocation: {{kind: atp, beta: 0.05}}}}
          - {{kind: prune, method: wanda, sparsity: 0.5}}
          - {{kind: quantize, method: gptq, bits: 4, group_size: 16}}
        output_dir: {out}
        """))
    engine.run(load_recipe(path), path, [], False)
    results = json.loads((out / "results.json").read_text())
    kinds = [s["kind"] for s in results["stages"]]
    assert kinds == ["structured", "prune", "quantize"]
    assert results["stages"][0]["achieved"] == pytest.approx(0.3, abs=0.06)
    assert results["stages"][1]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert results["stages"][2]["zeros_kept"] == results["stages"][2]["zeros_before"]
    assert results["export"]["hf"]["parity"]["identical"] is True  # reloaded from model.layout.safetensors
    assert (out / layout.LAYOUT_FILE).is_file()
    reloaded = load_model(str(out)).model
    assert decoder_blocks(reloaded)[3].mlp.down_proj.in_features == results["stages"][0]["block_channels"][3]
