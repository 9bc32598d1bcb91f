#!/usr/bin/env python
"""The design card's first combination on LLaMA-2-7B's shapes (or a 2.5 B), streamed: ATP Wanda 50% -> GPTQ
4-bit g128 -> HF GPTQ folder + GGUF q4_0, 16 x 512 calibration tokens, every export check on.

Reported per run: peak RSS of each phase (VmHWM after it), seconds per stage and per export,
the most disk the run held at once (its output and staging folders, sampled every second), and
whether the streamed and in-memory runs wrote identical files; then a streamed run killed with
SIGKILL inside GPTQ and run again, compared file for file with the uninterrupted one.

Random weights (no 7B checkpoint ships in a package), written one block per shard; SmolLM2's
tokenizer (49152 tokens, so the embeddings and head are 0.8 B of the parameters instead of
LLaMA-2's 0.26 B). --blocks takes fewer than LLaMA-2-7B's 32 blocks at the same widths: a
streamed run holds one block at a time, so its peak memory does not depend on the block count
(tests/blocks/test_streamed_runs.py checks that), while seconds and disk grow with it, one block's worth each.

    python benchmarks/stream_recipe.py --only stream                  # the 7B, ~70 min on 2 cores
    python benchmarks/stream_recipe.py --size 3b --only stream memory  # 2.5 B, streamed and in memory: identical files?
    python benchmarks/stream_recipe.py --blocks 4                     # 4 of 32 blocks, + resume
    python benchmarks/stream_recipe.py --size 3b --blocks 8 --stages restructured --only stream memory

Writes benchmarks/results/stream_recipe-<size>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stream_memory import digests, make_model  # noqa: E402

RESULTS = HERE / "results"


def stages(kind: str, blocks: int) -> list[dict]:
    # ATP's legal range shrinks with depth (beta <= 1 / (L - 1) at 50%): a fixed fifth of it
    beta = round(0.2 / (blocks - 1), 5)
    if kind == "restructured":  # widths differ per block (no output biases: llama.cpp's llama graph reads per-block widths, not biases)
        return [
            {"kind": "structured", "ratio": 0.2, "allocation": {"kind": "atp", "beta": round(beta / 2, 5)}, "bias_compensation": False},
            {"kind": "lowrank", "method": "asvd", "ratio": 0.2, "allocation": {"kind": "atp", "beta": round(beta / 2, 5)}},
            {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 128},
        ]
    return [
        {"kind": "prune", "method": "wanda", "sparsity": 0.5, "allocation": {"kind": "atp", "beta": beta}},
        {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 128},
    ]


STAGES = {"sparse-gptq": "ATP Wanda 50% -> GPTQ 4-bit g128 -> HF GPTQ + GGUF q4_0",
          "restructured": "ATP structured 20% (heads and channels) -> ATP ASVD low-rank 20% -> GPTQ 4-bit g128 -> HF layout folder + GGUF q4_0"}


def recipe(folder: Path, out: Path, stream: bool, blocks: int, dtype: str, kind: str = "sparse-gptq") -> dict:
    return {
        "name": out.name, "seed": 0, "calibration_dtype": "bfloat16",
        "model": {"source": str(folder), "stream": stream, "dtype": dtype},
        "data": {"calibration": {"source": "python-docs", "nsamples": 16, "seqlen": 512},
                 "evaluation": {"source": "python-docs", "nsamples": 4, "seqlen": 512}},
        "stages": stages(kind, blocks),
        "eval": {"perplexity": True, "dense": False},
        "export": {"hf": True, "gguf": {"types": ["q4_0"]}},
        "output_dir": str(out),
    }


class DiskPeak:
    """The most bytes under `paths` (globs) at any sampled moment."""

    def __init__(self, root: Path, pattern: str):
        self.root, self.pattern, self.peak, self.stop = root, pattern, 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def size(self) -> int:
        total = 0
        for top in self.root.glob(self.pattern):
            for dirpath, _, files in os.walk(top):
                for f in files:
                    try:
                        total += os.stat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
        return total

    def sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.size())
            time.sleep(1.0)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", "run", str(path), "-q", "--overwrite"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def measure(args, folder: Path, tag: str, stream: bool, env: dict | None = None) -> tuple[dict, Path]:
    out = args.work / f"out-{tag}"
    path = args.work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(folder, out, stream, args.blocks, args.dtype, args.stages), sort_keys=False))
    start = time.perf_counter()
    with DiskPeak(args.work, f"*{out.name}*") as disk:
        done = run(path, env)
    wall = time.perf_counter() - start
    row = {"run": tag, "stream": stream, "status": done.returncode, "wall_seconds": round(wall, 1), "disk_peak_gb": round(disk.peak / 2**30, 2)}
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row, out
    results = json.loads((out / "results.json").read_text())
    export = results["export"]
    row.update(
        params=results["model"]["params"], blocks=results["model"]["blocks"],
        seconds=results["seconds"], peak_rss_mb=results["memory"]["peak_rss_mb"], peak_phase=results["memory"]["peak_phase"],
        peak_rss_mb_after=results["memory"]["peak_rss_mb_after"],
        ppl=results["perplexity"]["compressed"]["ppl"], sparsity=results["size"]["block_linear_sparsity"],
        files_mb=results["size"]["files_mb"],
        hf_weights_identical=export["hf"].get("weights", {}).get("identical"),
        gguf_checked=export["gguf"].get("checked"),
        gguf_q4_0=export["gguf"].get("files_checked", {}).get("q4_0"),
    )
    return row, out


def table(saved: dict) -> str:
    lines = [f"# The whole recipe streamed: {saved.get('size', '7b')} shapes", "",
             f"{STAGES[saved.get('stages', 'sparse-gptq')]} (every check on), 16 x 512 calibration tokens, "
             f"random {saved.get('dtype', 'float32')} weights on disk and in the run (logits with trained-like margins: "
             "stream_memory.make_model(peaked=True)); one `compress run` process at a time on 2 cores; peak RSS = VmHWM.", ""]
    for r in saved["rows"]:
        if "error" in r:
            lines.append(f"- {r['run']}: failed ({r['error']})")
            continue
        stages = {k: v for k, v in r["seconds"].items() if k.startswith(("stage", "export_", "check_", "eval_", "load"))}
        lines += [f"## {r['run']} ({'streamed' if r['stream'] else 'in memory'}): {r['blocks']} blocks, {r['params'] / 1e9:.2f} B parameters", "",
                  f"Peak RSS {r['peak_rss_mb']:.0f} MB (reached in {r['peak_phase']}); disk held at most {r['disk_peak_gb']} GB; "
                  f"wall {r['wall_seconds']:.0f} s; perplexity {r['ppl']:.2f} (random weights: only for equality); files {r['files_mb']}.", "",
                  "| phase | seconds | peak RSS after (MB) |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {r['peak_rss_mb_after'].get(k, 0):.0f} |" for k, v in stages.items()]
        lines.append("")
    if "identical" in saved:
        lines.append(f"Streamed and in-memory runs: {saved['identical']['files']} output files, "
                     f"{'identical' if saved['identical']['same'] else 'DIFFERENT'} byte for byte.")
    if "resume" in saved:
        r = saved["resume"]
        lines.append(f"Resume: SIGKILL after GPTQ block {r['killed_after_block']} (status {r['kill_status']}), same command again "
                     f"(status {r['resumed_status']}): files {'identical' if r['files_identical'] else 'DIFFERENT'} to the uninterrupted run.")
    return "\n".join(lines) + "\n"


def main() -> None:
    from compress.blocks.checkpoints import KILL_AFTER

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7b", choices=["7b", "3b"], help="LLaMA-2-7B's widths, or 2560 / 6912 (2.47 B at 32 blocks)")
    p.add_argument("--blocks", type=int, default=32, help="decoder blocks at those widths (32: the whole model)")
    p.add_argument("--only", nargs="*", default=["stream", "memory", "resume"], choices=["stream", "memory", "resume"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the weights on disk and model.dtype (float32 needs ~85 GB of disk at 32 blocks: source, one "
                        "version of every block, the base GGUF)")
    p.add_argument("--stages", default="sparse-gptq", choices=sorted(STAGES), help="; ".join(f"{k}: {v}" for k, v in STAGES.items()).replace("%", "%%"))
    p.add_argument("--work", type=Path, default=Path("/tmp/atp-stream-recipe"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / f"llama-{args.size}-{args.blocks}blocks-{args.dtype}"
    make_model(args.size, folder, args.dtype, args.blocks, peaked=True)
    name = f"stream_recipe-{args.size}" + ("" if args.stages == "sparse-gptq" else f"-{args.stages}")
    target = RESULTS / f"{name}.json"
    saved = json.loads(target.read_text()) if target.is_file() else {"rows": []}
    if saved.get("dtype", "float32") != args.dtype or saved.get("blocks") != args.blocks:
        saved = {"rows": []}  # rows of another model are not comparable
    saved.update(dtype=args.dtype, blocks=args.blocks, size=args.size, stages=args.stages)

    def keep(row):
        print(json.dumps(row), flush=True)
        saved["rows"] = [r for r in saved["rows"] if r["run"] != row["run"]] + [row]
        target.write_text(json.dumps(saved, indent=2) + "\n")

    outs = {}
    for mode in ("stream", "memory"):
        if mode in args.only:
            row, outs[mode] = measure(args, folder, mode, mode == "stream")
            keep(row)
    if len(outs) == 2:
        a, b = digests(outs["stream"]), digests(outs["memory"])
        saved["identical"] = {"files": len(a), "same": a == b}
    if "resume" in args.only:
        gptq = len(stages(args.stages, args.blocks)) - 1
        row, killed = measure(args, folder, "killed", True, {KILL_AFTER: f"{gptq}:{max(args.blocks // 2 - 1, 0)}"})
        resumed, _ = measure(args, folder, "killed", True)
        whole = outs.get("stream") or measure(args, folder, "stream", True)[1]
        saved["resume"] = {"killed_after_block": max(args.blocks // 2 - 1, 0), "kill_status": row["status"], "resumed_status": resumed["status"],
                           "files_identical": resumed["status"] == 0 and digests(killed) == digests(whole)}
    target.write_text(json.dumps(saved, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table(saved))
    for out in outs.values():  # the runs' files are GBs: keep the disk for the next one
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
