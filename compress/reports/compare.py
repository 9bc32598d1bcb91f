"""`compress compare`: finished runs side by side in one table (markdown, CSV, JSON) with plots.

A row is one run measured on one artefact: the in-memory model (`model`), or an export reloaded
in its own runtime (`hf`, `gguf q4_k_m`, `onnx`; see eval.artefacts). Every number is read from the run's
results.json / metadata.json: nothing is loaded or recomputed here (compress/run/compare.py
finds the runs, running a recipe that has none).

Columns: perplexity; zero-shot accuracy per task and their mean, each with its standard error
(binomial, sqrt(p(1-p)/(n-1))); mean sparsity and stored bits per weight of the decoder-block
Linears (for a GGUF row: the file's bits per parameter, embeddings included); parameters; the artefact's file size (the HF export's safetensors for `model` rows);
compression seconds (the stages); peak resident memory; tokens/s where eval.speed measured them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError
from compress.reports import pareto

log = logging.getLogger("compress")

TASK_SHORT = {"piqa": "piqa", "arc_easy": "arc-e", "arc_challenge": "arc-c", "openbookqa": "obqa", "winogrande": "wino", "hellaswag": "hella"}


@dataclass
class Entry:
    name: str
    run_dir: Path | None  # a finished run's output_dir (holds results.json, metadata.json)
    command: str | None = None  # how to reproduce the row, e.g. "compress run DIR/recipes/x.yaml"
    error: str | None = None  # one-line error of a failed run


# ---------------------------------------------------------------- collecting runs


# ---------------------------------------------------------------- rows


def read_run(run_dir: Path) -> tuple[dict, dict]:
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        meta_path = run_dir / "metadata.json"
        metadata = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise CompressError(f"{run_dir}: cannot read the run's results ({err})") from None
    return results, metadata


def evaluations(results: dict) -> dict:
    """{artefact label: {perplexity, zero_shot, speed, ...}}; runs written before eval.artefacts existed
    measured the in-memory model only."""
    if results.get("evaluations"):
        return results["evaluations"]
    which = "compressed" if results["stages"] else "dense"
    return {"model": {"artefact": "model", "perplexity": results["perplexity"].get(which), "zero_shot": (results.get("zero_shot") or {}).get(which)}}


def reproduce(entry: Entry, metadata: dict) -> str | None:
    if entry.command:
        return entry.command
    if not metadata.get("recipe_file"):
        return None
    sets = " ".join(f"--set {shlex.quote(o)}" for o in metadata.get("overrides", []))
    return f"compress run {shlex.quote(metadata['recipe_file'])}{' ' + sets if sets else ''}"


def file_mb(label: str, size: dict) -> float | None:
    files = size.get("files_mb", {})
    if label == "model":
        return files.get("hf", size.get("safetensors_mb") or None)
    return files.get(label)


def rows_for(entry: Entry) -> list[dict]:
    if entry.error is not None or entry.run_dir is None:
        return [{"run": entry.name, "on": "-", "error": entry.error or "no run", "command": entry.command}]
    results, metadata = read_run(entry.run_dir)
    size = results["size"]
    stages = results["stages"]
    rows = []
    for label, ev in evaluations(results).items():
        zs = ev.get("zero_shot") or {}
        tasks = zs.get("tasks", {})
        row = {
            "run": entry.name,
            "on": label,
            "perplexity": (ev.get("perplexity") or {}).get("ppl"),
            "tasks": {t: {"acc": m["acc"], "stderr": m.get("acc_stderr", stderr(m["acc"], m.get("n")))} for t, m in tasks.items()},
            "mean_acc": zs.get("mean_acc"),
            "mean_acc_stderr": zs.get("mean_acc_stderr", mean_stderr(tasks)),
            "sparsity": size["block_linear_sparsity"],
            # a GGUF file mixes types (and holds the embeddings): its bits per parameter, from its size
            "bits_per_weight": (round(file_mb(label, size) * 2**23 / size["params"], 2) if ev.get("artefact") == "gguf" and file_mb(label, size)
                                else size["block_linear_bits_per_weight"]),
            "params": size["params"],
            "file_mb": file_mb(label, size),
            "exports_mb": dict(size.get("files_mb", {})),  # every export the run wrote, evaluated or not
            "compress_seconds": round(sum(r["seconds"] for r in stages), 1),
            "peak_rss_mb": (results.get("memory") or {}).get("peak_rss_mb", metadata.get("peak_rss_mb")),
            "prefill_tps": (ev.get("speed") or {}).get("prefill_512") or (ev.get("speed") or {}).get("prefill_128"),
            "decode_tps": (ev.get("speed") or {}).get("decode_128"),
            "stages": " -> ".join(stage_label(r) for r in stages) or "dense",
            "run_dir": str(entry.run_dir),
            "run_id": metadata.get("run_id"),
            "versions": metadata.get("versions") or {},
            "command": reproduce(entry, metadata),
            "error": None,
        }
        rows.append(row)
    return rows


def version_differences(rows: list[dict]) -> dict[str, dict[str, list[str]]]:
    """{package: {version: [runs]}} for the packages whose versions differ between the rows.
    A run is identified by its recipe, model file and data only, so a finished run is read even
    when it was measured with another transformers or torch; the report says so."""
    seen: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        for package, version in (row.get("versions") or {}).items():
            runs = seen.setdefault(package, {}).setdefault(str(version), [])
            if row["run"] not in runs:
                runs.append(row["run"])
    return {package: by_version for package, by_version in seen.items() if len(by_version) > 1}


def stage_label(record: dict) -> str:
    alloc = (record.get("allocation") or {}).get("kind")
    beta = f" b={record['beta']:.4g}" if record.get("beta") is not None else ""
    what = {"prune": lambda r: f"{r.get('method')} {r.get('target', 0):.0%}",
            "structured": lambda r: f"structured {r.get('target', 0):.0%}",
            "lowrank": lambda r: f"{r.get('method')} {r.get('target', 0):.0%}",
            "quantize": lambda r: f"{r.get('method')} {r.get('format', '')}",
            "recover": lambda r: f"LoRA {r.get('steps', '')} steps"}.get(record["kind"], lambda r: r["kind"])(record)
    return f"{what}{' ' + alloc if alloc else ''}{beta}"


def stderr(p: float, n: int | None) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n and n > 1 else None


def mean_stderr(tasks: dict) -> float | None:
    errs = [stderr(m["acc"], m.get("n")) for m in tasks.values()]
    if not errs or any(e is None for e in errs):
        return None
    return math.sqrt(sum(e * e for e in errs)) / len(errs)


# ---------------------------------------------------------------- writing


def write_comparison(entries: list[Entry], out: Path, carried: list[dict] = ()) -> list[dict]:
    """out/comparison.md, .csv, .json and the plots; returns the rows. `carried` are rows of an
    earlier comparison.json whose run folders are gone: kept in the table and the Pareto plots
    as they were (the per-block plots need the run's results and leave them out)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [*carried, *(row for entry in entries for row in rows_for(entry))]
    runs = {e.name: read_run(e.run_dir)[0] for e in entries if e.error is None and e.run_dir is not None}
    plots = pareto.write_plots(rows, runs, out)
    (out / "comparison.json").write_text(json.dumps({"rows": rows, "plots": plots}, indent=2) + "\n", encoding="utf-8")
    write_csv(rows, out / "comparison.csv")
    (out / "comparison.md").write_text(markdown(rows, plots), encoding="utf-8")
    return rows


def task_names(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for t in row.get("tasks", {}):
            seen.setdefault(t)
    return list(seen)


def write_csv(rows: list[dict], path: Path) -> None:
    tasks = task_names(rows)
    fields = ["run", "on", "perplexity", *[f"{t}_acc" for t in tasks], *[f"{t}_stderr" for t in tasks], "mean_acc", "mean_acc_stderr",
              "sparsity", "bits_per_weight", "params", "file_mb", "compress_seconds", "peak_rss_mb", "prefill_tps", "decode_tps",
              "exports_mb", "stages", "run_dir", "run_id", "command", "error"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = dict(row)
            flat["exports_mb"] = "; ".join(f"{k} {v}" for k, v in (row.get("exports_mb") or {}).items())
            for t in tasks:
                m = row.get("tasks", {}).get(t)
                flat[f"{t}_acc"], flat[f"{t}_stderr"] = (m["acc"], m["stderr"]) if m else (None, None)
            writer.writerow(flat)


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _acc(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['acc']:.3f}" + (f" ± {m['stderr']:.3f}" if m.get("stderr") is not None else "")


def markdown(rows: list[dict], plots: dict) -> str:
    tasks = task_names(rows)
    header = ["run", "on", "ppl", *[TASK_SHORT.get(t, t) for t in tasks], "mean acc", "sparsity", "bits/w", "params M", "MB",
              "compress s", "peak RSS MB", "prefill tok/s", "decode tok/s"]
    lines = ["# Comparison", "",
             "One row per run and artefact it was measured on (`on`: `model` is the in-memory model after compression; "
             "`hf`, `gguf <type>`, `onnx` are the exported files reloaded in their own runtime). "
             "Accuracies ± their standard error; MB is the file of that artefact (for `model`, the HF export).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['run']} | failed: {r['error']} |" + " |" * (len(header) - 2))
            continue
        mean = None if r["mean_acc"] is None else {"acc": r["mean_acc"], "stderr": r["mean_acc_stderr"]}
        cells = [r["run"], r["on"], _num(r["perplexity"]), *[_acc(r["tasks"].get(t)) for t in tasks], _acc(mean),
                 _num(r["sparsity"], 3), _num(r["bits_per_weight"], 2), _num(r["params"] / 1e6, 1), _num(r["file_mb"], 1),
                 _num(r["compress_seconds"], 0), _num(r["peak_rss_mb"], 0), _num(r["prefill_tps"], 0), _num(r["decode_tps"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Stages and exports", ""]
    seen = set()
    for r in rows:
        if r["run"] not in seen and not r.get("error"):
            seen.add(r["run"])
            files = ", ".join(f"{k} {v:.1f} MB" for k, v in (r.get("exports_mb") or {}).items())
            lines.append(f"- **{r['run']}**: {r['stages']}" + (f"; exports: {files}" if files else ""))
    for title, name in (("Per-block allocation", "allocation"), ("Quality vs size", "pareto_size"), ("Quality vs speed", "pareto_speed"),
                        ("Beta search", "beta_search")):
        if plots.get(name):
            lines += ["", f"## {title}", "", f"![{title}]({plots[name]})"]
    differ = version_differences(rows)
    if differ:
        lines += ["", "## Versions differ", "",
                  "These rows were measured with different package versions (from each run's metadata.json), "
                  "which can move the numbers: rerun them with one set to compare like for like.", ""]
        lines += [f"- {package}: " + "; ".join(f"{version} ({', '.join(runs)})" for version, runs in by_version.items())
                  for package, by_version in differ.items()]
    lines += ["", "## Reproduce", ""]
    seen = set()
    for r in rows:
        if r["run"] not in seen:
            seen.add(r["run"])
            lines.append(f"- {r['run']}: `{r['command']}`" if r.get("command") else f"- {r['run']}: (no recipe file recorded)")
    return "\n".join(lines) + "\n"
