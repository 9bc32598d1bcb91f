"""eval.artefacts: a run measures its exported files in their own runtimes (HF folder in torch, GGUF in
llama.cpp, ONNX in ONNX Runtime), and each number says which artefact it comes from."""

import json
import textwrap

import pytest

from compress.errors import CompressError
from compress.run import engine
from compress.run.recipe import load_recipe

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'atp-compress[eval]')")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'atp-compress[gguf]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'atp-compress[onnx]')")

from zeroshot_items import write_data  # noqa: E402  (a few items of each local task)

from conftest import has_converter, model_from_config  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory, vocab_folder):
    """A tiny Llama with Llama 2's real tokenizer (llama.cpp's converter must know it)."""
    import shutil

    if not has_converter():
        pytest.skip("llama.cpp's converter is not installed: compress install-converter")
    folder = tmp_path_factory.mktemp("artefacts") / "tiny"
    shutil.copytree(vocab_folder("llama-spm"), folder)
    model_from_config("llama", 0, vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2).save_pretrained(folder)
    return folder


def recipe(tmp_path, folder, on):
    tasks = write_data(tmp_path)
    path = tmp_path / "artefacts.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: artefacts
        model: {{source: {folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 32}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 32}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
        stages: [{{kind: prune, method: wanda, sparsity: 0.5, allocation: {{kind: uniform}}}}]
        eval: {{perplexity: true, dense: false, tasks: [piqa, arc_easy, winogrande], tasks_dir: {tasks}, artefacts: {on}}}
        export: {{hf: true, gguf: {{types: [f32, f16]}}, onnx: true}}
        output_dir: {tmp_path / 'out'}
        """))
    return path


def test_every_artefact_is_measured_in_its_runtime(tmp_path, folder):
    path = recipe(tmp_path, folder, '[model, hf, "gguf:f32", onnx]')
    recipe_obj = load_recipe(path, ["eval.speed=true", "eval.speed_repeats=1"])
    engine.run(recipe_obj, path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ev = results["evaluations"]
    assert list(ev) == ["model", "hf", "gguf f32", "onnx"]  # gguf:f32 picks one of the two files
    assert ev["gguf f32"]["path"] == "gguf/model-f32.gguf" and ev["onnx"]["path"] == "onnx" and ev["hf"]["path"] == "."
    model = ev["model"]["perplexity"]
    assert model == results["perplexity"]["compressed"]
    # the same windows, scored by each runtime: torch reload exact, F32 GGUF and ONNX within float error
    assert ev["hf"]["perplexity"]["ppl"] == pytest.approx(model["ppl"], rel=1e-6)
    assert ev["gguf f32"]["perplexity"]["ppl"] == pytest.approx(model["ppl"], rel=1e-3)
    assert ev["onnx"]["perplexity"]["ppl"] == pytest.approx(model["ppl"], rel=1e-4)
    assert {e["perplexity"]["tokens"] for e in ev.values()} == {4 * 31}
    for label, entry in ev.items():
        zs = entry["zero_shot"]
        assert set(zs["tasks"]) == {"piqa", "arc_easy", "winogrande"}, label
        for task, m in zs["tasks"].items():  # random tiny model: ties are rare, a flipped item at most
            assert abs(m["acc"] - ev["model"]["zero_shot"]["tasks"][task]["acc"]) <= 1 / m["n"] + 1e-9, (label, task)
        assert entry["speed"]["prefill_128"] > 0 and entry["speed"]["decode_128"] > 0, label
    assert ev["hf"]["zero_shot"]["tasks"] == ev["model"]["zero_shot"]["tasks"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| gguf f32 | gguf/model-f32.gguf |" in report


def test_only_an_export_can_be_measured(tmp_path, folder):
    path = recipe(tmp_path, folder, "[gguf]")
    engine.run(load_recipe(path, ["export.onnx=false", "eval.tasks=[]"]), path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["evaluations"]) == ["gguf f32", "gguf f16"]
    assert results["perplexity"]["compressed"] is None  # the in-memory model was not measured
    f32, f16 = (results["evaluations"][k]["perplexity"]["ppl"] for k in ("gguf f32", "gguf f16"))
    assert f16 == pytest.approx(f32, rel=1e-2)


@pytest.mark.parametrize("on, message", [
    ("[onnx]", "'onnx' is evaluated after export, but export.onnx is off"),
    ('["gguf:q4_k_m"]', "export.gguf.types is ['f32', 'f16'], without q4_k_m"),
    ("[tflite]", "unknown artefact 'tflite'"),
    ("[]", "name at least one of"),
])
def test_eval_on_names_an_exported_artefact(tmp_path, folder, on, message):
    path = recipe(tmp_path, folder, on)
    with pytest.raises(CompressError, match="eval.artefacts") as err:
        load_recipe(path, ["export.onnx=false"])
    assert message in str(err.value)


def test_compress_eval_scores_a_gguf_file_in_llama_cpp(tmp_path, folder):
    """`compress eval FILE --runtime llama.cpp`: the same windows and tasks as torch on the HF
    folder the file was written from, scored by llama.cpp."""
    from typer.testing import CliRunner

    from compress.cli import app
    from compress.export import gguf as gguf_export
    from compress.model.load import load_model

    loaded = load_model(str(folder))
    gguf_export.save(loaded.model, loaded.tokenizer, tmp_path / "gguf", gguf_export.GgufExport(types=["f32"]), tmp_path / "scratch")
    tasks = write_data(tmp_path)
    common = ["--seqlen", "32", "--nsamples", "4", "--tasks", "piqa,arc_easy", "--tasks-dir", str(tasks), "--speed", "-q"]
    runs = {}
    for name, args in (("torch", [str(folder)]), ("llama.cpp", [str(tmp_path / "gguf" / "model-f32.gguf"), "--runtime", "llama.cpp"])):
        result = CliRunner().invoke(app, ["eval", *args, *common])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout[result.stdout.index("{"):])
    torch_run, llama = runs["torch"], runs["llama.cpp"]
    assert llama["artefact"] == "gguf f32" and llama["tokens"] == torch_run["tokens"] == 4 * 31
    assert llama["ppl"] == pytest.approx(torch_run["ppl"], rel=1e-3)
    for task, m in llama["zero_shot"]["tasks"].items():
        assert abs(m["acc"] - torch_run["zero_shot"]["tasks"][task]["acc"]) <= 1 / m["n"] + 1e-9
    assert llama["speed"]["decode_128"] > 0 and torch_run["speed"]["prefill_128"] > 0
    result = CliRunner().invoke(app, ["eval", str(folder), "--runtime", "llama.cpp"])
    assert result.exit_code == 2 and "--runtime llama.cpp: " in result.output and "is not a .gguf file" in result.output
