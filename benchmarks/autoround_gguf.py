"""AutoRound's own GGUF exports of SmolLM2-135M (or another float32 HF folder), as comparison anchors
for benchmarks/gguf_grids.py and benchmarks/gguf_kld.py (which scores its iters=0 files).

Runs in a separate venv (auto-round pins its own stack; it must not touch .venv), never imports
`compress`, and writes OUTSIDE the repository (default /tmp/autoround-out):

    python3.11 -m venv /tmp/autoround-venv
    /tmp/autoround-venv/bin/pip install -c constraints.txt auto-round==0.16.1 torch==2.13.0 sentencepiece gguf
    /tmp/autoround-venv/bin/python benchmarks/autoround_gguf.py                      # every format, iters 200 and 0
    /tmp/autoround-venv/bin/python benchmarks/autoround_gguf.py --formats gguf:q4_0 --iters 0
    L=.venv/share/atp-compress/llama.cpp-0.3.36   # llama.cpp's converter as `compress install-converter` put it
    LLAMA_CPP_ROOT=$L PYTHONPATH=$L/gguf-py /tmp/autoround-venv/bin/python benchmarks/autoround_gguf.py \
        --iters 0 --model gemma3-270m --folder /tmp/gemma3-270m-hf

Gemma 3 needs the two variables: AutoRound 0.16.1's bundled conversion code names
gguf.MODEL_ARCH.GEMMA4_ASSISTANT, which the gguf 0.19.0 that pip installs beside it lacks, so its Gemma
module fails to import; LLAMA_CPP_ROOT points AutoRound at llama.cpp's own conversion/ package and
PYTHONPATH at the gguf-py of the same tree. Llama (SmolLM2) converts with the bundled code.

Each run loads the folder (default /tmp/smollm2-hf, float32, CPU, 2 threads), quantises with AutoRound (iters=200 is
its default SignRound tuning; iters=0 is its "optimised RTN" mode) on 64 windows of 512 tokens of
brown.txt, exports with quantize_and_save(format=...), and records format, iters, seconds (quantise
+ export), file and size in <out>/results.json. Windows are drawn as the project's calibration
draws them (first 87.5% of the token stream, torch randint offsets, seed 0), then decoded to text:
AutoRound takes a list of strings, retokenises each and keeps only those of >= seqlen tokens, so a
window is decoded with 16 spare tokens and AutoRound truncates it back to 512. Score the files with
`compress eval FILE --runtime llama.cpp --data .../wikitext2-test.raw --nsamples 32 --seqlen 512`.
"""

import argparse
import json
import time
from pathlib import Path

import auto_round
import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "/tmp/smollm2-hf"
BROWN = "/work/shared/data/brown.txt"
FORMATS = ["gguf:q4_0", "gguf:q4_k_m", "gguf:q3_k_m", "gguf:q2_k_s"]  # its only Q2_K scheme (q2_k is not one)
NSAMPLES, SEQLEN, SEED, SPARE = 64, 512, 0, 16
CALIBRATION_PART = 0.875  # brown.txt is split calibration 0.7 : validation 0.1 in the project's recipes


def calibration_texts(tokenizer) -> list[str]:
    text = Path(BROWN).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    stream = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    part = stream[: int(CALIBRATION_PART * len(stream))]
    starts = torch.randint(0, len(part) - SEQLEN + 1, (NSAMPLES,), generator=torch.Generator().manual_seed(SEED))
    texts = [tokenizer.decode(part[s : s + SEQLEN + SPARE]) for s in starts.tolist()]
    short = [len(tokenizer(t)["input_ids"]) for t in texts if len(tokenizer(t)["input_ids"]) < SEQLEN]
    assert not short, f"windows retokenise to fewer than {SEQLEN} tokens: {short}"
    return texts


def run(args, fmt: str, iters: int, texts: list[str]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)  # fresh: AutoRound edits in place
    folder = args.out / args.model / f"{fmt.split(':')[1]}-iters{iters}"
    start = time.perf_counter()
    ar = AutoRound(model, tokenizer, scheme=fmt, iters=iters, nsamples=NSAMPLES, seqlen=SEQLEN,
                   dataset=texts, device_map="cpu", seed=SEED)
    ar.quantize_and_save(output_dir=str(folder), format=fmt)
    seconds = time.perf_counter() - start
    (gguf_file,) = folder.rglob("*.gguf")
    return {"model": args.model, "format": fmt, "iters": iters, "seconds": round(seconds, 1), "gguf": str(gguf_file),
            "mb": round(gguf_file.stat().st_size / 2**20, 2), "auto_round": auto_round.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--iters", nargs="+", type=int, default=[200, 0], help="200 is AutoRound's default")
    parser.add_argument("--out", type=Path, default=Path("/tmp/autoround-out"))
    parser.add_argument("--folder", type=Path, default=Path(MODEL), help="the model as a float32 HF folder")
    parser.add_argument("--model", default="smollm2", help="its name in results.json (gguf_kld.py's model names)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts(AutoTokenizer.from_pretrained(args.folder))
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    for fmt in args.formats:
        for iters in args.iters:
            row = run(args, fmt, iters, texts)
            print(json.dumps(row), flush=True)
            results = [r for r in results if (r.get("model", "smollm2"), r["format"], r["iters"]) != (args.model, fmt, iters)] + [row]
            results_file.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
