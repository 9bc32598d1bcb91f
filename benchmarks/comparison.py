#!/usr/bin/env python
"""Combined strategies on SmolLM2-135M, measured on what is deployed: each recipe's GGUF file in
llama.cpp (WikiText-2 perplexity, six zero-shot tasks, tokens/s), through `compress compare`.

Protocol (as benchmarks/sparsity.py): 64 x 512 Brown calibration, 16 x 512 held-out Brown
validation (chooses every ATP beta), perplexity on the first 32 x 512 windows of WikiText-2 test;
bf16 calibration passes; zero-shot on the first --limit items of each of the six local tasks
(lm-eval 0.4.13 task definitions; acc with its binomial standard error). Float rows are exported
as GGUF q8_0, GPTQ rows as GGUF q4_0 (llama.cpp requantises the g128 grid into blocks of 32).
Every row is a real `compress run` of a recipe written to runs/bench-compare/<name>.yaml, with
`eval.artefacts: [gguf:<type>]`: the numbers are llama.cpp's on the exported file. Finished runs are read, not
rerun (their run_id matches). Speed: llama.cpp tokens/s of each row's GGUF, measured after all
runs, one file at a time (eval.speed inside the runs would compete with whatever else runs), and
written into that run's results.json as `speed` with "measured_after_run": true.

    python benchmarks/comparison.py --folder /tmp/smollm2-hf
    python benchmarks/comparison.py --only dense wanda-60-atp --no-speed

Writes benchmarks/results/comparison/ (comparison.md, .csv, .json, plots, and runs/<row>/ with each
row's results.json and metadata.json, from which the table rebuilds without the run folders).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sparsity import data_section, require_inputs  # noqa: E402  (the same token windows as the sparsity table)

OUT = HERE / "results" / "comparison"
TASKS = ["piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "hellaswag"]
ATP = {"kind": "atp", "beta": "auto", "trials": 4}
GPTQ4 = {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 128, "sym": True, "keep_sparsity": True}


def wanda(sparsity: float, alloc: dict) -> dict:
    return {"kind": "prune", "method": "wanda", "sparsity": sparsity, "allocation": alloc}


ROWS: dict[str, list[dict]] = {  # in the order they run (the cheap and central ones first)
    "dense": [],
    "wanda-60-uniform": [wanda(0.6, {"kind": "uniform"})],
    "wanda-60-atp": [wanda(0.6, ATP)],
    "wanda-50-atp+gptq-4": [wanda(0.5, ATP), GPTQ4],
    "gptq-4": [GPTQ4],
    "structured-20-atp": [{"kind": "structured", "ratio": 0.2, "allocation": ATP}],
    "structured-10+wanda-30+gptq-4": [{"kind": "structured", "ratio": 0.1, "allocation": ATP}, wanda(0.3, ATP), GPTQ4],
    "lowrank-asvd-10-atp": [{"kind": "lowrank", "method": "asvd", "ratio": 0.1, "allocation": ATP}],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--folder", type=Path, default=Path("/tmp/smollm2-hf"), help="SmolLM2-135M as a float32 HF folder")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-compare"))
    p.add_argument("--only", nargs="*", choices=list(ROWS))
    p.add_argument("--limit", type=int, default=300, help="items per zero-shot task")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def gguf_type(stages: list[dict]) -> str:
    return "q4_0" if any(s["kind"] == "quantize" for s in stages) else "q8_0"


def recipe(args, name: str, stages: list[dict]) -> dict:
    kind = gguf_type(stages)
    return {
        "name": name,
        "seed": 0,
        "threads": args.threads,
        "calibration_dtype": "bfloat16",
        "model": {"source": str(args.folder.resolve())},
        "data": data_section(args.data),
        "stages": stages,
        "eval": {"perplexity": True, "dense": False, "tasks": TASKS, "tasks_dir": str((args.data / "zeroshot").resolve()),
                 "limit": args.limit, "artefacts": [f"gguf:{kind}"]},
        "export": {"hf": True, "gguf": {"types": [kind]}, "check": True},
        "output_dir": str(args.runs / name),
    }


def measure_speed(args, run_dir: Path) -> bool:
    """llama.cpp tokens/s of the run's GGUF files not timed yet, on WikiText-2 text, written into
    its results.json. False (and nothing read or written) when every file was timed already."""
    import torch

    from compress.data.text import read_text
    from compress.evaluation.speed import llama_rates
    from compress.model.load import read_tokenizer

    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    untimed = {label: ev for label, ev in results["evaluations"].items()
               if ev["artefact"] == "gguf" and not (ev.get("speed") or {}).get("measured_after_run")}
    if not untimed:
        return False
    torch.set_num_threads(args.threads)
    tokenizer = read_tokenizer(str(run_dir))
    ids = tokenizer(read_text(str(args.data / "wikitext2-test.raw"), "evaluation")[:20000], add_special_tokens=False).input_ids
    for label, ev in untimed.items():
        ev["speed"] = {**llama_rates(run_dir / ev["path"], ids, 3), "threads": args.threads, "measured_after_run": True}
        print(f"  {run_dir.name} {label}: {ev['speed']}", flush=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return True


def keep_record(args, name: str) -> None:
    """A copy of the run's results.json and metadata.json under OUT/runs/<name>/ (committed), so
    the table and its plots rebuild on a clone where runs/ (hundreds of MB of models) is absent."""
    kept = OUT / "runs" / name
    kept.mkdir(parents=True, exist_ok=True)
    for file in ("results.json", "metadata.json"):
        shutil.copyfile(args.runs / name / file, kept / file)


def previous_rows() -> list[dict]:
    """The rows of the committed table (rows whose run folders are gone live only there)."""
    return json.loads((OUT / "comparison.json").read_text())["rows"] if (OUT / "comparison.json").is_file() else []


def write_table(args) -> None:
    """Rows from the run folders where present, else from the kept records; rows measured before
    records were kept (and whose run folders are gone) are carried over from the last table."""
    from compress.reports.compare import Entry, write_comparison
    from compress.run.compare import entries_from_args

    previous = previous_rows()
    entries, carried = [], []
    for name in ROWS:
        recipe_file = args.runs / f"{name}.yaml"
        if (args.runs / name / "results.json").is_file():
            entries += entries_from_args([str(recipe_file)], run_missing=False)
        elif (OUT / "runs" / name / "results.json").is_file():
            entries.append(Entry(name, OUT / "runs" / name, f"compress run {recipe_file}"))
        else:
            carried += [row for row in previous if row["run"] == name]
    write_comparison(entries, OUT, carried)


def main() -> None:
    args = parse_args()
    require_inputs(args.data, args.folder)
    args.runs.mkdir(parents=True, exist_ok=True)
    # rows recorded in OUT (kept records or the last table) are not rerun unless named with --only
    recorded = {row["run"] for row in previous_rows() if not row.get("error")} | {p.name for p in (OUT / "runs").glob("*") if (p / "results.json").is_file()}
    names = args.only or [n for n in ROWS if n not in recorded or (args.runs / n / "results.json").is_file()]
    for name in names:
        path = args.runs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(args, name, ROWS[name]), sort_keys=False))
        # compress compare runs the recipe unless a finished run of it (same run_id) is there; one
        # process per row, so that each run's peak RSS is its own
        start = time.perf_counter()
        print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "compress", "compare", str(path), "--out", str(args.runs / ".single"), "-q"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        print(f"    {time.perf_counter() - start:.0f} s", flush=True)
        keep_record(args, name)
        write_table(args)  # the table so far
    if not args.no_speed:
        # after all runs, one file at a time, every row with a run folder (a row whose folder is gone
        # has no GGUF to time); rows already timed are skipped, so a rerun only times the new ones
        for name in ROWS:
            if (args.runs / name / "results.json").is_file() and measure_speed(args, args.runs / name):
                keep_record(args, name)
        write_table(args)
    print(f"wrote {OUT}/comparison.md")


if __name__ == "__main__":
    main()
