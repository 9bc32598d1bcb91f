"""Proof that a refactoring changed no output: run four recipes and record the sha256 of every file
they write (results.json, metadata.json and report.md with their timings, memory readings and git
commit taken out), then compare two such records.

    python benchmarks/no_change.py --label before          # -> benchmarks/results/no_change/before.json
    python benchmarks/no_change.py --label after
    python benchmarks/no_change.py --compare before after  # every file and its digest, equal or not

The recipes: recipes/quickstart.yaml and recipes/deploy.yaml as they are, one streamed recipe
(Wanda ATP -> GPTQ onto Q4_0's grid -> HF GPTQ + GGUF) and one restructured recipe (structured
ATP -> ASVD low-rank -> GPTQ -> HF layout + GGUF), all on the default model, one at a time.
Needs no corpora (the Python documentation is the text); about 20 minutes on 2 cores.

Besides timings, two things are normalised because a move changes them by nature: the loader's
module path that results.json and report.md name (MOVED_LOADERS, old written as new), and the
source file:line torch.onnx records on every ONNX node (the graph, weights and names are compared).
To digest kept copies of earlier runs: --label before --rehash --runs DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "no_change"
RUNS = ROOT / "runs" / "no_change"

SMALL_DATA = """\
data:
  calibration: {source: python-docs, nsamples: 8, seqlen: 256}
  validation: {source: python-docs, nsamples: 4, seqlen: 256}
  evaluation: {source: python-docs, nsamples: 8, seqlen: 256}
"""
INLINE = {
    "streamed": SMALL_DATA + textwrap.dedent("""\
        model: {source: smollm2-135m, stream: true}
        stages:
          - {kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: auto, trials: 2}}
          - {kind: quantize, method: gptq, bits: 4, group_size: 32}
        export:
          hf: true
          gguf: {types: [grid, q8_0]}
        """),
    "restructured": SMALL_DATA + textwrap.dedent("""\
        model: {source: smollm2-135m}
        stages:
          - {kind: structured, ratio: 0.15, allocation: {kind: atp, beta: auto, trials: 2}}
          - {kind: lowrank, method: asvd, ratio: 0.15}
          - {kind: quantize, method: gptq, bits: 4, group_size: 64}
        export:
          hf: true
          gguf: {types: [f16, q8_0]}
        """),
}
RECIPES = {"quickstart": ROOT / "recipes" / "quickstart.yaml", "deploy": ROOT / "recipes" / "deploy.yaml", **INLINE}

# what differs from run to run by nature: durations, memory readings, the commit, the host
VOLATILE_KEYS = re.compile(r"(^|_)(seconds|s|time|timings|started|finished|wall|peak.*|rss.*|memory|git|commit|host|hostname|load_average|date)$")
# what a move changes by nature, written as the moved code writes it: results.json and report.md
# name the Python loader of a folder, and ONNX graphs carry the exporting source file:line per node
MOVED_LOADERS = {"compress.export.sparse.load_sparse": "compress.model.sparse_folder.load_sparse", "compress.layout.load": "compress.model.layout.load"}
SOURCE_TRACE = "pkg.torch.onnx.stack_trace"


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not VOLATILE_KEYS.search(k)}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def normalised_report(text: str) -> str:
    """report.md without its seconds and memory figures: table columns headed seconds / s, and
    'N s' / 'N MB' readings in the prose."""
    out, masked = [], set()
    for line in text.splitlines():
        cells = line.split("|")
        if line.startswith("|") and any(c.strip() in ("seconds", "s") for c in cells):
            masked = {i for i, c in enumerate(cells) if c.strip() in ("seconds", "s")}
        elif not line.startswith("|"):
            masked = set()
        elif masked and not set(line) <= set("|-: "):
            cells = ["<t>" if i in masked else c for i, c in enumerate(cells)]
        line = "|".join(cells)
        line = re.sub(r"\d+(\.\d+)? s\b", "<t> s", line)
        line = re.sub(r"Peak memory .*", "Peak memory <m>", line)
        out.append(line)
    return "\n".join(out)


def moved(text: str) -> str:
    for old, new in MOVED_LOADERS.items():
        text = text.replace(old, new)
    return text


def onnx_without_source_lines(path: Path) -> bytes:
    import onnx  # the onnx extra; only deploy's graphs need it

    graph = onnx.load(str(path), load_external_data=False)
    for node in graph.graph.node:
        kept = [p for p in node.metadata_props if p.key != SOURCE_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return graph.SerializeToString(deterministic=True)


def digest(path: Path) -> str:
    if path.name in ("results.json", "metadata.json"):
        data = moved(json.dumps(strip(json.loads(path.read_text(encoding="utf-8"))), sort_keys=True)).encode()
    elif path.name == "report.md":
        data = moved(normalised_report(path.read_text(encoding="utf-8"))).encode()
    elif path.suffix == ".onnx":
        data = onnx_without_source_lines(path)
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): digest(p) for p in sorted(out.rglob("*")) if p.is_file()}


def run(name: str, recipe: Path | str) -> dict[str, str]:
    out = RUNS / name
    if isinstance(recipe, str):
        RUNS.mkdir(parents=True, exist_ok=True)
        path = RUNS / f"{name}.yaml"
        path.write_text(f"name: {name}\n" + recipe)
    else:
        path = recipe
    cmd = [sys.executable, "-m", "compress", "run", str(path), "--overwrite", "--restart", "-q", "--set", f"output_dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: compress run failed:\n{done.stdout[-3000:]}")
    return digests(out)


def compare(a: str, b: str) -> int:
    left, right = (json.loads((RESULTS / f"{label}.json").read_text()) for label in (a, b))
    differing = 0
    for recipe in sorted(set(left) | set(right)):
        files_a, files_b = left.get(recipe, {}), right.get(recipe, {})
        for file in sorted(set(files_a) | set(files_b)):
            same = files_a.get(file) == files_b.get(file)
            differing += not same
            print(f"{'same     ' if same else 'DIFFERENT'} {recipe}/{file}")
    print(f"{differing} file(s) differ" if differing else "every file identical")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument("--rehash", action="store_true", help="digest the runs already in runs/no_change again, without running")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where --rehash finds the runs (default runs/no_change)")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.label:
        parser.error("--label or --compare")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record_file = RESULTS / f"{args.label}.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    for name in args.recipes:
        record[name] = digests(args.runs / name) if args.rehash else run(name, RECIPES[name])
        record_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(f"{name}: {len(record[name])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
