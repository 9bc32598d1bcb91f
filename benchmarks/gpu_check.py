#!/usr/bin/env python
"""What a session with a GPU should run (the CUDA path is untested on the CPU-only machines).

    python benchmarks/gpu_check.py            # ~5 minutes on one GPU; exits 1 on any failure

The same recipe (Wanda 50% with ATP's beta searched, then GPTQ 4-bit g128 with every export
check on; SmolLM2-135M, 32 x 512 calibration tokens) runs four ways, each its own `compress run`:
on the CPU, and with `model.device: cuda`, in memory and streamed. The GPU runs must match the CPU
run where arithmetic allows: the same beta chosen, the same sparsity per block (within 0.001),
perplexity within 2%, every export check passing; streamed and in-memory GPU runs write identical
files. It prints one line per check and then a table:

    PASS cuda/memory: export checks passed (hf gptq, gguf q4_0)
    PASS cuda/memory: beta 0.00862 = cpu's 0.00862
    PASS cuda/memory: block sparsity within 0.001 of cpu's (max diff 0.0000)
    PASS cuda/memory: perplexity 41.23 within 2% of cpu's 41.10
    PASS cuda/stream: ... (the same four)
    PASS cuda/stream = cuda/memory: 9 files identical
    | run | seconds | peak RSS MB | peak GPU MB | ppl |

and writes benchmarks/results/gpu_check.json. A FAIL line names what differed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
WORK = Path("/tmp/atp-gpu-check")


def recipe(out: Path, device: str, stream: bool) -> dict:
    return {
        "name": out.name, "seed": 0, "calibration_dtype": "bfloat16",
        "model": {"source": "smollm2-135m", "device": device, "stream": stream},
        "data": {"calibration": {"source": "python-docs", "nsamples": 32, "seqlen": 512},
                 "validation": {"source": "python-docs", "nsamples": 8, "seqlen": 512},
                 "evaluation": {"source": "python-docs", "nsamples": 16, "seqlen": 512}},
        "stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5, "allocation": {"kind": "atp", "beta": "auto", "trials": 4}},
                   {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 128}],
        "eval": {"dense": False},
        "export": {"hf": True, "gguf": {"types": ["q4_0"]}},
        "output_dir": str(out),
    }


def digests(folder: Path) -> dict[str, str]:
    skip = {"results.json", "metadata.json", "report.md"}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def run(tag: str, device: str, stream: bool) -> dict:
    out = WORK / tag.replace("/", "-")
    path = WORK / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(out, device, stream), sort_keys=False))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress", "run", str(path), "-q", "--overwrite"], capture_output=True, text=True)
    row = {"run": tag, "status": done.returncode, "seconds": round(time.perf_counter() - start, 1), "out": str(out)}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    results = json.loads((out / "results.json").read_text())
    prune = results["stages"][0]
    row.update(beta=prune["beta"], block_achieved=prune["block_achieved"], ppl=results["perplexity"]["compressed"]["ppl"],
               peak_rss_mb=results["memory"]["peak_rss_mb"], peak_gpu_mb=results["memory"].get("peak_gpu_mb"))
    return row


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a session with a GPU")
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    rows = {tag: run(tag, device, stream) for tag, device, stream in
            (("cpu", "cpu", False), ("cuda/memory", "cuda", False), ("cuda/stream", "cuda", True))}
    checks = []

    def check(ok: bool, text: str) -> None:
        checks.append((ok, text))
        print(("PASS " if ok else "FAIL ") + text, flush=True)

    cpu = rows["cpu"]
    check(cpu["status"] == 0, f"cpu: the run finished ({cpu.get('error', 'export checks passed')})")
    for tag in ("cuda/memory", "cuda/stream"):
        r = rows[tag]
        check(r["status"] == 0, f"{tag}: export checks passed (hf gptq, gguf q4_0)" if r["status"] == 0 else f"{tag}: {r['error']}")
        if r["status"] or cpu["status"]:
            continue
        check(r["beta"] == cpu["beta"], f"{tag}: beta {r['beta']:.5f} = cpu's {cpu['beta']:.5f}")
        diff = max(abs(a - b) for a, b in zip(r["block_achieved"], cpu["block_achieved"]))
        check(diff <= 1e-3, f"{tag}: block sparsity within 0.001 of cpu's (max diff {diff:.4f})")
        check(abs(r["ppl"] / cpu["ppl"] - 1) <= 0.02, f"{tag}: perplexity {r['ppl']:.2f} within 2% of cpu's {cpu['ppl']:.2f}")
    if rows["cuda/memory"]["status"] == 0 and rows["cuda/stream"]["status"] == 0:
        a, b = digests(Path(rows["cuda/memory"]["out"])), digests(Path(rows["cuda/stream"]["out"]))
        check(a == b, f"cuda/stream = cuda/memory: {len(a)} files {'identical' if a == b else 'differ: ' + ', '.join(k for k in a if a[k] != b.get(k))}")
    print("| run | seconds | peak RSS MB | peak GPU MB | ppl |\n|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['run']} | {r['seconds']} | {r.get('peak_rss_mb', '-')} | {r.get('peak_gpu_mb', '-')} | {r.get('ppl', '-')} |")
    (HERE / "results" / "gpu_check.json").write_text(json.dumps({"rows": list(rows.values()), "checks": checks}, indent=2) + "\n")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
