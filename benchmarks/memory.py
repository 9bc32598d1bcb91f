#!/usr/bin/env python
"""Peak memory of whole runs, and where it is reached: plain prunes and beta searches on
SmolLM2-135M, from a float32 HF folder (what llm-compressor loads) and from the GGUF.

Each configuration is a real `compress run` in its own process (same data as benchmarks/sparsity.py:
64 x 512 Brown calibration, 16 x 512 held-out Brown validation, 32 x 512 WikiText-2 evaluation,
bf16 calibration passes), with the export and its reload check on, as a user runs it. The peak is
the process's ru_maxrss; the phase that raised it comes from the run's own per-phase record
(results.json: memory). llm-compressor's numbers are read from results/llmcompressor/*.json
(benchmarks/llmcompressor_baseline.py on the same folder and token windows).

    python benchmarks/memory.py --folder /tmp/smollm2-hf     # make it: llmcompressor_baseline.py --make-model
    python benchmarks/memory.py --only wanda-50-atp-folder --force

Writes benchmarks/results/memory/<name>.json and benchmarks/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sparsity import data_section, require_inputs, run_recipe  # noqa: E402  (the same token windows as the sparsity table)

RESULTS = HERE / "results" / "memory"
ATP = {"kind": "atp", "beta": "auto", "trials": 5}
# name -> (model source: "folder" or "gguf", prune stage or None[, streamed])
CONFIGS = {
    "dense-folder": ("folder", None),
    "wanda-50-uniform-folder": ("folder", {"method": "wanda", "allocation": {"kind": "uniform"}}),
    "wanda-50-atp-folder": ("folder", {"method": "wanda", "allocation": ATP}),
    "sparsegpt-50-uniform-folder": ("folder", {"method": "sparsegpt", "allocation": {"kind": "uniform"}}),
    "sparsegpt-50-atp-folder": ("folder", {"method": "sparsegpt", "allocation": ATP}),
    "wanda-50-uniform-gguf": ("gguf", {"method": "wanda", "allocation": {"kind": "uniform"}}),
    "wanda-50-uniform-folder-streamed": ("folder", {"method": "wanda", "allocation": {"kind": "uniform"}}, True),
    "wanda-50-atp-folder-streamed": ("folder", {"method": "wanda", "allocation": ATP}, True),
}
LLMC = {"wanda-50-uniform-folder": "wanda_0.5.json", "sparsegpt-50-uniform-folder": "sparsegpt_0.5.json"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--folder", type=Path, default=Path("/tmp/smollm2-hf"), help="SmolLM2-135M as a float32 HF folder")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-memory"))
    p.add_argument("--only", nargs="*", choices=list(CONFIGS))
    p.add_argument("--force", action="store_true")
    return p.parse_args()


def recipe(args, name: str, source: str, stage: dict | None, streamed: bool = False) -> dict:
    return {
        "name": name,
        "seed": 0,
        "calibration_dtype": "bfloat16",
        "model": {"source": str(args.folder) if source == "folder" else "smollm2-135m", "stream": streamed},
        "data": data_section(args.data),
        "stages": [{"kind": "prune", "sparsity": 0.5, **stage}] if stage else [],
        "eval": {"perplexity": True, "dense": stage is None},
        "export": {"hf": True, "check": True},
        "output_dir": str(args.runs / name),
    }


def run_one(args, name: str) -> dict:
    source, stage, *streamed = CONFIGS[name]
    results, metadata, wall = run_recipe(args.runs, name, recipe(args, name, source, stage, *streamed))
    record = results["stages"][0] if results["stages"] else None
    return {
        "name": name,
        "source": source,
        "stage": stage,
        "perplexity": results["perplexity"]["compressed" if stage else "dense"]["ppl"],
        "beta": record["beta"] if record else None,
        "trials": len(record["search"]) if record and record.get("search") else 0,
        "peak_rss_mb": metadata["peak_rss_mb"],
        "peak_phase": results["memory"]["peak_phase"],
        "peak_rss_mb_after": results["memory"]["peak_rss_mb_after"],
        "seconds": results["seconds"],
        "wall_seconds": round(wall, 1),
        "versions": metadata["versions"],
        "git": metadata["git"],
    }


def import_floor_mb() -> float:
    """Peak RSS of a process that only imports what a run imports (torch, transformers, compress)."""
    code = "import resource, compress.cli, compress.run.engine; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def floor(args) -> dict:
    """What an in-memory Wanda run cannot go below: the imports, the float32 weights, and the two
    bf16 buffers of one block's calibration inputs and outputs (64 x 512 x hidden each)."""
    config = json.loads((args.folder / "config.json").read_text())
    weights = sum(f.stat().st_size for f in args.folder.glob("*.safetensors")) / 2**20
    buffers = 2 * 64 * 512 * config["hidden_size"] * 2 / 2**20
    return {"imports_mb": round(import_floor_mb(), 1), "weights_mb": round(weights, 1), "buffers_mb": round(buffers, 1)}


def table(rows: dict[str, dict], bound: dict | None = None) -> str:
    lines = [
        "# Peak memory of whole runs on SmolLM2-135M",
        "",
        "Peak resident memory (ru_maxrss) of a whole `compress run`: load, dense or compressed perplexity,",
        "pruning, export and the export's reload check. The phase is the one during which the peak was",
        "reached; the columns after it give the process peak at the end of each phase.",
        "",
        "| configuration | peak MB | reached in | after load | after data | after pruning | ppl | llm-compressor peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        after = r["peak_rss_mb_after"]
        prune = next((v for k, v in after.items() if k.startswith("stage0")), None)
        llmc = ""
        if name in LLMC and (HERE / "results" / "llmcompressor" / LLMC[name]).is_file():
            other = json.loads((HERE / "results" / "llmcompressor" / LLMC[name]).read_text())
            llmc = f"{other['peak_rss_mb']:.0f}"
        cells = [f"{r['peak_rss_mb']:.0f}", r["peak_phase"], f"{after.get('load_model', 0):.0f}", f"{after.get('data', 0):.0f}",
                 "-" if prune is None else f"{prune:.0f}", f"{r['perplexity']:.2f}", llmc]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pairs = [("wanda-50-atp-folder", "wanda-50-uniform-folder"), ("sparsegpt-50-atp-folder", "sparsegpt-50-uniform-folder")]
    ratios = [f"{a}: {rows[a]['peak_rss_mb'] / rows[b]['peak_rss_mb']:.2f}x {b}" for a, b in pairs if a in rows and b in rows]
    if ratios:
        lines += ["", "Beta search (5 trials) against the plain run: " + "; ".join(ratios) + "."]
    if bound:
        total = bound["imports_mb"] + bound["weights_mb"] + bound["buffers_mb"]
        lines += ["", f"The floor of an in-memory run: {bound['imports_mb']:.0f} MB of imports (torch, transformers, compress; "
                  f"a process that only imports them) + {bound['weights_mb']:.0f} MB of float32 weights + {bound['buffers_mb']:.0f} MB "
                  f"for one block's bf16 inputs and outputs = **{total:.0f} MB**. A streamed run (`model.stream: true`) holds "
                  "one block at a time instead of the weights (the embedding and head stay in memory)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    require_inputs(args.data, args.folder)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.only or CONFIGS:
        target = RESULTS / f"{name}.json"
        if target.exists() and not args.force:
            continue
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        row = run_one(args, name)
        target.write_text(json.dumps(row, indent=2) + "\n")
        print(f"    peak {row['peak_rss_mb']:.0f} MB in {row['peak_phase']}, ppl {row['perplexity']:.2f}, wall {row['wall_seconds']:.0f} s", flush=True)
    rows = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in CONFIGS if (RESULTS / f"{name}.json").is_file()}
    bound = floor(args)
    (RESULTS / "floor.json").write_text(json.dumps(bound, indent=2) + "\n")
    (HERE / "results" / "memory.md").write_text(table(rows, bound))
    print(table(rows, bound))


if __name__ == "__main__":
    main()
