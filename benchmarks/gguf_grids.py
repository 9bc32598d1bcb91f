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
    "gptq-q2_k": ([gptq("q2_k")], "q2_k", "GPTQ onto Q2_K blocks (Q4_0 where rows are 576 wide)"),
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
    return p.parse_args()


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
    from compress.export.gguf_index import GgufIndex

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
        (RESULTS / "llama.cpp.json").write_text(json.dumps(anchor, indent=2) + "\n")
    return anchor["files"][kind]["block_matrix_bits"]


def run(args, name: str, stages: list, types: list[str]) -> dict:
    out = RESULTS / f"{name}.json"
    if out.is_file() and not args.force:
        return json.loads(out.read_text())
    for stage in stages:  # a named type as the target: its file's bits per weight
        if isinstance(stage.get("bits_per_weight"), str):
            stage["bits_per_weight"] = round(anchor_bits(args, json.loads((RESULTS / "llama.cpp.json").read_text()), stage["bits_per_weight"]), 6)
    results, metadata, wall = run_recipe(args.runs, name, recipe(args, name, stages, types))
    row = {"name": name, "stages": stages, "files": file_rows(results), "torch_ppl": results["evaluations"]["model"]["perplexity"]["ppl"],
           "stage_seconds": [s["seconds"] for s in results["stages"]], "wall_seconds": round(wall, 1),
           "block_grids": [s.get("block_grids") for s in results["stages"]], "notes": results["export"]["gguf"]["notes"],
           "versions": metadata["versions"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    return row


def table(rows: dict) -> str:
    anchors = rows["llama.cpp"]["files"]
    lines = ["| type | llama.cpp's quantizer: MB / ppl | ours | MB / ppl | quantize s |", "|---|---|---|---|---|"]
    for name, (stages, against, what) in ROWS.items():
        if name not in rows:
            continue
        ours = rows[name]["files"]["grid"]
        anchor = anchors[against]
        lines.append(f"| {against} | {anchor['mb']:.1f} / {anchor['ppl']:.2f} | {what} | {ours['mb']:.1f} / **{ours['ppl']:.2f}** | "
                     f"{sum(rows[name]['stage_seconds']):.0f} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    require_inputs(args.data, args.folder)
    names = args.only or ["llama.cpp", *ROWS]
    rows = {}
    if "llama.cpp" in names or not (RESULTS / "llama.cpp.json").is_file():
        rows["llama.cpp"] = run(args, "llama.cpp", [], ANCHOR_TYPES)
    for name in names:
        if name in ROWS:
            rows[name] = run(args, name, ROWS[name][0], ["grid"])
    for path in sorted(RESULTS.glob("*.json")):  # rows run earlier
        rows.setdefault(path.stem, json.loads(path.read_text()))
    text = table(rows)
    (HERE / "results" / "gguf_grids.md").write_text("# GGUF files of SmolLM2-135M: llama.cpp's quantizer vs GPTQ onto its block formats\n\n"
                                                    "WikiText-2 perplexity in llama.cpp (32 x 512), file MB. `python benchmarks/gguf_grids.py`.\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
