#!/usr/bin/env python
"""Peak memory and seconds of Wanda 50% on random-initialised Llamas of growing size, streamed
(model.stream: true) vs in memory, and a resume check (SIGKILL at a random block, rerun, compare
every output file's hash with an uninterrupted run).

Models are written shard by shard from configs (no download, never whole in memory): ~0.5 B,
~1.5 B, ~3 B parameters and LLaMA-2-7B's shapes, all with SmolLM2's vocabulary size. Calibration
is small (8 windows of 128 tokens of the Python docs) so that the weights, not the activations,
dominate; perplexity on 4 windows. Each run is its own `compress run` process, one at a time;
peak RSS is the process's VmHWM.

    python benchmarks/stream_memory.py --sizes 0.5b 1.5b          # ~20 min on 2 cores
    python benchmarks/stream_memory.py --sizes 7b --only-stream --dtype bfloat16
    python benchmarks/stream_memory.py --resume-check 0.5b

Writes benchmarks/results/stream_memory.json and .md. Needs free disk: the model, plus its export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = {  # hidden, intermediate, blocks, heads, kv heads
    "0.5b": (1024, 2816, 24, 16, 16),
    "1.5b": (2048, 5632, 22, 32, 4),
    "3b": (2560, 6912, 32, 32, 8),
    "7b": (4096, 11008, 32, 32, 32),
}


def make_model(name: str, folder: Path, dtype: str, blocks: int | None = None, peaked: bool = False) -> None:
    """A random Llama written one block per shard; never whole in memory (blocks: fewer decoder
    blocks than the size's own, same widths).

    peaked: logits with a trained model's margins instead of nearly flat ones, so that llama.cpp's
    top-1 check of a 4-bit file means something: unit-variance embeddings that the head reads back
    (a scaled copy, not tied: the token's own logit is 12, finite perplexities) and output projections (o_proj, down_proj) 40x smaller than the others, so
    that the blocks nudge the residual stream instead of drowning the token in it."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return
    from compress.model.load import read_tokenizer

    hidden, inter, full, heads, kv = SIZES[name]
    blocks = blocks or full
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype=dtype)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    groups: dict[str, dict] = {}
    for param_name, p in skeleton.named_parameters():
        key = param_name.split(".")[2] if ".layers." in param_name else "rest"
        groups.setdefault(key, {})[param_name] = p.shape
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, g = {}, torch.Generator().manual_seed(0)
    def std(param_name: str) -> float:
        if not peaked:
            return 0.02
        if param_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return 1.0
        return 0.0005 if param_name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02

    for k, (key, shapes) in enumerate(groups.items()):
        tensors = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * std(n)) for n, s in shapes.items()}
        if peaked and "lm_head.weight" in tensors:  # logit 12 for the token itself, the others ~N(0, 0.2)
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * (12 / hidden)
        tensors = {n: t.to(getattr(torch, dtype)) for n, t in tensors.items()}
        file = f"model-{k:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    read_tokenizer("smollm2-135m").save_pretrained(folder)


def recipe(folder: Path, out: Path, stream: bool, dtype: str) -> dict:
    return {
        "name": out.name, "seed": 0, "calibration_dtype": "bfloat16",
        "model": {"source": str(folder), "stream": stream, "dtype": dtype},
        "data": {"calibration": {"source": "python-docs", "nsamples": 8, "seqlen": 128},
                 "validation": {"source": "python-docs", "nsamples": 2, "seqlen": 128},
                 "evaluation": {"source": "python-docs", "nsamples": 4, "seqlen": 128}},
        "stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5}],
        "eval": {"perplexity": True, "dense": False},
        "export": {"hf": True, "check": stream},  # the in-memory check reloads the whole model a second time
        "output_dir": str(out),
    }


def run(path: Path, env: dict | None = None, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", "run", str(path), "-q", "--overwrite", *extra], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def measure(args, name: str, stream: bool) -> dict:
    folder = args.work / f"llama-{name}"
    make_model(name, folder, args.dtype)
    out = args.work / f"out-{name}-{'stream' if stream else 'memory'}"
    path = args.work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(folder, out, stream, args.dtype)))
    start = time.perf_counter()
    done = run(path)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"model": name, "stream": stream, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    results = json.loads((out / "results.json").read_text())
    row = {"model": name, "stream": stream, "params": results["model"]["params"], "dtype": args.dtype,
           "weights_gb": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 2),
           "peak_rss_mb": results["memory"]["peak_rss_mb"], "peak_phase": results["memory"]["peak_phase"],
           "wall_seconds": round(wall, 1), "ppl": results["perplexity"]["compressed"]["ppl"],
           "sparsity": results["size"]["block_linear_sparsity"]}
    for f in out.glob("model-*.safetensors"):  # keep the disk free for the next size
        f.unlink()
    return row


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file, gguf/ included, but the ones carrying times."""
    skip = {"results.json", "metadata.json", "report.md"}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def resume_check(args, name: str) -> dict:
    from compress.blocks.checkpoints import KILL_AFTER

    folder = args.work / f"llama-{name}"
    make_model(name, folder, args.dtype)
    rows = {}
    for tag in ("whole", "killed"):
        out = args.work / f"resume-{name}-{tag}"
        path = args.work / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(recipe(folder, out, True, args.dtype)))
        rows[tag] = (path, out)
    assert run(rows["whole"][0]).returncode == 0
    block = random.Random(0).randrange(SIZES[name][2] - 1)
    killed = run(rows["killed"][0], {KILL_AFTER: f"0:{block}"})
    resumed = run(rows["killed"][0])
    same = resumed.returncode == 0 and digests(rows["killed"][1]) == digests(rows["whole"][1])
    return {"model": name, "killed_after_block": block, "kill_status": killed.returncode, "resumed_status": resumed.returncode,
            "files_identical": same, "files": len(digests(rows["whole"][1]))}


def table(rows: list[dict], resume: list[dict]) -> str:
    lines = ["# Streaming: peak memory vs model size", "",
             "Wanda 50% uniform, 8 x 128 calibration tokens, perplexity on 4 x 128; one `compress run` process each; "
             "peak RSS = VmHWM of the run's process.", "",
             "| model | params | weights GB | mode | peak RSS MB | reached in | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {'stream' if r['stream'] else 'memory'} | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['weights_gb']} | {'stream' if r['stream'] else 'memory'} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_phase']} | {r['wall_seconds']:.0f} |")
    for r in resume:
        lines += ["", f"Resume ({r['model']}): SIGKILL after block {r['killed_after_block']} (status {r['kill_status']}), rerun "
                  f"status {r['resumed_status']}; {r['files']} output files {'identical' if r['files_identical'] else 'DIFFERENT'} to an uninterrupted run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=["0.5b", "1.5b", "3b"], choices=list(SIZES))
    p.add_argument("--only-stream", action="store_true", help="skip the in-memory runs (a 7B float32 does not fit 24 GB)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--resume-check", nargs="*", default=[], choices=list(SIZES))
    p.add_argument("--work", type=Path, default=Path("/tmp/atp-stream"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "stream_memory.json"
    saved = json.loads(target.read_text()) if target.is_file() else {"rows": [], "resume": []}
    for name in args.sizes:
        for stream in ((True,) if args.only_stream else (True, False)):
            row = measure(args, name, stream)
            print(row, flush=True)
            saved["rows"] = [r for r in saved["rows"] if (r["model"], r["stream"]) != (name, stream)] + [row]
            target.write_text(json.dumps(saved, indent=2) + "\n")
    for name in args.resume_check:
        row = resume_check(args, name)
        print(row, flush=True)
        saved["resume"] = [r for r in saved["resume"] if r["model"] != name] + [row]
        target.write_text(json.dumps(saved, indent=2) + "\n")
    (RESULTS / "stream_memory.md").write_text(table(saved["rows"], saved["resume"]))


if __name__ == "__main__":
    main()
