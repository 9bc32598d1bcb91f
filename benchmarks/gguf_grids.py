#!/usr/bin/env python
"""GGUF files of SmolLM2-135M: llama.cpp's own quantizer against GPTQ onto llama.cpp's block
formats (`quantize: {grid: ...}`, written block for block), uniform and allocated by depth (ATP),
and after Wanda 50% ATP; every file scored in llama.cpp itself.

Protocol (as benchmarks/sparsity.py): 64 x 512 Brown calibration, 16 x 512 held-out Brown
validation (chooses ATP's beta), perplexity on the first 32 x 512 windows of WikiText-2 test, here
computed by llama.cpp on the exported file (`eval.artefacts`); bf16 calibration passes. Sizes are
the GGUF files' in MB. Every row is a real `compress run` from the float32 HF folder.

SmolLM2's rows are 576 wide: no K-quant block fits them, so llama.cpp and we alike put those
matrices in the fallback formats (q4_k -> q5_0, q3_k / q2_k -> q4_0, q6_k -> q8_0); only the MLP's
down projection (1536 columns) is K-quant. Its shipped weights already sit on a Q4_1 grid (groups
of 32, asymmetric), which favours the 32-block formats near 4 bits.

    python benchmarks/gguf_grids.py --folder /tmp/smollm2-hf
    python benchmarks/gguf_grids.py --only gptq-q4_0 --force

Writes benchmarks/results/gguf_grids/<name>.json and benchmarks/results/gguf_grids.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sparsity import data_section, require_inputs, run_recipe  # noqa: E402  (the same token windows as the other tables)

RESULTS = HERE / "results" / "gguf_grids"
ANCHOR_TYPES = ["q4_0", "q4_k_m", "q3_k_m", "q2_k"]
ATP = {"kind": "atp", "beta": "auto", "trials": 4}
WANDA = {"kind": "prune", "method": "wanda", "sparsity": 0.5, "allocation": {"kind": "atp", "beta": "auto", "trials": 4}}


def gptq(grid: str, **extra) -> dict:
    return {"kind": "quantize", "method": "gptq", "grid": grid, **extra}


# name -> (stages, the named type it is compared with, what the row is)
ROWS = {
    "gptq-q4_0": ([gptq("q4_0")], "q4_0", "GPTQ onto Q4_0 blocks"),
    "rtn-q4_0": ([{"kind": "quantize", "method": "rtn", "grid": "q4_0"}], "q4_0", "round to nearest onto Q4_0 blocks (our scale search)"),
    "gptq-q4_k": ([gptq("q4_k")], "q4_k_m", "GPTQ onto Q4_K blocks (Q5_0 where rows are 576 wide)"),
    "gptq-q3_k": ([gptq("q3_k")], "q3_k_m", "GPTQ onto Q3_K blocks (Q4_0 where rows are 576 wide)"),
    "gptq-q2_k": ([gptq("q2_k", pure=True)], "q2_k", "GPTQ onto Q2_K blocks (Q4_0 where rows are 576 wide)"),
    # formats by depth at the size of llama.cpp's mix: the target is that file's mean bits per weight
    # over the blocks' matrices (the other tensors are the same in both files)
    "atp-q4_k-at-q4_k_m": ([gptq("q4_k", allocation=ATP, bits_per_weight="q4_k_m")], "q4_k_m", "GPTQ, K-quant formats by depth (ATP) at Q4_K_M's size"),
    "atp-q3_k-at-q3_k_m": ([gptq("q3_k", allocation=ATP, bits_per_weight="q3_k_m")], "q3_k_m", "GPTQ, K-quant formats by depth (ATP) at Q3_K_M's size"),
    "wanda50+gptq-q4_0": ([WANDA, gptq("q4_0")], "q4_0", "Wanda 50% ATP, then GPTQ onto Q4_0 (every zero kept)"),
    "wanda50+gptq-q4_k": ([WANDA, gptq("q4_k")], "q4_k_m", "Wanda 50% ATP, then GPTQ onto Q4_K / Q5_0"),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--folder", type=Path, default=Path("/tmp/smollm2-hf"), help="SmolLM2-135M as a float32 HF folder")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-gguf-grids"))
    p.add_argument("--only", nargs="*", choices=["llama.cpp", *ROWS])
    p.add_argument("--force", action="store_true")
    p.add_argument("--cost", action="store_true", help="time GPTQ g128 against GPTQ onto q4_0 / q4_k (stages only, one after another)")
    p.add_argument("--model", default="smollm2", help="a name for --folder's model: rows of another model go to results/gguf_grids/<model>/")
    args = p.parse_args()
    args.results = RESULTS if args.model == "smollm2" else RESULTS / args.model
    if args.model != "smollm2" and args.runs == Path("runs/bench-gguf-grids"):
        args.runs = Path(f"runs/bench-gguf-grids-{args.model}")
    return args


def recipe(args, name: str, stages: list, types: list[str]) -> dict:
    return {
        "name": name,
        "seed": 0,
        "calibration_dtype": "bfloat16",
        "model": {"source": str(args.folder)},
        "data": data_section(args.data),
        "stages": stages,
        "eval": {"perplexity": True, "dense": False, "artefacts": ["model", "gguf"]},
        "export": {"hf": False, "gguf": {"types": types}, "check": True, "check_windows": 2},
        "output_dir": str(args.runs / name),
    }


def file_rows(results: dict) -> dict:
    """type -> MB and llama.cpp perplexity of each GGUF file of a run."""
    files = results["export"]["gguf"]["files"]
    return {kind: {"mb": entry["mb"], "ppl": results["evaluations"][f"gguf {kind}"]["perplexity"]["ppl"], "how": entry["how"],
                   "zeros_kept": entry["zeros_kept"], "tensor_types": entry["tensor_types"]} for kind, entry in files.items()}


def block_matrix_bits(path: Path) -> float:
    """Mean stored bits per weight of a GGUF file's block matrices (blk.*.weight, 2-D)."""
    import math

    import gguf

    from compress.model.gguf_file import GgufIndex

    index = GgufIndex(path)
    types, bits, count = index.types(), 0.0, 0
    for name, info in index.tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(info.shape) == 2:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[name]]]
            bits += math.prod(info.shape) * 8 * size / block
            count += math.prod(info.shape)
    return bits / count


def anchor_bits(args, anchor: dict, kind: str) -> float:
    """The anchor file's block-matrix bits per weight, measured once and kept in its row."""
    if "block_matrix_bits" not in anchor["files"][kind]:
        anchor["files"][kind]["block_matrix_bits"] = block_matrix_bits(args.runs / "llama.cpp" / "gguf" / f"model-{kind}.gguf")
        (args.results / "llama.cpp.json").write_text(json.dumps(anchor, indent=2) + "\n")
    return anchor["files"][kind]["block_matrix_bits"]


def run(args, name: str, stages: list, types: list[str]) -> dict:
    out = args.results / f"{name}.json"
    if out.is_file() and not args.force:
        return json.loads(out.read_text())
    for stage in stages:  # a named type as the target: its file's bits per weight
        if isinstance(stage.get("bits_per_weight"), str):
            stage["bits_per_weight"] = round(anchor_bits(args, json.loads((args.results / "llama.cpp.json").read_text()), stage["bits_per_weight"]), 6)
    results, metadata, wall = run_recipe(args.runs, name, recipe(args, name, stages, types))
    row = {"name": name, "stages": stages, "files": file_rows(results), "torch_ppl": results["evaluations"]["model"]["perplexity"]["ppl"],
           "stage_seconds": [s["seconds"] for s in results["stages"]], "wall_seconds": round(wall, 1),
           "block_grids": [s.get("block_grids") for s in results["stages"]], "notes": results["export"]["gguf"]["notes"],
           "versions": metadata["versions"]}
    args.results.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    return row


# anchors measured by their own scripts (results/gguf_grids/<name>.json, same "files" layout):
# llama.cpp's quantizer with an importance matrix (benchmarks/imatrix_anchor.sh) and AutoRound's
# GGUF export (benchmarks/autoround_gguf.py, its own venv)
ANCHORS = {"llama.cpp": "llama.cpp's quantizer (from F32)", "llama.cpp-imatrix": "llama.cpp's quantizer with an importance matrix",
           "autoround": "AutoRound, default tuning", "autoround-iters0": "AutoRound, iters=0"}


def table(rows: dict) -> str:
    """One section per named type: every anchor's file and ours compared with it, MB and perplexity.
    Seconds are left out: rows ran on a shared machine (the cost comparison is --cost's)."""
    lines = ["| type | file | MB | ppl (llama.cpp) |", "|---|---|---|---|"]
    for kind in ANCHOR_TYPES:
        entries = []
        for name, what in ANCHORS.items():
            for file_kind, entry in rows.get(name, {}).get("files", {}).items():
                if file_kind == kind or entry.get("as") == kind:
                    entries.append((what, entry))
        for name, (stages, against, what) in ROWS.items():
            if against == kind and name in rows:
                earlier = " (earlier scale search)" if rows[name].get("code_note") else ""
                entries.append(("ours: " + what + earlier, rows[name]["files"]["grid"]))
        best = min((e["ppl"] for what, e in entries if "Wanda" not in what), default=None)
        for what, entry in entries:
            ppl = f"**{entry['ppl']:.2f}**" if entry["ppl"] == best else f"{entry['ppl']:.2f}"
            lines.append(f"| {kind} | {what} | {entry['mb']:.2f} | {ppl} |")
    return "\n".join(lines)


def read_rows(folder: Path) -> dict:
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json")) if path.stem != "cost"}


COST_ROWS = {"gptq-int4-g128": {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 128},
             "gptq-q4_0": gptq("q4_0"), "gptq-q4_k": gptq("q4_k")}


def cost(args) -> dict:
    """Seconds of the quantize stage alone (no evaluation, no export), each run in its own process,
    one after another: item 7's comparison. Run it on an otherwise idle machine."""
    rows = {}
    for name, stage in COST_ROWS.items():
        r = recipe(args, f"cost-{name}", [stage], [])
        r["eval"], r["export"] = {"perplexity": False}, {"hf": False, "check": False}
        results, metadata, wall = run_recipe(args.runs, f"cost-{name}", r)
        rows[name] = {"quantize_seconds": results["stages"][0]["seconds"], "wall_seconds": round(wall, 1), "peak_rss_mb": metadata["peak_rss_mb"]}
    base = rows["gptq-int4-g128"]["quantize_seconds"]
    for row in rows.values():
        row["vs_g128"] = round(row["quantize_seconds"] / base, 2)
    (args.results / "cost.json").write_text(json.dumps({"rows": rows, "versions": metadata["versions"]}, indent=2) + "\n")
    return rows


def main() -> int:
    args = parse_args()
    require_inputs(args.data, args.folder)
    if args.cost:
        print(json.dumps(cost(args), indent=2))
        return 0
    names = args.only or ["llama.cpp", *ROWS]
    if "llama.cpp" in names or not (args.results / "llama.cpp.json").is_file():
        run(args, "llama.cpp", [], ANCHOR_TYPES)
    for name in names:
        if name in ROWS:
            run(args, name, ROWS[name][0], ["grid"])
    sections = [("SmolLM2-135M", read_rows(RESULTS))]
    sections += [(folder.name, read_rows(folder)) for folder in sorted(RESULTS.iterdir()) if folder.is_dir()]
    text = "\n\n".join(f"## {title}\n\n{table(rows)}" for title, rows in sections if "llama.cpp" in rows)
    (HERE / "results" / "gguf_grids.md").write_text(
        "# GGUF files: llama.cpp's quantizer and AutoRound vs GPTQ onto llama.cpp's block formats\n\n"
        "WikiText-2 perplexity computed by llama.cpp on each file (32 x 512 windows), file MB. "
        "`python benchmarks/gguf_grids.py`; bold: the lowest perplexity per type (pruned rows aside).\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
