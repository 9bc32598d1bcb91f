"""model.stream: blocks materialised one at a time from disk give exactly the in-memory run's
weights; peak memory follows the block, not the block count; a run killed with SIGKILL resumes
and writes the same files as a run that was never interrupted."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from compress.blocks.checkpoints import KILL_AFTER
from compress.blocks.sources import WeightSource
from compress.errors import CompressError
from compress.run import engine
from compress.run.recipe import load_recipe

from conftest import build_tokenizer, model_from_config, needs_converter, needs_default_model


def save_model(folder, arch="llama", layers=4, hidden=64, intermediate=128, seed=0, generation_config=True):
    model_from_config(arch, seed, vocab_size=320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False).save_pretrained(folder)
    build_tokenizer(300).save_pretrained(folder)
    if not generation_config:  # as a checkpoint written shard by shard has none (benchmarks/stream_memory.py)
        (folder / "generation_config.json").unlink()
    return folder


STAGES = """\
  - {kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: auto, trials: 3}}
  - {kind: prune, method: sparsegpt, sparsity: 0.6, allocation: {kind: alpha}}
  - {kind: prune, method: magnitude, sparsity: 0.7, allocation: {kind: atp, beta: 0.05}}
"""


def write_recipe(path, source, out, stages=STAGES, stream=True, nsamples=4, extra=""):
    path.write_text(extra + textwrap.dedent(f"""\
        model: {{source: {source}, stream: {str(stream).lower()}}}
        data:
          calibration: {{source: python-docs, nsamples: {nsamples}, seqlen: 32}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 32}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
        output_dir: {out}
        stages:
        """) + stages)
    return path


def weights(folder) -> dict[str, torch.Tensor]:
    source = WeightSource(folder)
    return {name: source.get(name) for name in source.files}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_run_equals_the_in_memory_run(tmp_path, arch):
    source = save_model(tmp_path / "model", arch)
    results = {}
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stream=stream)
        engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())
    mem, streamed = weights(tmp_path / "out-False"), weights(tmp_path / "out-True")
    assert set(mem) == set(streamed) and all(torch.equal(mem[k], streamed[k]) for k in mem)
    assert len(list((tmp_path / "out-True").glob("model-*.safetensors"))) == 5  # one shard per block + the rest
    for key in ("dense", "compressed"):
        assert results[True]["perplexity"][key]["ppl"] == pytest.approx(results[False]["perplexity"][key]["ppl"], rel=1e-5)
    assert [s["block_achieved"] for s in results[True]["stages"]] == [s["block_achieved"] for s in results[False]["stages"]]
    assert results[True]["size"] == results[False]["size"]
    block_tensors = sum(".layers." in k for k in mem)  # 9 per llama block; qwen2 adds q/k/v biases
    assert results[True]["export"]["hf"]["weights"] == {"tensors": block_tensors, "identical": True}
    assert not list(tmp_path.glob(".out-True.resume-*"))  # the checkpoints went with the finished run


def files_digest(folder) -> dict[str, str]:
    """sha256 of every output file but the ones carrying times (results, metadata, report)."""
    skip = {"results.json", "metadata.json", "report.md"}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def run_cli(recipe, *args, env=None, quiet=True):
    return subprocess.run([sys.executable, "-m", "compress", "run", str(recipe), *(["-q"] if quiet else []), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


KILLED = """\
  - {kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: 0.05}}
  - {kind: prune, method: sparsegpt, sparsity: 0.6, allocation: {kind: alpha}}
  - {kind: quantize, method: gptq, bits: 4, group_size: 32}
"""


@pytest.mark.parametrize("stream", [True, False])
def test_a_run_killed_with_sigkill_resumes_to_identical_files(tmp_path, stream):
    """Killed half-way through a stage (pruning, then GPTQ), streamed or in memory, the same
    command resumes where the checkpoint is and writes the same bytes."""
    source = save_model(tmp_path / "model")
    whole = write_recipe(tmp_path / "whole.yaml", source, tmp_path / "whole", stages=KILLED, stream=stream)
    assert run_cli(whole).returncode == 0
    assert json.loads((tmp_path / "whole" / "results.json").read_text())["export"]["hf"]["kind"] == "gptq"
    killed = write_recipe(tmp_path / "killed.yaml", source, tmp_path / "killed", stages=KILLED, stream=stream)
    # killed after block 1 of the second stage: the first stage is finished, the second half way
    first = run_cli(killed, env={KILL_AFTER: "1:1"})
    assert first.returncode == -9, first.stderr[-2000:]
    assert not (tmp_path / "killed").exists()
    staging = list(tmp_path.glob(".killed.resume-*"))
    assert len(staging) == 1 and (staging[0] / ".blocks" / "stage0.done").is_file()
    second = run_cli(killed, env={KILL_AFTER: "2:2"}, quiet=False)  # resumed, then killed again inside GPTQ
    assert second.returncode == -9, second.stderr[-2000:]
    assert "resuming stage 1 pass 1 at block 2" in second.stderr
    third = run_cli(killed, quiet=False)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "stage 1 (prune) finished in an earlier run" in third.stderr and "resuming stage 2 pass 1 at block 3" in third.stderr
    assert files_digest(tmp_path / "killed") == files_digest(tmp_path / "whole")
    assert not list(tmp_path.glob(".killed.resume-*"))
    if stream:  # --restart throws a checkpoint away
        assert run_cli(killed, "--overwrite", env={KILL_AFTER: "1:2"}).returncode == -9
        assert run_cli(killed, "--overwrite", "--restart").returncode == 0
        assert files_digest(tmp_path / "killed") == files_digest(tmp_path / "whole")


def test_streamed_gptq_equals_the_in_memory_gptq_file_for_file(tmp_path):
    """ATP-allocated GPTQ widths after a Wanda prune, streamed and in memory: the same GPTQ
    checkpoint byte for byte, written block by block in both (generation_config.json included,
    from a source that has none: the 2.5 B benchmark's first comparison differed there)."""
    source = save_model(tmp_path / "model", generation_config=False)
    stages = """\
  - {kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: auto, trials: 3}}
  - {kind: quantize, method: gptq, bits: 4, group_size: 32, allocation: {kind: atp, beta: auto, trials: 3}}
"""
    results = {}
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stages=stages, stream=stream)
        engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())
    assert files_digest(tmp_path / "out-True") == files_digest(tmp_path / "out-False")
    quantize = {s: r["stages"][1] for s, r in results.items()}
    assert quantize[True]["block_bits"] == quantize[False]["block_bits"] and quantize[True]["zeros_kept"] == quantize[True]["zeros_before"] > 0
    assert results[True]["perplexity"]["compressed"]["ppl"] == pytest.approx(results[False]["perplexity"]["compressed"]["ppl"], rel=1e-5)
    assert results[True]["export"]["hf"]["weights"]["identical"] and results[True]["export"]["hf"]["weights"]["layers"] == 4 * 7
    assert results[False]["export"]["hf"]["parity"]["checked"]  # in memory, the folder is also reloaded in transformers


def test_a_streamed_grid_run_keeps_its_blocks_for_the_gguf_export(tmp_path):
    """Block formats chosen while streaming travel in the block files to the HF folder's grid file."""
    source = save_model(tmp_path / "model")
    stages = "  - {kind: quantize, method: rtn, grid: q4_0}\n"
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stages=stages, stream=stream)
        engine.run(load_recipe(path), path)
    grids = [tmp_path / f"out-{s}" / "ggml_grids.safetensors" for s in (False, True)]
    assert grids[0].read_bytes() == grids[1].read_bytes()
    mem, streamed = weights(tmp_path / "out-False"), weights(tmp_path / "out-True")
    assert set(mem) == set(streamed) and all(torch.equal(mem[k], streamed[k]) for k in mem)


def peak_rss(tmp_path, layers: int, stream: bool) -> float:
    source = tmp_path / f"model-{layers}"
    if not source.exists():
        save_model(source, layers=layers, hidden=512, intermediate=2048)  # 16.8 MB of float32 per block
    path = write_recipe(tmp_path / f"r-{layers}-{stream}.yaml", source, tmp_path / f"out-{layers}-{stream}",
                        stages="  - {kind: prune, method: wanda, sparsity: 0.5}\n", stream=stream, nsamples=2)
    done = run_cli(path, "--set", "export.check=false")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp_path / f"out-{layers}-{stream}" / "metadata.json").read_text())["peak_rss_mb"]


def test_peak_memory_follows_the_block_not_the_block_count(tmp_path):
    streamed = {n: peak_rss(tmp_path, n, True) for n in (4, 16)}
    in_memory = {n: peak_rss(tmp_path, n, False) for n in (4, 16)}
    # 12 more blocks are 200 MB of float32: the in-memory run holds them (the measurement can see
    # it), the streamed one holds one block at a time
    assert in_memory[16] - in_memory[4] > 120, in_memory
    assert streamed[16] - streamed[4] < 60, streamed


# the structured search's trials calibrate on 2 of the 4 windows (the chosen beta then on all 4);
# the low-rank one's on all 4 (its best trial kept as it is)
RESHAPED = """\
  - {kind: structured, ratio: 0.25, allocation: {kind: atp, beta: auto, trials: 3, trial_samples: 2}, channel_multiple: 8}
  - {kind: lowrank, method: asvd, ratio: 0.3, residual_sparsity: 0.9, residual_iterations: 2, allocation: {kind: atp, beta: auto, trials: 3}}
  - {kind: quantize, method: gptq, bits: 4, group_size: 32}
"""


def layout_weights(folder) -> dict[str, torch.Tensor]:
    from compress.model import layout

    out = {}
    for path in layout.weight_files(folder):
        with safe_open(path, "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def test_streamed_structured_and_lowrank_equal_the_in_memory_run(tmp_path):
    """Narrowed blocks, then low-rank modules, each with a beta search, then GPTQ: streamed block
    by block (each block finished as it leaves memory, its layout in its file), the same tensors,
    records and measurements as in memory; the streamed layout folder is one shard per block."""
    source = save_model(tmp_path / "model")
    results = {}
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stages=RESHAPED, stream=stream)
        engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())
    mem, streamed = layout_weights(tmp_path / "out-False"), layout_weights(tmp_path / "out-True")
    assert set(mem) == set(streamed) and all(torch.equal(mem[k], streamed[k]) for k in mem)
    assert any(k.endswith("q_proj.down.weight") for k in mem) and any(k.endswith("proj.up.bias") for k in mem)  # compensated biases, on the low-rank modules
    assert len(list((tmp_path / "out-True").glob("model.layout-*.safetensors"))) == 5
    assert (tmp_path / "out-True" / "layout.json").read_text() == (tmp_path / "out-False" / "layout.json").read_text()
    for k in range(3):
        a, b = results[False]["stages"][k], results[True]["stages"][k]
        assert {key: v for key, v in a.items() if key not in ("seconds", "search")} == \
            {key: v for key, v in b.items() if key not in ("seconds", "search")}, k
        # a streamed trial is scored on finished blocks (narrowed: fewer terms in each sum), a
        # resident one on zeroed ones: the same numbers up to float summation order
        assert [t["score"] for t in b.get("search") or []] == pytest.approx([t["score"] for t in a.get("search") or []], rel=1e-6)
    structured, lowrank = results[True]["stages"][0], results[True]["stages"][1]
    assert {t["calibration_windows"] for t in structured["search"]} == {2} and {t["calibration_windows"] for t in lowrank["search"]} == {None}
    assert len(set(structured["block_channels"])) > 1 and 0 < lowrank["achieved"] < 1
    assert results[True]["perplexity"]["compressed"]["ppl"] == pytest.approx(results[False]["perplexity"]["compressed"]["ppl"], rel=1e-5)
    assert results[True]["size"] == results[False]["size"]
    assert results[True]["export"]["hf"]["kind"] == "layout" and results[True]["export"]["hf"]["weights"]["identical"]
    # the folder loads as the in-memory one's does
    from compress.model import layout
    reloaded = layout.load(tmp_path / "out-True")
    assert all(torch.equal(t, mem[k]) for k, t in reloaded.state_dict().items() if k in mem)


def test_a_restructured_folder_streams_as_it_loads_in_memory(tmp_path):
    """An earlier run's layout folder (narrowed, low-rank; sharded when it was streamed) is a
    source a streamed run reads block by block: the same pruned tensors as in memory."""
    source = save_model(tmp_path / "model")
    first = write_recipe(tmp_path / "first.yaml", source, tmp_path / "first",
                         stages="  - {kind: structured, ratio: 0.25, channel_multiple: 8}\n  - {kind: lowrank, ratio: 0.2}\n")
    engine.run(load_recipe(first), first)
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", tmp_path / "first", tmp_path / f"out-{stream}",
                            stages="  - {kind: prune, method: wanda, sparsity: 0.5}\n", stream=stream)
        engine.run(load_recipe(path), path)
    mem, streamed = layout_weights(tmp_path / "out-False"), layout_weights(tmp_path / "out-True")
    assert set(mem) == set(streamed) == set(layout_weights(tmp_path / "first"))
    assert all(torch.equal(mem[k], streamed[k]) for k in mem)
    assert any(k.endswith("down_proj.up.weight") and (mem[k] == 0).float().mean() >= 0.45 for k in mem)


@pytest.mark.parametrize("stream, kill", [(True, "1:2"), (True, "2:1"), (False, "1:2"), (False, "2:1")])
def test_a_run_killed_inside_a_reshaping_stage_or_after_it_resumes_to_identical_files(tmp_path, stream, kill):
    """Killed inside the low-rank pass (blocks before the kill are low-rank files, the ones after
    still narrowed) or inside GPTQ after both: the blocks take their files' layouts again (a
    streamed skeleton on meta, a resident model's modules) and the run ends with the same files."""
    source = save_model(tmp_path / "model")
    stages = RESHAPED.replace("beta: auto, trials: 3", "beta: 0.02")
    whole = write_recipe(tmp_path / "whole.yaml", source, tmp_path / "whole", stages=stages, stream=stream)
    assert run_cli(whole).returncode == 0
    killed = write_recipe(tmp_path / "killed.yaml", source, tmp_path / "killed", stages=stages, stream=stream)
    assert run_cli(killed, env={KILL_AFTER: kill}).returncode == -9
    resumed = run_cli(killed, quiet=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stage, block = kill.split(":")
    assert f"resuming stage {stage} pass 1 at block {int(block) + 1}" in resumed.stderr
    assert files_digest(tmp_path / "killed") == files_digest(tmp_path / "whole")


def test_a_streamed_lowrank_stage_after_quantize_is_refused_when_it_reads_the_grid(tmp_path):
    source = save_model(tmp_path / "model")
    stages = "  - {kind: quantize, method: rtn, bits: 4, group_size: 32}\n  - {kind: lowrank, ratio: 0.2}\n"
    path = write_recipe(tmp_path / "r.yaml", source, tmp_path / "out", stages=stages)
    with pytest.raises(CompressError, match=r"stages\[1\]: model.layers.0.self_attn.q_proj is quantised already"):
        engine.run(load_recipe(path), path)


@pytest.mark.parametrize("change, message", [
    ("stages.0={kind: recover}", "model.stream does not run recover"),
    ("stages.0={kind: quantize, method: bnb}", "bnb is not streamed"),
    ("export.onnx=true", "a streamed model is not exported to ONNX"),
    ("eval.artefacts=[model, hf]", "the HF folder is not reloaded whole"),
])
def test_what_a_streamed_run_cannot_do_yet_is_refused_before_it_starts(tmp_path, change, message):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "out", stages="  - {kind: prune, method: wanda, sparsity: 0.5}\n")
    overrides = [change, "eval.tasks_dir=."] if "tasks" in change else [change]
    with pytest.raises(CompressError, match=message):
        load_recipe(path, overrides)


def test_a_streamed_model_runs_whole_forwards_from_its_block_files(tmp_path):
    """devices.dispatched on a streamed model: accelerate's disk offload reads each block from its
    file for its forward (a block still the source's is written once first): the logits are the
    in-memory model's, bit for bit, and the blocks are back on the meta device after."""
    from transformers import AutoModelForCausalLM

    from compress.blocks import devices
    from compress.blocks.sources import load_streamed

    source = save_model(tmp_path / "model")
    model, _, _ = load_streamed(str(source), torch.float32, tmp_path / "staging")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    expected = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(ids).logits
    with devices.dispatched(model) as device:
        assert device.type == "cpu"
        assert torch.equal(model(ids).logits, expected)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert len(list((tmp_path / "staging" / ".blocks" / "source").glob("block?????.safetensors"))) == 4


@pytest.mark.parametrize("stages", [
    "  - {kind: prune, method: wanda, sparsity: 0.5}\n  - {kind: quantize, method: gptq, bits: 4, group_size: 32}\n",
    "  - {kind: structured, ratio: 0.25, channel_multiple: 8}\n  - {kind: lowrank, ratio: 0.2}\n",
], ids=["sparse-gptq", "narrowed-lowrank"])
def test_a_streamed_run_scores_zero_shot_tasks_as_the_in_memory_run_does(tmp_path, stages):
    """lm-eval scores a streamed model through accelerate's disk offload over the block files
    (each block read for its forward, its modules as the file lays them out): the same
    accuracies, dense and compressed, as in memory."""
    from zeroshot_items import write_data

    (tmp_path / "tasks").mkdir()
    source, data = save_model(tmp_path / "model"), write_data(tmp_path / "tasks")
    results = {}
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stages=stages, stream=stream,
                            extra=f"eval: {{tasks: [piqa, arc_easy], tasks_dir: {data}, dense: true}}\n")
        engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())["zero_shot"]
    for which in ("dense", "compressed"):
        streamed, in_memory = results[True][which], results[False][which]
        assert {t: r["n"] for t, r in streamed["tasks"].items()} == {"piqa": 3, "arc_easy": 3}  # every item
        for task in ("piqa", "arc_easy"):
            assert streamed["tasks"][task]["acc"] == in_memory["tasks"][task]["acc"]
            assert streamed["tasks"][task]["acc_norm"] == in_memory["tasks"][task]["acc_norm"]


def test_a_hub_id_is_not_streamed(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "some-org/some-model", tmp_path / "out", stages="  - {kind: prune, method: magnitude, sparsity: 0.5}\n")
    with pytest.raises(CompressError, match="some-org/some-model is a hub id. Download it to a folder first"):
        engine.run(load_recipe(path), path)


@needs_default_model
def test_a_gguf_file_streams_the_tensors_transformers_loads():
    """Each tensor dequantised from the memory-mapped file on its own equals what transformers
    loads with the whole file (q/k rows back in Hugging Face's rope order)."""
    from compress.blocks.sources import GgufWeightSource
    from compress.model.load import load_model, resolve_registered

    model = load_model("smollm2-135m").model
    source = GgufWeightSource(resolve_registered("smollm2-135m"), model)
    state = model.state_dict()
    assert len(source.files) == len(state) - 1  # the tied head is the embedding, not a tensor of the file
    for name, tensor in source.files.items():
        assert torch.equal(source.get(name), state[name]), name


@needs_converter
def test_a_streamed_run_from_a_gguf_file_equals_the_in_memory_run(tmp_path, spm_tokenizer):
    """A tiny Llama with Llama 2's tokenizer written as a Q8_0 GGUF by llama.cpp's converter and
    quantizer (q/k rows permuted, matrices quantised)."""
    from compress.export import gguf as gguf_export

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: its quantizer writes the Q8_0 file")
    model = model_from_config("llama", 0, vocab_size=len(spm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    gguf_export.save(model, spm_tokenizer, tmp_path / "g", gguf_export.GgufExport(types=["q8_0"]), tmp_path / "scratch")
    source = tmp_path / "g" / "model-q8_0.gguf"
    results = {}
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stream=stream)
        engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())
    for key in ("dense", "compressed"):
        assert results[True]["perplexity"][key]["ppl"] == pytest.approx(results[False]["perplexity"][key]["ppl"], rel=1e-5)
    streamed, in_memory = weights(tmp_path / "out-True"), weights(tmp_path / "out-False")
    assert set(streamed) == set(in_memory)
    for name, tensor in in_memory.items():
        assert torch.equal(streamed[name], tensor), name


@needs_converter
def test_a_streamed_run_writes_the_same_gguf_files_block_by_block(tmp_path, vocab_folder):
    """A tiny Llama 3 (its real byte-level BPE tokenizer, a head tied to the embeddings): Wanda,
    then GPTQ 4-bit in groups of 32 (Q4_0's grid), exported to GGUF f16 and q4_0 (GPTQ's blocks
    written as they are) with every check on, llama.cpp's included: the streamed run's files are
    the in-memory run's, byte for byte."""
    import families

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: its quantizer writes the q4_0 file, and it runs the check")
    family = families.BY_NAME["Llama 3"]
    source = families.family_folder(family, vocab_folder(family.vocab).parent, tmp_path / "model", hidden=64, layers=4)
    stages = """\
  - {kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: 0.05}}
  - {kind: quantize, method: gptq, bits: 4, group_size: 32}
"""
    results, linked = {}, []
    link = os.link

    def recording_link(src, dst):
        linked.append((str(src), str(dst)))
        return link(src, dst)

    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stages=stages, stream=stream,
                            extra="export: {hf: true, gguf: {types: [f16, q4_0]}}\n")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "link", recording_link)
            engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())
    # the streamed converter folder is the quantize stage's block files, hard-linked (their
    # quantisation states sit beside them, or the converter would meet tensors it cannot map)
    assert [s.rsplit("/", 2)[-2:] for s, _ in linked] == [["stage1", f"block{i:05d}.safetensors"] for i in range(4)]
    gguf = {s: {f.name: f.read_bytes() for f in (tmp_path / f"out-{s}" / "gguf").glob("*.gguf")} for s in (False, True)}
    assert set(gguf[True]) == {"model-f16.gguf", "model-q4_0.gguf"} and gguf[True] == gguf[False]
    assert files_digest(tmp_path / "out-True") == files_digest(tmp_path / "out-False")
    streamed = results[True]["export"]["gguf"]
    assert streamed["files"]["q4_0"]["grid_matrices"] == 4 * 7 and streamed["files"]["q4_0"]["zeros_kept"] == 1.0
    assert streamed["weights"]["q4_0"] == {"tensors": 4 * 7, "identical": True}
    assert streamed["checked"] and set(streamed["files_checked"]) == {"f16", "q4_0"}
    for kind in ("f16", "q4_0"):  # llama.cpp's logits against the block-by-block reference, as against the whole model's
        ours, theirs = streamed["files_checked"][kind], results[False]["export"]["gguf"]["files_checked"][kind]
        assert ours == theirs


def test_a_streamed_restructured_run_writes_the_same_gguf_files(tmp_path, vocab_folder):
    """Narrowed blocks (a different width per block: padded for the converter, then cut back) and
    low-rank modules (their dense products) go into GGUF block by block from a streamed model:
    the same files as the in-memory run's, checked in llama.cpp."""
    import families

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: it runs the check")
    family = families.BY_NAME["Llama 3"]
    source = families.family_folder(family, vocab_folder(family.vocab).parent, tmp_path / "model", hidden=64, layers=4)
    stages = """\
  - {kind: structured, ratio: 0.25, allocation: {kind: atp, beta: 0.05}, channel_multiple: 8, bias_compensation: false}
  - {kind: lowrank, method: asvd, ratio: 0.2, allocation: {kind: atp, beta: 0.05}}
"""
    results = {}
    for stream in (False, True):
        path = write_recipe(tmp_path / f"r{stream}.yaml", source, tmp_path / f"out-{stream}", stages=stages, stream=stream,
                            extra="export: {hf: true, gguf: {types: [f32]}}\n")
        engine.run(load_recipe(path), path)
        results[stream] = json.loads((tmp_path / f"out-{stream}" / "results.json").read_text())
    gguf = {s: (tmp_path / f"out-{s}" / "gguf" / "model-f32.gguf").read_bytes() for s in (False, True)}
    assert gguf[True] == gguf[False]
    assert len(set(results[True]["stages"][0]["block_channels"])) > 1
    streamed = results[True]["export"]["gguf"]
    assert streamed["checked"] and streamed["files_checked"]["f32"] == results[False]["export"]["gguf"]["files_checked"]["f32"]
    assert streamed["files_checked"]["f32"]["top1_agreement"] == 1.0


def test_tensor_files_are_read_by_safetensors_with_their_metadata(tmp_path):
    """compress/model/tensor_files.py writes from the tensors' memory; safetensors reads every dtype back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from compress.model import tensor_files

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(5, dtype=torch.int32),
               "empty": torch.zeros(0), "h": torch.ones(2, 2).half(), "view": torch.randn(4, 6).t()}
    tensor_files.save(tensors, tmp_path / "x.safetensors", {"format": "pt", "note": "kept"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert safe_open(tmp_path / "x.safetensors", "pt").metadata() == {"format": "pt", "note": "kept"}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_streamed_run_whose_export_check_failed_resumes_over_the_shards_it_linked(tmp_path, monkeypatch):
    """The HF folder's block shards are hard links to the block files; a run whose export check
    failed keeps its staging folder, and running the recipe again writes the export over those
    links (os.link refused the existing name, and the copy fallback then found the same file)."""
    import dataclasses

    from compress import export

    source = save_model(tmp_path / "model", layers=2)
    path = write_recipe(tmp_path / "r.yaml", source, tmp_path / "out", stages="  - {kind: prune, method: magnitude, sparsity: 0.5}\n")
    hf = export.EXPORTERS["hf"]

    def failing(*args):
        raise CompressError("export check failed: on purpose")

    monkeypatch.setitem(export.EXPORTERS, "hf", dataclasses.replace(hf, check=failing))
    with pytest.raises(CompressError, match="on purpose"):
        engine.run(load_recipe(path), path, [])
    assert len(list(tmp_path.glob(".out.resume-*"))) == 1
    monkeypatch.setitem(export.EXPORTERS, "hf", hf)
    engine.run(load_recipe(path), path, [])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["export"]["hf"]["weights"] == {"tensors": 18, "identical": True}
