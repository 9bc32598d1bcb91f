#!/usr/bin/env python
"""GGUF files at equal bytes, judged as the llama.cpp community judges them: KL divergence of each
file's next-token distribution to the F16 file's (llama-perplexity --kl-divergence), and perplexity,
both on WikiText-2 test. SmolLM2-135M and Gemma-3-270M in one run.

Rows per type (Q4_0, Q4_K_M, Q3_K_M, Q2_K):
- llama.cpp's quantizer from the F32 file, without and with an importance matrix (llama-imatrix
  on the first 64 x 512 tokens of Brown, the calibration text; never the evaluation text);
- ours: `quantize: {method: gptq, grid: <type>}`: GPTQ onto each matrix's own format in llama.cpp's
  mix (compress/algorithms/ggml_mixes.py), scales refitted after GPTQ (ggml_refit.py), 64 x 512 Brown
  calibration windows; `export.gguf.types: [grid]`; and the same without the refit (SmolLM2);
  and with `scale_weights: obs` (--obs: each span's scale search weighs columns by GPTQ's own loss);
- ours, formats by depth: `grid: q4_k | q3_k | q2_k` (pure), `allocation: atp` (beta searched, 4
  trials), `bits_per_weight` = llama.cpp's file's mean over the block matrices and its token_embd
  type, so the file is at most llama.cpp's bytes (Q4_0 has no row: nothing below Q4_0 in its family);
- AutoRound iters=0 (its optimised round to nearest), made in its own venv by
  benchmarks/autoround_gguf.py (--autoround names its output folder).
Both families' shipped weights already sit on 4-bit grids (SmolLM2: Q4_1-like groups of 32;
Gemma 3 270M: its Q4_K_M release); the F32 / F16 files hold those values exactly.

Needs llama.cpp's tools built from the llama-cpp-python sdist (benchmarks/imatrix_anchor.sh steps
1-2, plus the llama-perplexity target): --bin names their folder.

    python benchmarks/gguf_kld.py --bin /tmp/lcpp-build/bin
    python benchmarks/gguf_kld.py --models smollm2 --types q4_0 --force

Writes benchmarks/results/gguf_kld/<model>/<row>.json and benchmarks/results/gguf_kld.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gguf_grids import block_matrix_bits  # noqa: E402
from sparsity import data_section, require_inputs, run_recipe  # noqa: E402  (the same token windows as the other tables)

RESULTS = HERE / "results" / "gguf_kld"
MODELS = {"smollm2": "smollm2-135m", "gemma3-270m": "gemma3-270m"}
TYPES = ["q4_0", "q4_k_m", "q3_k_m", "q2_k"]
ATP_GRID = {"q4_k_m": "q4_k", "q3_k_m": "q3_k", "q2_k": "q2_k"}  # formats by depth: the family of the type's main format
EVAL_CHUNKS, CTX, IMATRIX_CHUNKS = 32, 512, 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--bin", type=Path, default=Path("/tmp/lcpp-build/bin"), help="llama-imatrix, llama-quantize, llama-perplexity")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-gguf-kld"))
    p.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--types", nargs="*", choices=TYPES, default=TYPES)
    p.add_argument("--refit", choices=["on", "off", "both"], default="both", help="our rows with the scale refit, without, or both")
    p.add_argument("--obs", action="store_true", help="also our rows with scale_weights obs (GPTQ's own column weights in the scale search)")
    p.add_argument("--atp", action="store_true", help="also the formats-by-depth rows (a 4-trial beta search each)")
    p.add_argument("--autoround", type=Path, default=Path("/tmp/autoround-out"), help="benchmarks/autoround_gguf.py's output: its iters=0 files are scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    return p.parse_args()


def tool(args, name: str, *argv, log: Path) -> str:
    proc = subprocess.run([str(args.bin / name), *map(str, argv)], capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (log: {log}):\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def recipe(args, model: str, name: str, stages: list, types: list[str], check: bool) -> dict:
    return {"name": name, "seed": 0, "calibration_dtype": "bfloat16", "model": {"source": MODELS[model]},
            "data": data_section(args.data), "stages": stages, "eval": {"perplexity": False},
            "export": {"hf": False, "gguf": {"types": types}, "check": check, "check_windows": 2},
            "output_dir": str(args.runs / model / name)}


def scored(args, model: str, gguf: Path, base_logits: Path) -> dict:
    """llama-perplexity against the F16 file's logits: PPL, mean KLD, same top token."""
    out = tool(args, "llama-perplexity", "-m", gguf, "-f", args.data / "wikitext2-test.raw", "-c", CTX, "--chunks", EVAL_CHUNKS,
               "-t", args.threads, "--kl-divergence-base", base_logits, "--kl-divergence", log=gguf.with_suffix(".kld.log"))

    def number(pattern):
        m = re.search(pattern + r"\s*:?\s*([-\d.]+)\s*±\s*([-\d.]+)", out)
        return (float(m.group(1)), float(m.group(2))) if m else (None, None)

    ppl, ppl_err = number(r"Mean PPL\(Q\)")
    kld, kld_err = number(r"Mean\s+KLD")
    top, _ = number(r"Same top p")
    return {"ppl": ppl, "ppl_err": ppl_err, "kld": kld, "kld_err": kld_err, "same_top_p": top,
            "mb": round(gguf.stat().st_size / 2**20, 3), "bytes": gguf.stat().st_size}


def row(args, model: str, name: str, make, base_logits: Path) -> dict:
    out = RESULTS / model / f"{name}.json"
    if out.is_file() and not args.force:
        return json.loads(out.read_text())
    start = time.perf_counter()
    gguf, extra = make()
    result = {"name": name, **scored(args, model, gguf, base_logits), "make_seconds": round(time.perf_counter() - start, 1), **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def bench_model(args, model: str) -> dict:
    work = args.runs / model
    base = work / "base" / "gguf"
    if not (base / "model-f16.gguf").is_file() or args.force:
        run_recipe(work, "base", recipe(args, model, "base", [], ["f32", "f16"], check=False))
    f32, f16 = base / "model-f32.gguf", base / "model-f16.gguf"
    logits = work / "f16.kld"
    if not logits.is_file() or args.force:
        tool(args, "llama-perplexity", "-m", f16, "-f", args.data / "wikitext2-test.raw", "-c", CTX, "--chunks", EVAL_CHUNKS,
             "-t", args.threads, "--kl-divergence-base", logits, log=work / "f16-base.log")
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file() or args.force:
        tool(args, "llama-imatrix", "-m", f32, "-f", args.data / "brown.txt", "-c", CTX, "--chunks", IMATRIX_CHUNKS, "-t", args.threads,
             "-o", imatrix, log=work / "imatrix.log")
    rows = {"f16": row(args, model, "f16", lambda: (f16, {}), logits)}
    for kind in args.types:
        for variant, extra in (("llama.cpp", []), ("llama.cpp-imatrix", ["--imatrix", imatrix])):
            out = work / f"{variant}-{kind}.gguf"
            rows[f"{variant}-{kind}"] = row(args, model, f"{variant}-{kind}", lambda out=out, extra=extra, kind=kind: quantized(args, extra, f32, out, kind), logits)
        refits = {"on": (True,), "off": (False,), "both": (False, True)}[args.refit]
        for refit in refits:
            name = f"gptq-{kind}" + ("" if refit else "-norefit")
            rows[name] = row(args, model, name, lambda name=name, kind=kind, refit=refit: ours(args, model, name, kind, refit), logits)
        if args.obs:
            name = f"gptq-{kind}-obs"
            rows[name] = row(args, model, name, lambda name=name, kind=kind: ours(args, model, name, kind, False, "obs"), logits)
        if args.atp and kind in ATP_GRID:
            anchor = work / f"llama.cpp-{kind}.gguf"
            rows[f"atp-{kind}"] = row(args, model, f"atp-{kind}", lambda kind=kind, anchor=anchor: by_depth(args, model, kind, anchor), logits)
        made = autoround_file(args, model, kind)
        if made is not None:
            rows[f"autoround-{kind}"] = row(args, model, f"autoround-{kind}", lambda made=made: (made, {"source": str(made)}), logits)
    return rows


def autoround_file(args, model: str, kind: str) -> Path | None:
    """AutoRound's iters=0 file of this model and type, if benchmarks/autoround_gguf.py made one."""
    results = args.autoround / "results.json"
    if not results.is_file():
        return None
    for entry in json.loads(results.read_text()):
        formats = (f"gguf:{kind}", "gguf:q2_k_s") if kind == "q2_k" else (f"gguf:{kind}",)  # AutoRound's Q2_K scheme is named q2_k_s
        if entry.get("model", "smollm2") == model and entry["format"] in formats and entry["iters"] == 0:
            return Path(entry["gguf"])
    return None


def quantized(args, extra: list, f32: Path, out: Path, kind: str) -> tuple[Path, dict]:
    tool(args, "llama-quantize", *extra, f32, out, kind.upper(), args.threads, log=out.with_suffix(".log"))
    return out, {}


def ours(args, model: str, name: str, kind: str, refit: bool, scale_weights: str = "hessian") -> tuple[Path, dict]:
    stage = {"kind": "quantize", "method": "gptq", "grid": kind, "scale_refit": refit, "scale_weights": scale_weights}
    results, metadata, wall = run_recipe(args.runs / model, name, recipe(args, model, name, [stage], ["grid"], check=True))
    entry = results["export"]["gguf"]["files"]["grid"]
    return args.runs / model / name / "gguf" / entry["file"], {
        "stage_seconds": results["stages"][0]["seconds"], "wall_seconds": round(wall, 1), "tensor_types": entry["tensor_types"],
        "grid_matrices": entry.get("grid_matrices"), "base": entry.get("base"), "notes": results["export"]["gguf"]["notes"],
        "layer_grids": results["stages"][0]["layer_grids"]}


def by_depth(args, model: str, kind: str, anchor: Path) -> tuple[Path, dict]:
    """GPTQ onto formats by depth (ATP) at llama.cpp's file's bytes: the same mean bits per weight
    over the block matrices, and the same token_embd type (the other tensors are float in both)."""
    from compress.model.gguf_file import GgufIndex

    embedding = GgufIndex(anchor).types()["token_embd.weight"].lower()
    stage = {"kind": "quantize", "method": "gptq", "grid": ATP_GRID[kind], "pure": kind == "q2_k",
             "allocation": {"kind": "atp", "beta": "auto", "trials": 4}, "bits_per_weight": round(block_matrix_bits(anchor), 6)}
    name = f"atp-{kind}"
    body = recipe(args, model, name, [stage], ["grid"], check=True)
    body["export"]["gguf"]["embedding_type"] = embedding
    results, metadata, wall = run_recipe(args.runs / model, name, body)
    entry, record = results["export"]["gguf"]["files"]["grid"], results["stages"][0]
    return args.runs / model / name / "gguf" / entry["file"], {
        "stage_seconds": record["seconds"], "wall_seconds": round(wall, 1), "tensor_types": entry["tensor_types"],
        "bits_per_weight": stage["bits_per_weight"], "embedding_type": embedding, "block_grids": record["block_grids"],
        "beta": record.get("beta"), "notes": results["export"]["gguf"]["notes"]}


WHAT = {"llama.cpp": "llama.cpp's quantizer", "llama.cpp-imatrix": "llama.cpp + imatrix", "gptq-norefit": "ours: GPTQ onto the mix",
        "gptq": "ours: GPTQ onto the mix, + scale refit", "gptq-obs": "ours: GPTQ onto the mix, scales weighted by GPTQ's loss (obs)",
        "autoround": "AutoRound, iters=0", "atp": "ours: GPTQ, formats by depth (ATP)"}


def table(rows: dict) -> str:
    f16 = rows["f16"]
    lines = [f"F16: {f16['mb']:.2f} MB, ppl {f16['ppl']:.3f}\n", "| type | file | MB | bytes vs llama.cpp | ppl | mean KLD | same top token |", "|---|---|---|---|---|---|---|"]
    for kind in TYPES:
        entries = [(what, rows.get(f"{key}-{kind}" if not key.startswith("gptq") else key.replace("gptq", f"gptq-{kind}")))
                   for key, what in WHAT.items()]
        entries = [(w, r) for w, r in entries if r]
        if not entries:
            continue
        anchor = rows.get(f"llama.cpp-{kind}")
        best = min(r["kld"] for _, r in entries)
        for what, r in entries:
            kld = f"**{r['kld']:.4f}**" if r["kld"] == best else f"{r['kld']:.4f}"
            same = "" if anchor is None else f"{r['bytes'] - anchor['bytes']:+d}"
            lines.append(f"| {kind} | {what} | {r['mb']:.2f} | {same} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} | {kld} ± {r['kld_err']:.4f} | {r['same_top_p']:.2f}% |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    require_inputs(args.data)
    for name in ("llama-imatrix", "llama-quantize", "llama-perplexity"):
        if not (args.bin / name).is_file():
            raise SystemExit(f"{args.bin / name} not found: build llama.cpp's tools (benchmarks/imatrix_anchor.sh steps 1-2, with llama-perplexity)")
    for model in args.models:
        bench_model(args, model)
    sections = []
    for model in MODELS:
        folder = RESULTS / model
        if folder.is_dir():
            sections.append(f"## {model}\n\n" + table({p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}))
    text = "\n\n".join(sections)
    (HERE / "results" / "gguf_kld.md").write_text(
        "# GGUF files at equal bytes: KL divergence to F16\n\n"
        f"llama-perplexity on WikiText-2 test ({EVAL_CHUNKS} chunks x {CTX} tokens, second half of each chunk scored), "
        "KL divergence to the F16 file's logits; importance matrix and our calibration from Brown. "
        "`python benchmarks/gguf_kld.py`; bold: the lowest KLD per type.\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
