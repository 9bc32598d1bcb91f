"""Hugging Face export: safetensors weights, config and tokenizer, loadable by
AutoModelForCausalLM.from_pretrained; and a parity check that reloads it and compares logits."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from compress.calibrate import no_cache


def save_hf(model, tokenizer, folder: Path) -> list[str]:
    """Write the model to folder; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir())


def check_parity(model, folder: Path, tokens: torch.Tensor) -> dict:
    """Reload the export and compare logits with the in-memory model on `tokens` (n, seqlen)."""
    param = next(model.parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=param.dtype).to(param.device)
    tokens = tokens.to(param.device)
    with no_cache(model), no_cache(reloaded):
        expected = model(tokens, use_cache=False).logits
        got = reloaded(tokens, use_cache=False).logits
    diff = (expected.float() - got.float()).abs().max().item()
    return {"max_abs_logit_diff": diff, "identical": diff == 0.0, "tokens": int(tokens.numel())}
