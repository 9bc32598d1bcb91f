#!/usr/bin/env python
"""CPU speed of the exports: tokens/s for prefill (128 and 512 tokens) and decode (128 new tokens
after a 16-token prompt), 2 threads, median of --repeats runs after one warm-up, one engine at a
time in this process.

Models: SmolLM2-135M (the embedded default) and a random-initialised Llama of ~0.5 B parameters
(hidden 2048, 8 blocks, SmolLM2's tokenizer and vocabulary), each dense and magnitude-pruned to
50% and 70% in every decoder-block Linear (speed depends on the pattern, not on which weights).

Engines: torch eager fp32 and bf16 (the baselines); llama.cpp F16 / Q8_0 / Q4_0 / Q4_K_M through
our GGUF exporter; ONNX Runtime on our ONNX export (fp32), and with every block Linear rounded to
4 bits in groups of 32 (symmetric, Q4_0's grid) exported as MatMulNBits (onnxruntime-int4). DeepSparse (the one CPU engine that
turns unstructured zeros into speed) needs its own venv (Python <= 3.11, onnx < 1.15): with
--deepsparse-python PATH it runs there on the same ONNX prefill graph; otherwise its rows say it
was not measured.

    python benchmarks/speed.py                    # everything (~30 minutes on 2 cores)
    python benchmarks/speed.py --models smollm2 --engines torch-fp32 llama.cpp-q4_k_m

Writes benchmarks/results/speed/<model>-<variant>.json and benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from compress.evaluation import speed
from compress.evaluation.speed import DECODE_NEW, PREFILL, PROMPT

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed"
GGUF_TYPES = ["f16", "q8_0", "q4_0", "q4_k_m"]
ENGINES = ["torch-fp32", "torch-bf16"] + [f"llama.cpp-{t}" for t in GGUF_TYPES] + ["onnxruntime", "onnxruntime-int4", "deepsparse"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["smollm2", "llama-0.5b"], choices=["smollm2", "llama-0.5b"])
    p.add_argument("--sparsities", nargs="*", type=float, default=[0.0, 0.5, 0.7])
    p.add_argument("--engines", nargs="*", default=ENGINES, choices=ENGINES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "atp-speed")
    p.add_argument("--force", action="store_true")
    p.add_argument("--deepsparse-python", type=Path, help="python of a venv with deepsparse 1.8.0 and onnx<1.15")
    return p.parse_args()


# ---------------------------------------------------------------- models


def load(name: str):
    from compress.model.load import load_model

    loaded = load_model("smollm2-135m")
    if name == "smollm2":
        return loaded.model, loaded.tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=loaded.model.config.vocab_size, hidden_size=2048, intermediate_size=5632,
                                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                                  tie_word_embeddings=True, bos_token_id=loaded.model.config.bos_token_id,
                                  eos_token_id=loaded.model.config.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    return model, loaded.tokenizer


def prune(model, sparsity: float) -> None:
    """Magnitude per output row in every decoder-block Linear."""
    from compress.model.anatomy import block_linears, decoder_blocks

    with torch.no_grad():
        for block in decoder_blocks(model):
            for module in block_linears(block).values():
                W = module.weight
                k = int(W.shape[1] * sparsity)
                idx = W.abs().topk(k, dim=1, largest=False).indices
                W.scatter_(1, idx, 0.0)


def int4_copy(model):
    """A copy with every decoder-block Linear on a 4-bit group-32 symmetric grid (RTN): the
    layout MatMulNBits stores; speed depends on the format, not on how the codes were chosen."""
    import copy

    from compress.algorithms.quant import Grid, rtn
    from compress.model.anatomy import block_linears, decoder_blocks

    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for block in decoder_blocks(quantized):
            for module in block_linears(block).values():
                weight, state = rtn(module.weight, Grid(bits=4, group_size=32))
                module.weight.copy_(weight)
                module.quant_state = state
    return quantized


def tokens(tokenizer, n: int) -> list[int]:
    from compress.data.text import read_text

    ids = tokenizer(read_text("python-docs", "evaluation")[:200_000], add_special_tokens=False).input_ids
    return ids[:n]


# ---------------------------------------------------------------- timing (compress/evaluation/speed.py)


def torch_rates(model, ids: list[int], dtype, repeats: int) -> dict:
    model = model.to(dtype)
    try:
        return speed.torch_rates(model, ids, repeats)
    finally:
        model.to(torch.float32)


def deepsparse_rates(args, folder: Path, info: dict) -> dict:
    """DeepSparse in its own venv, on a copy of the prefill graph that its onnx 1.14 reads (IR 8)."""
    import subprocess

    import onnx

    if args.deepsparse_python is None:
        raise RuntimeError("not measured: DeepSparse needs its own venv (pass --deepsparse-python)")
    graph = onnx.load(str(folder / info["graphs"]["prefill"]))
    graph.ir_version = 8
    copy = folder / "prefill-ir8.onnx"
    onnx.save_model(graph, str(copy), save_as_external_data=True, location="prefill-ir8.onnx.data")
    del graph
    done = subprocess.run([str(args.deepsparse_python), str(HERE / "deepsparse_prefill.py"), str(copy), "--threads", str(args.threads),
                           "--repeats", str(args.repeats), "--lengths", *map(str, PREFILL)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        why = next((line for line in lines if line.startswith("Assertion at")), lines[-1] if lines else f"exit {done.returncode}")
        raise RuntimeError(f"DeepSparse 1.8.0 failed to compile our prefill graph: {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- one model variant


def measure(args, model_name: str, sparsity: float) -> dict:
    from compress.export import gguf as gguf_export
    from compress.export import onnx as onnx_export

    model, tokenizer = load(model_name)
    if sparsity:
        prune(model, sparsity)
    ids = tokens(tokenizer, max(PREFILL) + PROMPT + 1)
    params = sum(p.numel() for p in model.parameters())
    work = args.work / f"{model_name}-{int(sparsity * 100)}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = {}
    torch.set_num_threads(args.threads)
    for engine in args.engines:
        print(f"{model_name} {sparsity:.0%} {engine}", flush=True)
        row = {"mb": None}
        try:
            if engine.startswith("torch"):
                dtype = torch.float32 if engine.endswith("fp32") else torch.bfloat16
                row["mb"] = round(sum(p.numel() for p in model.parameters()) * (4 if dtype == torch.float32 else 2) / 2**20, 1)
                row.update(torch_rates(model, ids, dtype, args.repeats))
            elif engine.startswith("llama.cpp"):
                kind = engine.split("-", 1)[1]
                info = gguf_export.save(model, tokenizer, work / "gguf", gguf_export.GgufExport(types=[kind]), work / "scratch")
                entry = info["files"][kind]
                row.update({"mb": entry["mb"], "tensor_types": entry["tensor_types"], "zeros_kept": entry["zeros_kept"]})
                row.update(speed.llama_rates(work / "gguf" / entry["file"], ids, args.repeats))
                (work / "gguf" / entry["file"]).unlink()
            elif engine == "onnxruntime-int4":
                quantized = int4_copy(model)
                info = onnx_export.save(quantized, tokenizer, work / "onnx-int4", onnx_export.OnnxExport(), work / "scratch")
                del quantized
                row.update({"mb": info["mb"], "matmul_nbits": len(info["matmul_nbits"])})
                row.update(speed.ort_rates(work / "onnx-int4", info, ids, args.repeats))
                shutil.rmtree(work / "onnx-int4")
            elif engine in ("onnxruntime", "deepsparse"):
                if not (work / "onnx" / "export.json").is_file():  # one export serves both engines
                    info = onnx_export.save(model, tokenizer, work / "onnx", onnx_export.OnnxExport(), work / "scratch")
                    (work / "onnx" / "export.json").write_text(json.dumps(info))
                info = json.loads((work / "onnx" / "export.json").read_text())
                row["mb"] = info["mb"]
                row.update(speed.ort_rates(work / "onnx", info, ids, args.repeats) if engine == "onnxruntime" else deepsparse_rates(args, work / "onnx", info))
        except Exception as err:  # a benchmark row that fails says why, the others still run
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        rows[engine] = row
        print(f"  {row}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"model": model_name, "sparsity": sparsity, "params": params, "threads": args.threads, "repeats": args.repeats, "rows": rows}


def machine() -> dict:
    from compress.run import environment

    return {"machine": environment.machine(), "versions": environment.versions()}


def table(results: list[dict]) -> str:
    lines = ["# Speed on 2 CPU cores", "",
             f"Tokens/s, median of the runs after one warm-up; prefill of 128 and 512 tokens; decode of {DECODE_NEW} new tokens "
             f"after a {PROMPT}-token prompt (prompt time taken out). MB: the file the engine loads (torch: the weights in memory).", ""]
    for r in results:
        lines += [f"## {r['model']}, {r['sparsity']:.0%} of block weights zero ({r['params'] / 1e6:.0f} M parameters)", "",
                  "| engine | MB | prefill 128 | prefill 512 | decode | decode vs torch bf16 |", "|---|---|---|---|---|---|"]
        base = r["rows"].get("torch-bf16", {}).get(f"decode_{DECODE_NEW}")
        for engine, row in r["rows"].items():
            if "error" in row:
                lines.append(f"| {engine} | - | failed: {row['error']} | | | |")
                continue
            decode = row.get(f"decode_{DECODE_NEW}")
            rel = f"{decode / base:.2f}x" if base and decode else "-"
            shown = f"{decode:.1f}" if decode else "not measured"
            lines.append(f"| {engine} | {row['mb']} | {row['prefill_128']:.0f} | {row['prefill_512']:.0f} | {shown} | {rel} |")
        lines.append("")
    failed = {row["error"] for r in results for e, row in r["rows"].items() if e == "deepsparse" and "error" in row}
    if failed:
        lines += ["DeepSparse rows: " + "; ".join(sorted(failed)) + ".", ""]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for model_name in args.models:
        for sparsity in args.sparsities:
            path = RESULTS / f"{model_name}-{int(sparsity * 100)}.json"
            if path.exists() and not args.force:
                results.append(json.loads(path.read_text()))
                continue
            result = {**measure(args, model_name, sparsity), **machine()}
            if path.exists():  # --force on some engines: their rows replace the earlier ones
                earlier = json.loads(path.read_text())
                result["rows"] = {**earlier["rows"], **result["rows"]}
                result["rows"] = {e: result["rows"][e] for e in ENGINES if e in result["rows"]}
            path.write_text(json.dumps(result, indent=2) + "\n")
            results.append(result)
    every = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    (HERE / "results" / "speed.md").write_text(table(every))
    print(table(every))


if __name__ == "__main__":
    sys.exit(main())
