#!/usr/bin/env python
"""Quantisation benchmark on SmolLM2-135M: RTN, GPTQ, bitsandbytes, prune-then-quantise,
joint SparseGPT + quantisation, and uniform vs ATP-allocated bit-widths; next to gptqmodel's own
GPTQ on the same model and token windows.

Protocol (as benchmarks/sparsity.py): 64 x 512 Brown calibration, 16 x 512 held-out Brown
validation (chooses ATP's beta), perplexity on the first 32 x 512 windows of WikiText-2 test;
bf16 calibration passes. Every row is a real `compress run` from the float32 HF folder (the
same weights as the GGUF, and what gptqmodel loads), with the export and its reload check on; the
file size is that of the exported checkpoint. SmolLM2's shipped weights sit on a 4-bit grid with
groups of 32, so group 32 at 4 bits would reproduce them exactly: rows use groups of 128.

    python benchmarks/quantize.py --folder /tmp/smollm2-hf
    python benchmarks/quantize.py --only gptq-4 rtn-4 --force
    python benchmarks/quantize.py --gptqmodel          # gptqmodel's GPTQ, same windows

Writes benchmarks/results/quantize/<name>.json and benchmarks/results/quantize.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sparsity import data_section, require_inputs, run_recipe  # noqa: E402  (the same token windows as the sparsity table)

RESULTS = HERE / "results" / "quantize"
ATP = {"kind": "atp", "beta": "auto", "trials": 5}
GPTQ4 = {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 128}
# name -> (stages, what the row shows)
CONFIGS = {
    "dense": ([], "float32"),
    "rtn-4": ([{"kind": "quantize", "method": "rtn", "bits": 4, "group_size": 128}], "round to nearest, 4-bit g128"),
    "gptq-4": ([GPTQ4], "GPTQ 4-bit g128 (group-aware order, the default)"),
    "gptq-4-stored-order": ([{**GPTQ4, "act_order": False}], "GPTQ 4-bit g128, columns in stored order"),
    "gptq-4-desc-act": ([{**GPTQ4, "act_order": True}], "GPTQ 4-bit g128, desc_act (scattered groups: g_idx at inference)"),
    "gptq-3": ([{**GPTQ4, "bits": 3}], "GPTQ 3-bit g128 (uniform)"),
    "gptq-3-atp": ([{**GPTQ4, "bits": 3, "allocation": ATP}], "GPTQ, mean 3 bits allocated by ATP"),
    "bnb-nf4": ([{"kind": "quantize", "method": "bnb", "format": "nf4"}], "bitsandbytes NF4"),
    "wanda-50-uniform+gptq-4": ([{"kind": "prune", "method": "wanda", "sparsity": 0.5}, GPTQ4], "Wanda 50% uniform, then GPTQ 4-bit"),
    "wanda-50-atp+gptq-4": ([{"kind": "prune", "method": "wanda", "sparsity": 0.5, "allocation": ATP}, GPTQ4], "Wanda 50% ATP, then GPTQ 4-bit"),
    "sparsegpt-50+gptq-4": ([{"kind": "prune", "method": "sparsegpt", "sparsity": 0.5}, GPTQ4], "SparseGPT 50%, then GPTQ 4-bit"),
    "sparsegpt-50-joint-4": (
        [{"kind": "prune", "method": "sparsegpt", "sparsity": 0.5, "quantize": {"bits": 4, "group_size": 128}}],
        "SparseGPT 50% and 4-bit g128 in one OBS pass",
    ),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--folder", type=Path, default=Path("/tmp/smollm2-hf"), help="SmolLM2-135M as a float32 HF folder")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-quantize"))
    p.add_argument("--only", nargs="*", choices=list(CONFIGS))
    p.add_argument("--force", action="store_true")
    p.add_argument("--gptqmodel", action="store_true", help="run gptqmodel's own GPTQ 4-bit g128 (in this process's venv)")
    return p.parse_args()


def recipe(args, name: str, stages: list) -> dict:
    return {
        "name": name,
        "seed": 0,
        "calibration_dtype": "bfloat16",
        "model": {"source": str(args.folder)},
        "data": data_section(args.data),
        "stages": stages,
        "eval": {"perplexity": True, "dense": not stages},
        "export": {"hf": True, "check": True},
        "output_dir": str(args.runs / name),
    }


def run_one(args, name: str) -> dict:
    stages, what = CONFIGS[name]
    results, metadata, wall = run_recipe(args.runs, name, recipe(args, name, stages))
    for record in results["stages"]:
        for key in ("layer_achieved", "layer_bits", "layer_sqnr_db"):
            record.pop(key, None)
    return {
        "name": name,
        "what": what,
        "perplexity": results["perplexity"]["compressed" if stages else "dense"]["ppl"],
        "file_mb": results["size"]["safetensors_mb"],
        "bits_per_weight": results["size"]["block_linear_bits_per_weight"],
        "sparsity": results["size"]["block_linear_sparsity"],
        "stage_seconds": round(sum(r["seconds"] for r in results["stages"]), 1),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": metadata["peak_rss_mb"],
        "export": {k: results["export"]["hf"].get(k) for k in ("format", "weights", "parity")},
        "stages": results["stages"],
        "versions": metadata["versions"],
        "git": metadata["git"],
    }


def run_gptqmodel(args) -> dict:
    """gptqmodel 7.6.0's own GPTQ (4-bit g128, sym, no act-order) on our calibration windows; the
    checkpoint is then decoded with our reader and scored by our perplexity on our windows."""
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    from compress.blocks.forward import perplexity
    from compress.data.windows import SegmentsConfig, build_segments
    from compress.export.hf.gptq import read_dequantized
    from compress.model.load import load_model, read_tokenizer

    tokenizer = read_tokenizer(str(args.folder))
    section = data_section(args.data)
    segments = build_segments({role: SegmentsConfig(**section[role]) for role in ("calibration", "evaluation")}, tokenizer)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in segments["calibration"].tokens]
    out = args.runs / "gptqmodel-gptq-4"
    start = time.perf_counter()
    model = GPTQModel.load(str(args.folder), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False), device="cpu")
    model.quantize(calibration, batch_size=1)
    seconds = time.perf_counter() - start
    model.save(str(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del model
    # score it like every other row: float32 dequantised weights, our windows and evaluator
    loaded = load_model(str(args.folder))
    weights = zeros = 0
    for name, W in read_dequantized(out).items():
        loaded.model.get_submodule(name).weight.data.copy_(W)
        weights += W.numel()
        zeros += int((W == 0).sum())
    ppl = perplexity(loaded.model, segments["evaluation"].tokens).ppl
    stored = 0  # bits of qweight, qzeros, scales and g_idx, as in the files
    from safetensors import safe_open

    for path in out.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            stored += sum(_numel(f.get_slice(k).get_shape()) * (16 if k.endswith(".scales") else 32)
                          for k in f.keys() if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")))
    from importlib.metadata import version

    return {
        "name": "gptqmodel-gptq-4",
        "what": "gptqmodel 7.6.0 GPTQ 4-bit g128 (its own calibration loop), scored by our evaluator",
        "perplexity": ppl,
        "file_mb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 2),
        "bits_per_weight": stored / weights,
        "sparsity": zeros / weights,
        "stage_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak, 1),
        "versions": {"gptqmodel": version("gptqmodel"), "torch": torch.__version__},
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def table(rows: list[dict]) -> str:
    lines = [
        "# Quantisation on SmolLM2-135M",
        "",
        "WikiText-2 test perplexity (32 x 512 windows), the exported checkpoint's safetensors size, bits per",
        "weight of the decoder-block Linears as stored (scales and zero points included), the sparsity of",
        "those Linears, seconds of the compression stages (beta searches included), and peak RSS of the run.",
        "",
        "| configuration | what | ppl | file MB | bits/weight | sparsity | stage s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['perplexity']:.2f} | {r['file_mb']:.1f} | {r['bits_per_weight']:.2f} | {r['sparsity']:.3f} "
            f"| {r['stage_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    searched = [r for r in rows if any(s.get("search") for s in r.get("stages", []))]
    if searched:
        lines += ["", "ATP searches (validation perplexity per trial):", ""]
        for r in searched:
            for s in r["stages"]:
                if s.get("search"):
                    trials = ", ".join(f"{t['beta']:.4f}: {t['score']:.2f}" for t in s["search"])
                    widths = f"; bit-widths per block {s['block_bits']}" if s["kind"] == "quantize" else ""
                    lines.append(f"- {r['name']} ({s['kind']}): {trials}; chose {s['beta']:.4f}{widths}")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    require_inputs(args.data, args.folder)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.gptqmodel:
        row = run_gptqmodel(args)
        (RESULTS / f"{row['name']}.json").write_text(json.dumps(row, indent=2) + "\n")
        print(f"gptqmodel: ppl {row['perplexity']:.2f}, {row['stage_seconds']:.0f} s, peak {row['peak_rss_mb']:.0f} MB")
    else:
        for name in args.only or CONFIGS:
            target = RESULTS / f"{name}.json"
            if target.exists() and not args.force:
                continue
            print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
            row = run_one(args, name)
            target.write_text(json.dumps(row, indent=2) + "\n")
            print(f"    ppl {row['perplexity']:.2f}, {row['file_mb']:.1f} MB, {row['bits_per_weight']:.2f} bits, "
                  f"stages {row['stage_seconds']:.0f} s, peak {row['peak_rss_mb']:.0f} MB", flush=True)
    names = list(CONFIGS) + ["gptqmodel-gptq-4"]
    rows = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names if (RESULTS / f"{n}.json").is_file()]
    (HERE / "results" / "quantize.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
