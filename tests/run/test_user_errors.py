"""Everything a user can type wrong: each is one line naming the key, file or flag, exit status 2,
no traceback; and every combination of eval switches runs and writes a report."""

import sys
import textwrap

import pytest

from compress.cli import main
from compress.errors import CompressError
from compress.run import engine
from compress.run.recipe import load_recipe


def run_cli(monkeypatch, capsys, *args):
    """compress ARGS in this process: (exit status, stdout, the last line of stderr), after
    checking that stderr holds one error line and no traceback."""
    capsys.readouterr()  # drop what fixtures printed
    monkeypatch.setattr(sys, "argv", ["compress", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("error:") <= 1, err
    return exit.value.code, out, err.strip().splitlines()[-1] + "\n" if err.strip() else ""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def places(tmp_path, tiny_folder):
    """Paths a recipe can point at wrongly."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("{}\n")
    return {"model": tiny_folder, "file": a_file, "dir": empty_dir, "out": tmp_path / "out", "recipe": recipe}


# Each case: the recipe body (formatted with `places`) and the one-line message expected.
RECIPE_CASES = [
    ("name: [1]", "name: Input should be a valid string"),
    ("seed: x", "seed: Input should be a valid integer"),
    ("threads: 0", "threads: Input should be greater than 0 (got 0)"),
    ("calibration_dtype: fp8", "calibration_dtype: Input should be 'float32' or 'bfloat16' (got 'fp8')"),
    ("model: {{source: '{model}', dtype: int8}}", "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("model: {{source: '{model}', device: banana}}", "model.device: device must be cpu, cuda, cuda:N or auto (got 'banana')"),
    ("model: {{source: '{model}', allow_pickle: maybe}}", "model.allow_pickle: Input should be a valid boolean"),
    ("model: {{source: '{file}'}}", "is a file but not a .gguf"),
    ("model: {{source: '{dir}'}}", "has no config.json"),
    ("model: {{source: '{dir}/nope'}}", "does not exist"),
    ("data: {{calibration: {{nsamples: 0}}}}", "data.calibration.nsamples: Input should be greater than 0"),
    ("data: {{calibration: {{seqlen: 1}}}}", "data.calibration.seqlen: Input should be greater than 1"),
    ("data: {{calibration: {{bos: sometimes}}}}", "data.calibration.bos"),
    ("data: {{calibration: {{source: '{dir}'}}}}", "data.calibration.source: {dir} is a folder"),
    ("data: {{evaluation: {{source: '{dir}/none.txt'}}}}", "data.evaluation.source: {dir}/none.txt not found"),
    ("data: {{calibration: {{source: '{model}/config.json'}}}}", "unknown file type '.json'"),
    ("data: {{calibration: {{seqlen: 4096}}}}", "data.calibration.seqlen: 4096 is beyond the model's context length (2048 tokens)"),
    ("stages: [{{kind: prune, method: obs, sparsity: 0.5}}]", "stages[0].method: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
    ("stages: [{{kind: prune, sparsity: 1.5}}]", "stages[0].sparsity: Input should be less than 1 (got 1.5)"),
    ("stages: [{{kind: prune, pattern: '5:4'}}]", "stages[0].pattern: pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got '5:4'"),
    ("stages: [{{kind: prune, sparsity: 0.5, allocation: {{kind: best}}}}]", "stages[0].allocation"),
    ("stages: [{{kind: prune, sparsity: 0.5, allocation: {{kind: atp, beta: -1}}}}]", "beta must be >= 0 or 'auto', got -1"),
    ("stages: [{{kind: prune, sparsity: 0.5, allocation: {{kind: atp, trials: 1}}}}]", "stages[0].allocation.trials: Input should be greater than or equal to 2"),
    ("stages: [{{kind: prune, sparsity: 0.5, allocation: {{kind: explicit, ratios: [0.5]}}}}]", "stages[0].allocation.ratios: 1 entries, the model has 2 blocks"),
    ("stages: [{{kind: prune, sparsity: 0.5, scope: column}}]", "stages[0].scope: Input should be 'row' or 'matrix'"),
    ("stages: [{{kind: prune, sparsity: 0.5, targets: ['(']}}]", "stages[0].targets: bad regular expression '('"),
    ("stages: [{{kind: prune, sparsity: 0.5, targets: [attention]}}]", "stages[0].targets/ignore select no Linear layer"),
    ("stages: [{{kind: prune, sparsity: 0.5, ignore: [mlp, attn]}}]", "stages[0].targets/ignore select no Linear layer"),
    ("stages: [{{kind: prune, pattern: '3:5'}}]", "stages[0].pattern: 3:5 needs in_features divisible by 5; model.layers.0.self_attn.q_proj has 32"),
    ("data: {{evaluation: {{source: python-docs, nsamples: 100000}}}}", "data.evaluation: source 'python-docs' gives this role"),
    ("data: {{calibration: {{bos: true}}}}", "data.calibration.bos: true, but the tokenizer has no BOS token"),
    ("stages: [{{kind: quantize, bits: 5}}]", "stages[0]: bits must be one of 2, 3, 4, 8, got 5"),
    ("stages: [{{kind: quantize, method: bnb, format: nf5}}]", "stages[0].format: Input should be 'nf4', 'fp4' or 'int8'"),
    ("stages: [{{kind: quantize, allocation: {{kind: explicit, bits: [4, 4, 4]}}}}]", "stages[0].allocation.bits: 3 entries, the model has 2 blocks"),
    ("stages: [{{kind: quantize, allocation: {{kind: explicit, bits: [4, 5]}}}}]", "stages[0].allocation.bits[1]: Input should be 2, 3, 4 or 8"),
    ("stages: [{{kind: quantize, allocation: {{kind: owl}}}}]", "stages[0].allocation"),
    ("stages: [{{kind: quantize, bits: 3, allocation: {{kind: atp, beta: 3}}}}]", "stages[0].allocation.beta: atp: beta=3.0 gives bit-widths outside [2, 8]; with L=2 blocks and mean 3.0 bits beta must be in [0, 2]"),
    ("stages: [{{kind: quantize, method: gptq}}]", "export.hf: model.layers.0.self_attn.k_proj is 16x32; the GPTQ format needs both sides divisible by 32"),
    ("model: {{source: '{model}', device: cuda}}", "model.device: 'cuda' asked for, but this torch"),
    ("model: {{source: '{model}', device: auto}}", "model.device: 'auto' asked for, but this torch"),
    ("stages: [{{kind: prune, sparsity: 0.5, blocksize: 0}}]", "stages[0].blocksize: Input should be greater than 0"),
    ("stages: [{{kind: prune, sparsity: 0.5, dampening: 0}}]", "stages[0].dampening: Input should be greater than 0"),
    ("stages: [{{kind: distill}}]", "stages[0]: Input tag 'distill' found using 'kind' does not match"),
    ("stages: {{kind: prune}}", "stages: Input should be a valid list"),
    ("eval: {{perplexity: maybe}}", "eval.perplexity: Input should be a valid boolean"),
    ("eval: {{batch_size: 0}}", "eval.batch_size: Input should be greater than 0"),
    ("eval: {{tasks: [piqa, mmlu]}}", "eval: tasks_dir is required with the local tasks ['piqa']"),
    ("eval: {{artefacts: [gguf]}}", "eval.artefacts: 'gguf' is evaluated after export, but export.gguf is off"),
    ("eval: {{tasks: [piqa], tasks_dir: '{file}'}}", "eval.tasks_dir: {file} is not a folder"),
    ("eval: {{tasks: [piqa], tasks_dir: '{dir}'}}", "eval.tasks_dir: {dir}/piqa.jsonl not found (needed by task piqa)"),
    ("eval: {{limit: 0}}", "eval.limit: Input should be greater than 0"),
    ("export: {{hf: x}}", "export.hf: expected true, false or the exporter's settings (a mapping), got 'x'"),
    ("export: {{hf: {{format: compressed}}}}", "export.hf.format: Input should be 'dense' or 'sparse'"),
    ("stages: [{{kind: quantize, method: rtn}}]\nexport: {{hf: {{format: sparse}}}}", "export.hf.format: sparse stores unquantised tensors"),
    ("export: {{gguf: {{types: [q5_9]}}}}", "export.gguf.types[0]: Input should be 'f32', 'f16'"),
    ("export: {{gguf: {{types: [f16, f16]}}}}", "export.gguf.types: each type once"),
    ("export: {{gguf: {{types: []}}}}", "export.gguf.types: List should have at least 1 item"),
    # ambiguous recipes: a key given twice (the second used to win silently), a grid file without grids
    ("stages: [{{kind: prune, sparsity: 0.5, sparsity: 0.9}}]", ":3: stages[0].sparsity: the key is given twice (first on line 3); keep one"),
    ("export: {{gguf: {{types: [grid]}}}}", ":3: export.gguf.types: grid writes the llama.cpp block formats a quantize stage put"),
    ("stages: [{{kind: quantize, bits: 4, group_size: 128}}]\nexport: {{gguf: {{types: [grid]}}}}", ":4: export.gguf.types: grid writes"),
    # a tokenizer trained here: llama.cpp's converter does not know how it splits words (or is not installed)
    ("export: {{gguf: true}}", "export.gguf: llama.cpp's converter"),
    ("export: {{onnx: {{kv_cache: perhaps}}}}", "export.onnx.kv_cache: Input should be a valid boolean"),
    ("export: {{check_windows: -1}}", "export.check_windows: Input should be greater than or equal to 0"),
    ("stages: [{{kind: structured}}]", "stages[0]: ratio is required"),
    ("stages: [{{kind: structured, ratio: 0.3, allocation: {{kind: owl}}}}]", "stages[0].allocation"),
    ("stages: [{{kind: structured, allocation: {{kind: explicit, ratios: [0.3]}}}}]", "stages[0].allocation.ratios: 1 entries, the model has 2 blocks"),
    ("stages: [{{kind: structured, ratio: 0.3, channel_multiple: 128}}]", "stages[0].channel_multiple: 128 is more than the 64 MLP channels"),
    ("stages: [{{kind: structured, ratio: 0.3, ignore: [q_proj]}}]", "stages[0]: structured pruning needs every projection of a block"),
    ("stages: [{{kind: structured, ratio: 0.3, metric: l1}}]", "stages[0].metric: Input should be 'fluctuation' or 'wanda'"),
    ("stages: [{{kind: recover, allocation: {{kind: atp, beta: auto}}}}]", "stages[0].allocation.beta: auto is not available for recover"),
    ("stages: [{{kind: recover, steps: 0}}]", "stages[0].steps: Input should be greater than 0"),
    ("stages: [{{kind: quantize, method: rtn}}, {{kind: recover}}]\nexport: {{hf: false}}", "stages[1]: recover after the quantize stage stages[0] would train weights off their grid"),
    ("output: x", "output: unknown key"),
    ("eval: {{tasks: [mmlu_pro_ultra]}}", "eval.tasks: 'mmlu_pro_ultra' is not a local task"),
    ("data: {{calibration: {{nsamples: 100000000, seqlen: 64}}}}", "data.calibration: 100000000 windows of 64 tokens need"),
    ("data: {{calibration: {{nsamples: 10000000, seqlen: 2}}}}", "data.calibration.nsamples: 10000000 windows of seqlen 2 asked for"),
]


@pytest.mark.parametrize("body,message", RECIPE_CASES)
def test_every_recipe_key_fails_in_one_line(monkeypatch, capsys, tmp_path, places, body, message):
    recipe = f"model: {{source: '{places['model']}'}}\noutput_dir: '{places['out']}'\n" if "model:" not in body else f"output_dir: '{places['out']}'\n"
    path = write(tmp_path, recipe + body.format(**places) + "\n")
    status, _, err = run_cli(monkeypatch, capsys, "validate", path)
    assert status == 2, err
    assert message.format(**places) in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.count("(got") <= 1  # the value is named once


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_run_on_a_gpu_this_torch_cannot_see_fails_in_one_line(monkeypatch, capsys, tmp_path, places, device):
    path = write(tmp_path, f"model: {{source: '{places['model']}', device: {device}}}\noutput_dir: '{places['out']}'\n")
    status, _, err = run_cli(monkeypatch, capsys, "run", path)
    assert status == 2 and f"model.device: '{device}' asked for, but this torch" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "output_dir,message",
    [
        ("{file}", "output_dir: {file} is a file, not a folder"),
        ("{file}/run", "output_dir: {file}/run cannot be created: {file} is a file"),
        ("/proc/atp-compress-test/run", "output_dir: /proc/atp-compress-test/run cannot be created: /proc is not writable"),
    ],
)
def test_output_dir_that_cannot_be_written(monkeypatch, capsys, tmp_path, places, output_dir, message):
    out = output_dir.format(**places)
    path = write(tmp_path, f"model: {{source: '{places['model']}'}}\noutput_dir: '{out}'\n")
    for command in ("validate", "run"):  # run says so before loading anything
        status, _, err = run_cli(monkeypatch, capsys, command, path)
        assert status == 2 and message.format(**places) in err and "Traceback" not in err, err


def test_recipe_files_that_are_not_recipes(monkeypatch, capsys, tmp_path, places):
    binary = tmp_path / "random.yaml"
    binary.write_bytes(bytes([0xE9, 0x00, 0xFF, 0x13]) * 50)
    empty = write(tmp_path, "", "empty.yaml")
    cases = [
        (binary, "random.yaml: not a text (UTF-8) file: byte 0xe9 at offset 0"),
        (empty, "empty.yaml: the recipe is empty; write {} to run every default"),
        (places["dir"], "is a folder; give a recipe .yaml file"),
        (tmp_path / "nope.yaml", "recipe file not found"),
        (write(tmp_path, "- a\n- b\n", "list.yaml"), "a recipe is a mapping of sections"),
        (write(tmp_path, "a: [\n", "broken.yaml"), "broken.yaml:2: not valid YAML"),
    ]
    for path, message in cases:
        for command in ("validate", "run"):
            status, _, err = run_cli(monkeypatch, capsys, command, path)
            assert status == 2 and message in err and err.count("\n") == 1, (command, path, err)
    assert load_recipe(write(tmp_path, "{}\n", "defaults.yaml")).stages == []  # all defaults, on purpose


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--seqlen", "abc"], "compress eval: Invalid value for '--seqlen'"),
        (["eval", "--seqlen", "1"], "compress eval: Invalid value for '--seqlen'"),
        (["eval", "--nsamples", "0"], "compress eval: Invalid value for '--nsamples'"),
        (["eval", "--nope"], "compress eval: No such option: --nope"),
        (["eval", "{dir}/missing"], "model.source: {dir}/missing does not exist"),
        (["eval", "{model}", "--dtype", "int8"], "--dtype: expected one of float32, bfloat16, float16, got 'int8'"),
        (["eval", "{model}", "--bos", "maybe"], "--bos: expected auto, true or false, got 'maybe'"),
        (["eval", "{model}", "--data", "{dir}"], "data.evaluation.source: {dir} is a folder"),
        (["eval", "{model}", "--seqlen", "4096"], "--seqlen: 4096 is beyond the model's context length (2048 tokens)"),
        (["run"], "compress run: Missing argument 'RECIPE'"),
        (["run", "{recipe}", "--set", "novalue"], "--set novalue: expected key.path=value"),
        (["bogus"], "compress: No such command 'bogus'"),
        (["export", "{dir}", "--to", "tflite"], "--to: expected one of hf, gguf, onnx, got 'tflite'"),
        (["export", "{dir}/missing", "--to", "gguf"], "{dir}/missing: no such run folder"),
        (["export", "{dir}", "--to", "gguf"], "{dir}: not a finished run"),
        (["export", "{dir}", "--to", "gguf", "--type", "q5_9"], "--type: Input should be 'f32', 'f16'"),
        (["export", "{dir}", "--to", "onnx", "--type", "q4_0"], "--type applies to --to gguf only"),
        (["export", "{dir}", "--to", "hf", "--format", "zip"], "--format: Input should be 'dense' or 'sparse'"),
        (["export", "{dir}"], "compress export: Missing option '--to'"),
    ],
)
def test_every_flag_fails_in_one_line(monkeypatch, capsys, places, args, message):
    status, _, err = run_cli(monkeypatch, capsys, *[a.format(**places) for a in args])
    assert status == 2 and message.format(**places).lower() in err.lower() and err.count("\n") == 1, err


# ---------------------------------------------------------------- eval switches


@pytest.mark.parametrize("stages", [True, False], ids=["stages", "no-stages"])
@pytest.mark.parametrize("tasks", [True, False], ids=["tasks", "no-tasks"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "no-dense"])
@pytest.mark.parametrize("ppl", [True, False], ids=["ppl", "no-ppl"])
def test_every_eval_combination_runs_and_reports(tmp_path, tiny_folder, ppl, dense, tasks, stages):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'atp-compress[eval]')")
    from zeroshot_items import write_data

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    write_data(tasks_dir)
    eval_section = {"perplexity": ppl, "dense": dense}
    if tasks:
        eval_section.update(tasks=["piqa"], tasks_dir=str(tasks_dir), limit=2)
    path = write(tmp_path, f"""\
        model: {{source: '{tiny_folder}'}}
        data:
          calibration: {{source: python-docs, nsamples: 2, seqlen: 16}}
          evaluation: {{source: python-docs, nsamples: 2, seqlen: 16}}
        stages: {"[{kind: prune, method: magnitude, sparsity: 0.5}]" if stages else "[]"}
        eval: {eval_section}
        output_dir: '{tmp_path / "out"}'
        """)
    results = engine.run(load_recipe(path), path).results
    report = (tmp_path / "out" / "report.md").read_text()
    measured_dense, measured_final = dense or not stages, stages  # with no stages the model is measured once, as dense
    assert (results["perplexity"]["dense"] is not None) == (ppl and measured_dense)
    assert (results["perplexity"]["compressed"] is not None) == (ppl and measured_final)
    assert (results["zero_shot"]["dense"] is not None) == (tasks and measured_dense)
    assert (results["zero_shot"]["compressed"] is not None) == (tasks and measured_final)
    assert ("evaluation" in results["data"]) == ppl
    assert ("Perplexity not measured" in report) == (not ppl)
    assert ("| compressed |" in report) == stages
    if ppl and measured_dense:
        assert results["perplexity"]["dense"]["tokens"] == 2 * 15 and "no BOS" in report
    assert results["memory"]["peak_rss_mb"] > 0 and "Peak memory" in report


def test_seqlen_beyond_the_context_fails_at_run_time(tmp_path, tiny_folder):
    path = write(tmp_path, f"""\
        model: {{source: '{tiny_folder}'}}
        data: {{calibration: {{source: python-docs, nsamples: 1, seqlen: 3000}}}}
        output_dir: '{tmp_path / "out"}'
        """)
    with pytest.raises(CompressError, match=r"data.calibration.seqlen: 3000 is beyond the model's context length \(2048 tokens\)"):
        engine.run(load_recipe(path), path)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
