"""Tokens per second of a model in its runtime: prefill of 128 and 512 tokens, and decode of 128
new tokens after a 16-token prompt (greedy, the prompt's own time taken out). Median of `repeats`
runs after one warm-up, on torch's thread count. One measurement at a time: two jobs sharing the
cores would each read about half.

Runtimes: torch (a model in memory, or a folder our loader reads), llama.cpp (a GGUF file) and
ONNX Runtime (our ONNX export's prefill + KV-cache decode graphs).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.evaluation.runtimes import GgufRuntime, OnnxRuntime
from compress.export import onnx as onnx_export

PREFILL = (128, 512)
DECODE_NEW, PROMPT = 128, 16


def median_rate(run, n_tokens: int, repeats: int) -> float:
    run()  # warm-up: kernels, caches, repacking
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n_tokens / statistics.median(times)


def decode_rate(generate, prefill_prompt, repeats: int) -> float:
    """New tokens per second, the prompt's prefill time taken out."""
    generate()
    times, prompt_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        prefill_prompt()
        prompt_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return DECODE_NEW / max(statistics.median(times) - statistics.median(prompt_times), 1e-9)


def lengths(ids: list[int]) -> tuple[int, ...]:
    """The prefill lengths `ids` is long enough for (a short context drops 512)."""
    return tuple(n for n in PREFILL if n <= len(ids)) or (len(ids),)


def torch_rates(model, ids: list[int], repeats: int = 3) -> dict:
    out = {}
    with torch.inference_mode():
        for n in lengths(ids):
            x = torch.tensor([ids[:n]], device=model.device)
            out[f"prefill_{n}"] = median_rate(lambda: model(x, use_cache=False), n, repeats)
        prompt = torch.tensor([ids[:PROMPT]], device=model.device)

        def decode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=DECODE_NEW, min_new_tokens=DECODE_NEW,
                           do_sample=False, pad_token_id=0)

        out[f"decode_{DECODE_NEW}"] = decode_rate(decode, lambda: model(prompt, use_cache=False), repeats)
    return out


def llama_rates(path: Path, ids: list[int], repeats: int = 3) -> dict:
    import llama_cpp

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(path), n_ctx=max(lengths(ids)) + DECODE_NEW + PROMPT, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    out = {}
    try:
        for n in lengths(ids):
            def prefill(n=n):
                llm.reset()
                llm.eval(ids[:n])
            out[f"prefill_{n}"] = median_rate(prefill, n, repeats)

        def decode():
            llm.reset()
            llm.eval(ids[:PROMPT])
            token = ids[PROMPT]
            for _ in range(DECODE_NEW):
                llm.eval([token])
                token = int(llm.scores[llm.n_tokens - 1].argmax())  # greedy, as torch's generate

        def prompt_only():
            llm.reset()
            llm.eval(ids[:PROMPT])

        out[f"decode_{DECODE_NEW}"] = decode_rate(decode, prompt_only, repeats)
    finally:
        llm.close()
    return out


def ort_rates(folder: Path, info: dict, ids: list[int], repeats: int = 3) -> dict:
    """ONNX Runtime through the exporter's own runner: prefill graph, then the KV-cache decode graph."""
    prefill = onnx_export.session(folder / info["graphs"]["prefill"])  # threads: torch.get_num_threads()
    decode = onnx_export.session(folder / info["graphs"]["decode"])
    out = {}
    for n in lengths(ids):
        x = torch.tensor([ids[:n]])
        out[f"prefill_{n}"] = median_rate(lambda: onnx_export.run(prefill, x), n, repeats)
    prompt = torch.tensor([ids[:PROMPT]])
    step = onnx_export.decode_step(decode)

    def generate():
        onnx_export.greedy(prompt, onnx_export.run(prefill, prompt), step, DECODE_NEW, [])

    out[f"decode_{DECODE_NEW}"] = decode_rate(generate, lambda: onnx_export.run(prefill, prompt), repeats)
    return out


def runtime_rates(runtime, ids: list[int], repeats: int = 3) -> dict:
    """Tokens/s of a compress.runtimes Runtime in its own engine: llama.cpp for a GGUF file, ONNX
    Runtime's prefill + decode graphs for an ONNX export, torch otherwise."""
    if isinstance(runtime, GgufRuntime):
        runtime.close()  # the measurement opens the file with a context of its own: one copy in memory
        return llama_rates(runtime.path, ids, repeats)
    if isinstance(runtime, OnnxRuntime):
        if not (runtime.path / onnx_export.DECODE).is_file():
            raise CompressError(f"speed: {runtime.path} has no {onnx_export.DECODE} (exported with kv_cache: false); decode speed needs it")
        return ort_rates(runtime.path, {"graphs": {"prefill": onnx_export.PREFILL, "decode": onnx_export.DECODE}}, ids, repeats)
    return torch_rates(runtime.model, ids, repeats)
