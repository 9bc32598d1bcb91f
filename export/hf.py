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


def reference_logits(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, torch.device]:
    """The in-memory model's logits on `tokens` (n, seqlen), with the dtype and device to reload in."""
    param = next(model.parameters())
    with no_cache(model):
        logits = model(tokens.to(param.device), use_cache=False).logits
    return logits, param.dtype, param.device


def check_parity(folder: Path, tokens: torch.Tensor, expected: torch.Tensor, dtype, device) -> dict:
    """Reload the export and compare its logits with `expected` (from reference_logits).

    Taking the expected logits first lets the caller free its model before the reload."""
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    with no_cache(reloaded):
        got = reloaded(tokens.to(device), use_cache=False).logits
    diff = (expected.float() - got.float()).abs().max().item()
    return {"max_abs_logit_diff": diff, "identical": diff == 0.0, "tokens": int(tokens.numel())}
