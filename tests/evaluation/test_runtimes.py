"""compress.runtimes: perplexity and lm-eval scores of exported artefacts in their own runtimes
(llama.cpp for GGUF, ONNX Runtime for ONNX, torch for an HF folder) against the in-memory model.

One tiny random Llama (weights spread wide so options differ clearly) is exported once per module
as F32 GGUF (with a real tokenizer that llama.cpp's converter knows: GPT-2's without BOS, Llama 2's
with), HF folder and ONNX. F32 files differ from torch only by summation
order and llama.cpp's F16 KV cache, so log-likelihoods agree to ~1e-5 relative.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'atp-compress[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from zeroshot_items import write_data  # noqa: E402

from compress.blocks.forward import perplexity  # noqa: E402
from compress.data.windows import adds_bos  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.evaluation import zeroshot  # noqa: E402
from compress.evaluation.runtimes import GgufRuntime, open_runtime, runtime_perplexity  # noqa: E402

from conftest import build_tokenizer, has_converter, model_from_config  # noqa: E402

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'atp-compress[gguf]')")
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnxruntime / onnxscript not installed (pip install 'atp-compress[onnx]')")

# Multiple-choice style requests: two share a context (the KV prefix reuse), one has an empty
# context (scored after the prefix token), one a context with a trailing space.
PAIRS = [
    ("Question: What melts ice?\nAnswer:", " heat"),
    ("Question: What melts ice?\nAnswer:", " cold water from the tap"),
    ("Question: What melts ice?\nAnswer:", " darkness"),
    ("", "Hello world, said the sun."),
    ("The sum of the parts is ", "more than the whole."),
]
DOCS = ["Some text to score here.", "Another, longer document about the moon, the sun and the stars.", "x"]
TASKS = ["piqa", "arc_easy", "winogrande", "hellaswag"]


def tiny(seed: int = 0, layers: int = 2, vocab: int = 320):
    return model_from_config("llama", seed, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runtimes take their thread count from torch: stay off shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["gpt-2", "llama-spm"], ids=["no-bos", "bos"])
def exported(request, tmp_path_factory, vocab_folder):
    """(model, tokenizer, folder): the tiny model, its tokenizer (with or without BOS first) and
    its F32 GGUF file written under folder."""
    from transformers import AutoTokenizer

    from compress.export import gguf as gguf_export

    if HAS_LLAMA_CPP and not has_converter():
        pytest.skip("llama.cpp's converter is not installed: compress install-converter")
    tokenizer = AutoTokenizer.from_pretrained(vocab_folder(request.param))
    model = tiny(vocab=len(tokenizer))
    folder = tmp_path_factory.mktemp("gguf")
    if HAS_LLAMA_CPP:
        gguf_export.save(model, tokenizer, folder, gguf_export.GgufExport(types=["f32"]), folder / "scratch")
    return model, tokenizer, folder


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def hflm(model, tokenizer):
    return zeroshot.build_hflm(model, tokenizer, batch_size=4)


# ---------------------------------------------------------------------------------------------
# GGUF in llama.cpp against HFLM on the same model
# ---------------------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("kv_cache, tolerance", [("f32", 1e-6), ("f16", 2e-4)])
def test_gguf_loglikelihoods_equal_hflm(exported, kv_cache, tolerance):
    """Measured on sums of -20..-120: 1e-7 relative with an F32 KV cache, 1e-4 with llama.cpp's
    default F16 one (what a deployment runs)."""
    model, tokenizer, folder = exported
    want = hflm(model, tokenizer).loglikelihood(requests("loglikelihood", PAIRS))
    with open_runtime("gguf", folder / "model-f32.gguf", kv_cache=kv_cache) as rt:
        assert rt.label == "gguf f32" and rt.max_length == 256
        lm = rt.lm()
        assert lm.tok_encode("Question: What melts ice?") == tokenizer.encode("Question: What melts ice?")
        got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=tolerance)
    assert [g for _, g in got] == [g for _, g in want]


@needs_llama_cpp
def test_kv_prefix_reuse_equals_scoring_from_scratch(exported):
    _, tokenizer, folder = exported
    with open_runtime("gguf", folder / "model-f32.gguf") as rt:
        lm = rt.lm()
        reused = lm.loglikelihood(requests("loglikelihood", PAIRS))
        with_reuse = rt.evaluated
        rt.reuse_prefix, rt.evaluated = False, 0
        scratch = lm.loglikelihood(requests("loglikelihood", PAIRS))
        from_scratch = rt.evaluated
    inputs = [len(tokenizer.encode(c + x)) - 1 if c else len(tokenizer.encode(x, add_special_tokens=False)) for c, x in PAIRS]
    shared = len(tokenizer.encode(PAIRS[0][0]))  # the three options' common context, run once
    assert from_scratch == sum(inputs) and with_reuse <= from_scratch - 2 * shared
    # the same numbers up to float rounding: the continuation runs in a smaller batch, whose
    # matmuls sum in another order (measured 4e-7)
    assert [ll for ll, _ in reused] == pytest.approx([ll for ll, _ in scratch], abs=1e-5, rel=1e-7)
    assert [g for _, g in reused] == [g for _, g in scratch]


def own_perplexity_sums(score_window, prefix: int, docs: list[list[int]]) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of windows [prefix] + doc, one window per document."""
    total, count = 0.0, 0
    for doc in docs:
        ppl = score_window(torch.tensor([[prefix, *doc]]))
        total += ppl.nll * ppl.tokens
        count += ppl.tokens
    return total, count


def test_hflm_rolling_loglikelihood_is_our_perplexity(tokenizer):
    model = tiny()
    lm = hflm(model, tokenizer)
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in DOCS]))
    docs = [lm.tok_encode(d) for d in DOCS]
    nll, count = own_perplexity_sums(lambda w: perplexity(model, w), lm.prefix_token_id, docs)
    assert count == sum(map(len, docs))
    assert -sum(rolling) == pytest.approx(nll, rel=1e-5)


@needs_llama_cpp
def test_gguf_rolling_loglikelihood_and_runtime_perplexity(exported):
    model, tokenizer, folder = exported
    with open_runtime("gguf", folder / "model-f32.gguf") as rt:
        lm = rt.lm()
        rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in DOCS]))
        docs = [lm.tok_encode(d) for d in DOCS]
        nll, count = own_perplexity_sums(lambda w: runtime_perplexity(rt, w), lm.prefix_token_id, docs)
    want = hflm(model, tokenizer).loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in DOCS]))
    torch_nll, _ = own_perplexity_sums(lambda w: perplexity(model, w), lm.prefix_token_id, docs)
    assert count == sum(map(len, docs))
    assert -sum(rolling) == pytest.approx(nll, rel=1e-5)  # same runtime, same definition
    assert rolling == pytest.approx(want, rel=1e-4)  # llama.cpp against torch
    assert nll == pytest.approx(torch_nll, rel=1e-4)


@needs_llama_cpp
def test_gguf_zero_shot_equals_the_torch_model(exported, tmp_path):
    model, tokenizer, folder = exported
    data = write_data(tmp_path)
    want = zeroshot.zero_shot(model, tokenizer, TASKS, data, batch_size=4)
    with open_runtime("gguf", folder / "model-f32.gguf") as rt:
        got = zeroshot.zero_shot(None, None, TASKS, data, lm=rt.lm())
    assert got["bos"] == want["bos"] == adds_bos(tokenizer)
    for task in TASKS:
        for key in ("acc", "acc_norm", "acc_stderr", "n"):
            assert got["tasks"][task][key] == want["tasks"][task][key], (task, key)
    assert got["mean_acc"] == want["mean_acc"] and got["mean_acc_stderr"] == want["mean_acc_stderr"]


@needs_llama_cpp
def test_gguf_refuses_generation_and_missing_files(exported, tmp_path):
    _, _, folder = exported
    with pytest.raises(CompressError, match=r"nothing\.gguf: not found; give a \.gguf file"):
        open_runtime("gguf", tmp_path / "nothing.gguf")
    with pytest.raises(CompressError, match="not a file; give one .gguf file"):
        open_runtime("gguf", folder)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CompressError, match="junk.gguf: not a readable GGUF file"):
        open_runtime("gguf", tmp_path / "junk.gguf")
    with pytest.raises(CompressError, match="unknown kind 'tflite'"):
        open_runtime("tflite", folder)
    with GgufRuntime(folder / "model-f32.gguf") as rt:
        with pytest.raises(CompressError, match="generation tasks are not supported on gguf f32"):
            rt.lm().generate_until(requests("generate_until", [("Hi", {"until": ["\n"]})]))
        with pytest.raises(CompressError, match="300 tokens does not fit llama.cpp's context of 256"):
            rt.logits(list(range(300)))


# ---------------------------------------------------------------------------------------------
# Perplexity of every runtime against the torch model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [pytest.param("hf"), pytest.param("gguf", marks=needs_llama_cpp), pytest.param("onnx", marks=needs_onnx)])
def test_runtime_perplexity_equals_the_torch_models(kind, tokenizer, tmp_path, request):
    if kind == "gguf":  # llama.cpp's converter needs a tokenizer it knows
        tokenizer = request.getfixturevalue("spm_tokenizer")
        if not has_converter():
            pytest.skip("llama.cpp's converter is not installed: compress install-converter")
    model = tiny(seed=1, layers=1, vocab=len(tokenizer))
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    want = perplexity(model, windows)
    if kind == "hf":
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        path = tmp_path
    elif kind == "gguf":
        from compress.export import gguf as gguf_export

        gguf_export.save(model, tokenizer, tmp_path, gguf_export.GgufExport(types=["f32"]), tmp_path / "scratch")
        path = tmp_path / "model-f32.gguf"
    else:
        from compress.export import onnx as onnx_export

        onnx_export.save(model, tokenizer, tmp_path, onnx_export.OnnxExport(kv_cache=False), tmp_path / "scratch")
        path = tmp_path
    with open_runtime(kind, path) as rt:
        got = runtime_perplexity(rt, windows)
        logits = rt.logits(windows[0].tolist())
        if kind == "hf":  # the reloaded folder scores tasks through HFLM, as the in-memory model
            data = write_data(tmp_path)
            assert zeroshot.zero_shot(None, None, ["arc_easy"], data, lm=rt.lm())["tasks"] == \
                zeroshot.zero_shot(model, tokenizer, ["arc_easy"], data)["tasks"]
    assert (got.tokens, got.windows, got.seqlen) == (3 * 39, 3, 40)
    tolerance = {"hf": 1e-6, "gguf": 1e-4, "onnx": 1e-5}[kind]  # llama.cpp keeps its KV cache in F16
    assert got.nll == pytest.approx(want.nll, rel=tolerance) and got.ppl == pytest.approx(math.exp(got.nll))
    with torch.no_grad():
        expected = model(windows[:1]).logits[0]
    assert logits.shape == (40, model.config.vocab_size) and logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 10 * tolerance * expected.abs().max()


@needs_onnx
def test_onnx_zero_shot_equals_the_torch_model(tmp_path):
    from compress.export import onnx as onnx_export

    tokenizer, model = build_tokenizer(300, bos=True), tiny(seed=2, layers=1)
    onnx_export.save(model, tokenizer, tmp_path / "onnx", onnx_export.OnnxExport(kv_cache=False), tmp_path / "scratch")
    data = write_data(tmp_path)
    want = zeroshot.zero_shot(model, tokenizer, ["arc_easy", "hellaswag"], data, batch_size=4)
    with open_runtime("onnx", tmp_path / "onnx") as rt:
        assert rt.label == "onnx" and rt.prefix_token_id == tokenizer.bos_token_id
        got = zeroshot.zero_shot(None, None, ["arc_easy", "hellaswag"], data, lm=rt.lm())
        pairs = rt.lm().loglikelihood(requests("loglikelihood", PAIRS))
    assert got["bos"] is want["bos"] is True
    assert {t: got["tasks"][t]["acc"] for t in got["tasks"]} == {t: want["tasks"][t]["acc"] for t in want["tasks"]}
    expected = hflm(model, tokenizer).loglikelihood(requests("loglikelihood", PAIRS))
    assert [ll for ll, _ in pairs] == pytest.approx([ll for ll, _ in expected], rel=1e-5)


def test_onnx_folder_without_graph_is_named(tmp_path):
    with pytest.raises(CompressError, match=r"prefill\.onnx: not found; give the folder an ONNX export wrote"):
        open_runtime("onnx", tmp_path)
    with pytest.raises(CompressError, match=r"missing: not found; give an exported HF folder"):
        open_runtime("hf", tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# zeroshot additions: standard errors, ready LMs, lm-eval's own tasks
# ---------------------------------------------------------------------------------------------


def test_standard_errors_are_lm_evals_mean_stderr(tokenizer, tmp_path):
    from lm_eval.api.metrics import mean_stderr

    model = tiny()
    data = write_data(tmp_path)
    docs = {task: zeroshot.load_docs(task, data) for task in ("piqa", "arc_easy")}
    results = zeroshot.run_lm_eval(model, tokenizer, docs, batch_size=4)
    summary = zeroshot.zero_shot(model, tokenizer, ["piqa", "arc_easy"], data, batch_size=4)
    errors = []
    for task in ("piqa", "arc_easy"):
        scores = summary["tasks"][task]
        for metric in ("acc", "acc_norm"):
            per_doc = [s[metric] for s in results["samples"][task]]
            p, n = sum(per_doc) / len(per_doc), len(per_doc)
            assert scores[metric] == pytest.approx(p) and n == 3
            assert scores[f"{metric}_stderr"] == pytest.approx(mean_stderr(per_doc), abs=1e-12)
            assert scores[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
        errors.append(scores["acc_stderr"])
    assert summary["mean_acc_stderr"] == pytest.approx(math.sqrt(sum(e * e for e in errors)) / 2)


def test_lm_eval_task_names_fail_in_one_line(monkeypatch):
    """Any name outside TASKS goes to lm-eval's TaskManager; faked here (the real one indexes
    14k tasks in ~15 s, and this machine cannot download a dataset)."""

    class FakeManager:
        all_tasks = ["boolq"]

        def load(self, names):
            raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)\nmore")

    lm_eval = zeroshot._import_lm_eval()
    monkeypatch.setattr(lm_eval, "TaskManager", lambda *a, **k: FakeManager())
    with pytest.raises(CompressError, match=r"unknown task 'nosuch': not a local task \(piqa, .*\) nor one of lm-eval's$"):
        zeroshot.zero_shot(None, None, ["nosuch"], lm=object())
    with pytest.raises(CompressError, match=r"unknown task 'boolq' here: .* could not load its dataset \(offline\?\): "
                                            r"ConnectionError: Couldn't reach 'aps/super_glue' on the Hub \(LocalEntryNotFoundError\)$"):
        zeroshot.zero_shot(None, None, ["boolq"], lm=object())
    with pytest.raises(CompressError, match="tasks piqa are read from local files: give their folder"):
        zeroshot.zero_shot(None, None, ["piqa"], lm=object())
