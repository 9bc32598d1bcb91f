#!/usr/bin/env python
"""Low-rank, structured and LoRA recovery on SmolLM2-135M: uniform vs ATP-allocated ratios, with
perplexity, parameters, file size and measured torch tokens/s.

Protocol (as benchmarks/sparsity.py): 64 x 512 Brown calibration, 16 x 512 held-out Brown
validation (chooses ATP's beta; the recovery stage also reports its perplexity before/after on
it), perplexity on the first 32 x 512 windows of WikiText-2 test; bf16 calibration passes. Every
row is a real `compress run` from the float32 HF folder with the HF export and its reload check
on; the file size is that export's. Speed: the exported folder reloaded by our loader, torch
fp32, 2 threads, prefill of 512 tokens and decode of 128 new tokens after a 16-token prompt, median
of 3 after a warm-up (benchmarks/speed.py's measurement), one model at a time after all runs.

    python benchmarks/restructure.py --folder /tmp/smollm2-hf
    python benchmarks/restructure.py --only structured-20-uniform structured-20-atp --force
    python benchmarks/restructure.py --no-speed          # quality only

Writes benchmarks/results/restructure/<name>.json and benchmarks/results/restructure.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sparsity import data_section, require_inputs, run_recipe  # noqa: E402  (the same token windows as the sparsity table)

RESULTS = HERE / "results" / "restructure"
ATP = {"kind": "atp", "beta": "auto", "trials": 4}
UNIFORM = {"kind": "uniform"}
RECOVER = {"kind": "recover", "steps": 200, "seqlen": 128, "batch_size": 4, "lr": 1e-3, "rank": 8}


def lowrank(method: str, ratio: float, alloc: dict) -> dict:
    return {"kind": "lowrank", "method": method, "ratio": ratio, "allocation": alloc}


def structured(ratio: float, alloc: dict) -> dict:
    return {"kind": "structured", "ratio": ratio, "allocation": alloc}


def wanda(sparsity: float, alloc: dict) -> dict:
    return {"kind": "prune", "method": "wanda", "sparsity": sparsity, "allocation": alloc}


def configs(lowrank_ratios: list[float]) -> dict[str, tuple[list[dict], str]]:
    """name -> (stages, what the row shows)."""
    rows: dict[str, tuple[list[dict], str]] = {"dense": ([], "float32")}
    for ratio in lowrank_ratios:
        for method in ("svd", "asvd"):
            for name, alloc in (("uniform", UNIFORM), ("atp", ATP)):
                rows[f"lowrank-{method}-{int(ratio * 100)}-{name}"] = (
                    [lowrank(method, ratio, alloc)], f"{method}, {ratio:.0%} of block weights removed, {name}")
    rows["lowrank-asvd-20-residual80-uniform"] = (
        [{**lowrank("asvd", 0.2, UNIFORM), "residual_sparsity": 0.8}], "asvd + sparse residual keeping 20% of each row, 20% removed, uniform")
    rows["wanda-20-uniform"] = ([wanda(0.2, UNIFORM)], "Wanda 20% unstructured (the same weights removed, for reference)")
    for ratio in (0.2, 0.4):
        for name, alloc in (("uniform", UNIFORM), ("atp", ATP)):
            rows[f"structured-{int(ratio * 100)}-{name}"] = (
                [structured(ratio, alloc)], f"heads + channels, {ratio:.0%} of block weights removed, {name}")
    # recovery on a finished row's exported model (its folder is the model source): the compression
    # is not redone, and the row's own perplexity is the "before"
    rows["structured-20-atp+recover"] = ([RECOVER], "structured 20% ATP (that row's model), then LoRA recovery")
    rows["wanda-70-atp"] = ([wanda(0.7, ATP)], "Wanda 70%, ATP")
    rows["wanda-70-atp+recover"] = ([RECOVER], "Wanda 70% ATP (that row's model), then LoRA recovery (masked merge)")
    rows["structured-40-atp+recover"] = ([RECOVER], "structured 40% ATP (that row's model), then LoRA recovery")
    return rows


def parse_args(names: list[str]):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--folder", type=Path, default=Path("/tmp/smollm2-hf"), help="SmolLM2-135M as a float32 HF folder")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-restructure"))
    p.add_argument("--only", nargs="*", help=f"some of: {', '.join(names)}")
    p.add_argument("--lowrank-ratios", nargs="*", type=float, default=[0.1, 0.2])
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def source_of(args, name: str) -> Path:
    """The model a row starts from: the float32 folder, or for `<row>+recover` with stages
    [recover] only, that row's exported folder."""
    if not name.endswith("+recover"):
        return args.folder
    base = name.removesuffix("+recover")
    if not (args.runs / base / "results.json").is_file():
        raise SystemExit(f"{name} starts from the model of {base}: run that row first")
    return args.runs / base


def recipe(args, name: str, stages: list) -> dict:
    return {
        "name": name,
        "seed": 0,
        "calibration_dtype": "bfloat16",
        "model": {"source": str(source_of(args, name).resolve())},
        "data": data_section(args.data),
        "stages": stages,
        "eval": {"perplexity": True, "dense": not stages},
        "export": {"hf": True, "check": True},
        "output_dir": str(args.runs / name),
    }


def run_one(args, name: str, stages: list, what: str) -> dict:
    results, metadata, wall = run_recipe(args.runs, name, recipe(args, name, stages))
    for record in results["stages"]:
        for key in ("layer_achieved", "layer_rank", "layer_params", "layer_output_error", "losses"):
            if key == "losses" and key in record:
                record["losses_every_10"] = record["losses"][::10]
            record.pop(key, None)
    return {
        "name": name,
        "what": what,
        "perplexity": results["perplexity"]["compressed" if stages else "dense"]["ppl"],
        "params": results["size"]["params"],
        "block_linear_weights": results["size"]["block_linear_weights"],
        "file_mb": results["size"]["safetensors_mb"],
        "stage_seconds": [round(r["seconds"], 1) for r in results["stages"]],
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": metadata["peak_rss_mb"],
        "export": {k: results["export"]["hf"].get(k) for k in ("format", "weights", "parity")},
        "stages": results["stages"],
        "versions": metadata["versions"],
        "git": metadata["git"],
    }


def measure_speed(args, row: dict) -> dict:
    """torch fp32 tokens/s of the exported folder (prefill 512, decode 128), reloaded by our loader."""
    import torch

    from compress.evaluation.speed import torch_rates
    from compress.model.load import load_model

    torch.set_num_threads(args.threads)
    model = load_model(str(args.runs / row["name"])).model
    ids = torch.randint(0, 49152, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    rates = torch_rates(model, ids, 3)
    return {"prefill_512": round(rates["prefill_512"], 1), "decode_128": round(rates["decode_128"], 2), "threads": args.threads}


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    by_name = {r["name"]: r for r in rows}
    dense = by_name.get("dense")
    lines = ["# Low-rank, structured and recovery on SmolLM2-135M", "",
             "WikiText-2 test perplexity (32 x 512 windows); parameters of the whole model (embeddings included: 28.3 M of them);",
             "file: the HF export's weights (float32); tokens/s: torch fp32, 2 threads, relative to dense in brackets.", "",
             "| configuration | what | perplexity | params M | file MB | prefill 512 tok/s | decode tok/s | stage s | ATP beta |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = dense.get("speed") if dense else None

    def rel(row, key):
        s = row.get("speed")
        if not s:
            return "-"
        if not base or row is dense:
            return fmt(s[key], 1)
        return f"{s[key]:.1f} ({s[key] / base[key]:.2f}x)"

    for r in rows:
        beta = next((s.get("beta") for s in r["stages"] if s.get("beta") is not None), None)
        lines.append(f"| {r['name']} | {r['what']} | {fmt(r['perplexity'])} | {r['params'] / 1e6:.1f} | {fmt(r['file_mb'], 1)} | "
                     f"{rel(r, 'prefill_512')} | {rel(r, 'decode_128')} | {'+'.join(fmt(s, 0) for s in r['stage_seconds']) or '-'} | {fmt(beta, 4)} |")
    recov = [r for r in rows if any(s["kind"] == "recover" for s in r["stages"])]
    if recov:
        lines += ["", "Recovery (LoRA, masked merge): validation perplexity on held-out Brown before / after, training loss first / last steps:", ""]
        for r in recov:
            s = next(s for s in r["stages"] if s["kind"] == "recover")
            base = by_name.get(r["name"].removesuffix("+recover"))
            wiki = f"WikiText-2 {fmt(base['perplexity'])} -> {fmt(r['perplexity'])}; " if base else ""
            lines.append(f"- {r['name']}: {wiki}validation {fmt(s['ppl_before'])} -> {fmt(s['ppl_after'])}; loss {s['loss_first']:.3f} -> "
                         f"{s['loss_last']:.3f}; {s['zeros_kept']}/{s['zeros_before']} zeros kept; {s['seconds']:.0f} s")
    searched = [r for r in rows for s in r["stages"] if s.get("search")]
    if searched:
        lines += ["", "Beta search (validation perplexity per trial):", ""]
        for r in searched:
            s = next(s for s in r["stages"] if s.get("search"))
            lines.append(f"- {r['name']}: " + ", ".join(f"{t['beta']:.4f}: {t['score']:.2f}" for t in s["search"]) + f"; chose {s['beta']:.4f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args(list(configs([0.1, 0.2])))
    rows_config = configs(args.lowrank_ratios)
    require_inputs(args.data, args.folder)
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = args.only or list(rows_config)
    unknown = [n for n in names if n not in rows_config]
    if unknown:
        raise SystemExit(f"unknown configuration(s): {', '.join(unknown)}; choose from {', '.join(rows_config)}")
    for name in names:
        target = RESULTS / f"{name}.json"
        if target.exists() and not args.force:
            continue
        stages, what = rows_config[name]
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        row = run_one(args, name, stages, what)
        target.write_text(json.dumps(row, indent=2) + "\n")
        print(f"    ppl {row['perplexity']:.2f}, {row['params'] / 1e6:.1f} M params, wall {row['wall_seconds']:.0f} s", flush=True)
    if not args.no_speed:
        for name in names:  # after all runs, one model at a time: nothing else competes for the cores
            target = RESULTS / f"{name}.json"
            row = json.loads(target.read_text())
            if row.get("speed") and not args.force:
                continue
            row["speed"] = measure_speed(args, row)
            target.write_text(json.dumps(row, indent=2) + "\n")
            print(f"{name}: prefill {row['speed']['prefill_512']} tok/s, decode {row['speed']['decode_128']} tok/s", flush=True)
    order = {n: i for i, n in enumerate(rows_config)}
    rows = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")), key=lambda r: order.get(r["name"], len(order)))
    (HERE / "results" / "restructure.json").write_text(json.dumps(rows, indent=2) + "\n")
    (HERE / "results" / "restructure.md").write_text(table(rows))


if __name__ == "__main__":
    main()
