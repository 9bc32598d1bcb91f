#!/usr/bin/env python
"""Layer-wise sparsity benchmark: uniform vs ATP (beta searched) vs OWL vs AlphaPruning, for Wanda
and SparseGPT at 50/60/70%, on SmolLM2-135M, each configuration a real `compress run`.

Setup (the ATP paper's protocol, with the data available offline):
  calibration  64 x 512 tokens at random offsets in the first part of the Brown corpus
  validation   16 x 512 tokens from the held-out last part of Brown: chooses beta, never reported
  evaluation   the first 32 x 512-token windows of WikiText-2 test (perplexity, reported)
  zero-shot    piqa, arc_easy, arc_challenge, openbookqa, winogrande, hellaswag (first --limit
               items each), for the sparsities in --zero-shot-at

Writes, per configuration, benchmarks/results/sparsity/<name>.json (what the run measured), then
benchmarks/results/sparsity<tag>.json and sparsity<tag>.md (the comparison table). Finished configurations
are skipped on a rerun (--force redoes them), so the benchmark can run in pieces.

    python benchmarks/sparsity.py --data ../shared/data
    python benchmarks/sparsity.py --methods wanda --sparsities 0.7 --allocators uniform atp
    python benchmarks/sparsity.py --dump-tokens /tmp/tokens   # the same segments, for other tools
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sparsity"
ALLOCATIONS = {
    "uniform": {"kind": "uniform"},
    "atp": {"kind": "atp", "beta": "auto", "trials": 5},
    "owl": {"kind": "owl"},
    "alpha": {"kind": "alpha"},
    "alpha-0.1": {"kind": "alpha", "epsilon": 0.1},  # opt-in: a narrower spread than the paper's 0.3
}
DEFAULT_ALLOCATORS = ["uniform", "atp", "owl", "alpha"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--model", default="smollm2-135m", help="model.source of every run (a folder loads without GGUF dequantisation)")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    p.add_argument("--allocators", nargs="+", default=DEFAULT_ALLOCATORS, choices=list(ALLOCATIONS))
    p.add_argument("--zero-shot-at", nargs="*", type=float, default=[0.7], help="sparsities that also get zero-shot tasks")
    p.add_argument("--limit", type=int, default=200, help="zero-shot items per task")
    p.add_argument("--calibration-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the runs' own outputs go")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--dump-tokens", type=Path, help="write calibration/evaluation token tensors here and stop")
    p.add_argument("--tag", default="", help="suffix for result names (e.g. a variant of the setup)")
    return p.parse_args()


def data_section(data: Path) -> dict:
    brown, wikitext = str(data / "brown.txt"), str(data / "wikitext2-test.raw")
    return {
        "calibration": {"source": brown, "nsamples": 64, "seqlen": 512, "seed": 0},
        "validation": {"source": brown, "nsamples": 16, "seqlen": 512},
        "evaluation": {"source": wikitext, "nsamples": 32, "seqlen": 512},
    }


def require_inputs(data: Path, folder: Path | None = None) -> None:
    """Stop with one line when the corpora (or the float32 model folder) are missing."""
    if not (data / "brown.txt").is_file():
        raise SystemExit(f"{data}/brown.txt not found: pass --data with the shared corpora folder")
    if folder is not None and not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} is not an HF folder: make it with benchmarks/llmcompressor_baseline.py --make-model")


def recipe(args, name: str, stage: dict | None, zero_shot: bool) -> dict:
    r = {
        "name": name,
        "seed": 0,
        "calibration_dtype": args.calibration_dtype,
        "model": {"source": args.model},
        "data": data_section(args.data),
        "stages": [stage] if stage else [],
        "eval": {"perplexity": True, "dense": stage is None},
        "export": {"hf": False},
        "output_dir": str(args.runs / name),
    }
    if zero_shot:
        r["eval"].update(tasks=["piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "hellaswag"],
                         tasks_dir=str(args.data / "zeroshot"), limit=args.limit)
    return r


def configurations(args) -> list[tuple[str, str | None, dict | None, bool]]:
    configs = [] if args.no_dense else [(f"dense{args.tag}", None, None, True)]
    for method in args.methods:
        for s in args.sparsities:
            for alloc in args.allocators:
                stage = {"kind": "prune", "method": method, "sparsity": s, "allocation": ALLOCATIONS[alloc]}
                configs.append((f"{method}-{int(s * 100)}-{alloc}{args.tag}", alloc, stage, s in args.zero_shot_at))
    return configs


def allocator(row: dict) -> str | None:
    """The allocator's name in ALLOCATIONS (rows written before names were stored: its kind)."""
    return row.get("allocator") or (row["record"]["allocation"]["kind"] if row["record"] else None)


def find(rows: list[dict], method: str, sparsity: float, alloc: str) -> dict | None:
    """The row of one table cell, if measured."""
    key = (method, sparsity, alloc)
    return next((r for r in rows if r["stage"] and (r["stage"]["method"], r["stage"]["sparsity"], allocator(r)) == key), None)


def run_recipe(runs: Path, name: str, recipe: dict) -> tuple[dict, dict, float]:
    """Write runs/<name>.yaml and `compress run` it in its own process (so peak RSS is the run's
    own); returns its results.json, metadata.json and the wall seconds. A failed run stops the
    benchmark with the run's last stderr."""
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compress", "run", str(path), "--overwrite", "-q"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    out = runs / name
    return json.loads((out / "results.json").read_text()), json.loads((out / "metadata.json").read_text()), wall


def run_one(args, name: str, alloc: str | None, stage: dict | None, zero_shot: bool) -> dict:
    results, metadata, wall = run_recipe(args.runs, name, recipe(args, name, stage, zero_shot))
    stages = results["stages"]
    for s in stages:
        s.pop("layer_achieved", None)  # in metadata.json of the run; too long for the summary
    return {
        "name": name,
        "allocator": alloc,
        "stage": stage,
        "perplexity": results["perplexity"]["compressed" if stage else "dense"],
        "zero_shot": results["zero_shot"]["compressed" if stage else "dense"],
        "record": stages[0] if stages else None,
        "prune_seconds": stages[0]["seconds"] if stages else 0.0,
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": metadata["peak_rss_mb"],
        "timings": metadata["timings"],
        "versions": metadata["versions"],
        "git": metadata["git"],
        "calibration_dtype": args.calibration_dtype,
        "tag": args.tag,
    }


def dump_tokens(args) -> None:
    """The exact calibration and evaluation segments our runs use, for another tool to read."""
    import torch

    from compress.data.windows import SegmentsConfig, build_segments
    from compress.model.load import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    section = data_section(args.data)
    segments = build_segments({role: SegmentsConfig(**section[role]) for role in section}, tokenizer)
    args.dump_tokens.mkdir(parents=True, exist_ok=True)
    torch.save(segments["calibration"].tokens, args.dump_tokens / "calib.pt")
    torch.save(segments["evaluation"].tokens, args.dump_tokens / "eval.pt")
    print(f"wrote {args.dump_tokens}/calib.pt {tuple(segments['calibration'].tokens.shape)} and eval.pt {tuple(segments['evaluation'].tokens.shape)}")


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown: perplexity (zero-shot mean acc) per method x sparsity x allocator."""
    by_name = {r["name"]: r for r in rows}
    dense = next((r for r in rows if r["stage"] is None), None)
    lines = ["# Layer-wise sparsity on SmolLM2-135M", ""]
    if dense:
        zs = dense["zero_shot"]
        lines.append(f"Dense: WikiText-2 perplexity {fmt(dense['perplexity']['ppl'])}"
                     + (f", zero-shot mean acc {zs['mean_acc']:.4f}" if zs else "") + ".")
        lines.append("")
    allocators = [a for a in ALLOCATIONS if any(allocator(r) == a for r in rows)]
    lines.append("WikiText-2 test perplexity (32 x 512 windows); zero-shot mean accuracy in brackets where measured.")
    lines.append("")
    lines.append("| method | sparsity | " + " | ".join(allocators) + " | ATP beta |")
    lines.append("|---|---|" + "---|" * len(allocators) + "---|")
    keys = sorted({(r["stage"]["method"], r["stage"]["sparsity"]) for r in rows if r["stage"]})
    for method, s in keys:
        cells = []
        for a in allocators:
            r = find(rows, method, s, a)
            if r is None:
                cells.append("-")
                continue
            cell = fmt(r["perplexity"]["ppl"])
            if r["zero_shot"]:
                cell += f" ({r['zero_shot']['mean_acc']:.4f})"
            cells.append(cell)
        atp = find(rows, method, s, "atp")
        lines.append(f"| {method} | {int(s * 100)}% | " + " | ".join(cells) + f" | {fmt(atp['record']['beta'], 4) if atp else '-'} |")
    lines += ["", "Cost per configuration (pruning seconds includes the beta search for ATP; peak RSS of the whole run):", "",
              "| configuration | prune s | search trials | wall s | peak RSS MB |", "|---|---|---|---|---|"]
    for name in sorted(by_name):
        r = by_name[name]
        trials = len(r["record"]["search"]) if r["record"] and r["record"].get("search") else "-"
        lines.append(f"| {name} | {fmt(r['prune_seconds'], 1)} | {trials} | {fmt(r['wall_seconds'], 1)} | {fmt(r['peak_rss_mb'], 0)} |")
    search_rows = [r for r in rows if r["record"] and r["record"].get("search")]
    if search_rows:
        lines += ["", "Beta search (validation perplexity on held-out Brown per trial):", ""]
        for r in search_rows:
            trials = ", ".join(f"{t['beta']:.4f}: {t['score']:.2f}" for t in r["record"]["search"])
            lines.append(f"- {r['name']}: {trials}; chose {r['record']['beta']:.4f}")
    zs_rows = [r for r in rows if r["zero_shot"]]
    if zs_rows:
        tasks = list(zs_rows[0]["zero_shot"]["tasks"])
        lines += ["", "Zero-shot accuracy per task (first items of each set; acc):", "",
                  "| configuration | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        for r in sorted(zs_rows, key=lambda r: r["name"]):
            accs = [r["zero_shot"]["tasks"][t]["acc"] for t in tasks]
            lines.append(f"| {r['name']} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {r['zero_shot']['mean_acc']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    require_inputs(args.data)
    if args.dump_tokens:
        return dump_tokens(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, alloc, stage, zero_shot in configurations(args):
        target = RESULTS / f"{name}.json"
        if target.exists() and not args.force:
            continue
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        row = run_one(args, name, alloc, stage, zero_shot)
        target.write_text(json.dumps(row, indent=2) + "\n")
        print(f"    ppl {row['perplexity']['ppl']:.2f}, prune {row['prune_seconds']:.0f} s, wall {row['wall_seconds']:.0f} s", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    rows = [r for r in rows if r["tag"] == args.tag]  # one table per setup variant
    (HERE / "results" / f"sparsity{args.tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (HERE / "results" / f"sparsity{args.tag}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
