"""Hugging Face export: a folder that AutoModelForCausalLM.from_pretrained loads, in the format the
model's layers call for (dense safetensors; GPTQ when layers sit on integer grids; bitsandbytes
when they were quantised with it), and checks that reload it and compare.

The checks run in two steps so that the caller can free its model in between: check_weights
(the saved weights decode to exactly the in-memory ones) needs the model; check_logits (the
folder reloaded through transformers gives the reference logits) only the logits taken before.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from compress.calibrate import no_cache
from compress.errors import CompressError
from compress.export import bnb, gptq

# Largest logit difference accepted after a reload, relative to the largest |logit|. Dense is
# exact. The quantised formats' CPU kernels round activations: gptqmodel's 4-bit kernel computes
# in bfloat16, bitsandbytes' int8 matmul casts inputs to float16 and its 4-bit CPU path to
# bfloat16 (each measured at 0.3-0.8% on tiny models).
LOGIT_TOLERANCE = {"dense": 0.0, "gptq": 2e-2, "bnb": 2e-2}


def export_format(model) -> str:
    if gptq.quantized_layers(model):
        return "gptq"
    if bnb.bnb_layers(model):
        return "bnb"
    return "dense"


def save(model, tokenizer, folder: Path, scratch: Path) -> dict:
    """Write the model into folder; returns its format, files and notes."""
    folder.mkdir(parents=True, exist_ok=True)
    fmt = export_format(model)
    if fmt == "gptq":
        info = gptq.save_gptq(model, tokenizer, folder)
    elif fmt == "bnb":
        info = bnb.save_bnb(model, tokenizer, folder, scratch)
    else:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        info = {"format": "dense", "notes": []}
    info["kind"] = fmt
    info["files"] = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return info


def reference_logits(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, torch.device]:
    """The in-memory model's logits on `tokens` (n, seqlen), with the dtype and device to reload in."""
    param = next(model.parameters())
    with no_cache(model):
        logits = model(tokens.to(param.device), use_cache=False).logits
    return logits, param.dtype, param.device


def check_weights(model, folder: Path, fmt: str) -> dict | None:
    """Quantised formats: the saved weights, decoded, equal the in-memory model's."""
    if fmt == "gptq":
        return gptq.check_dequantized(model, folder)
    if fmt == "bnb":
        return bnb.check_dequantized(model, folder)
    return None


def transformers_can_load(fmt: str) -> str | None:
    """Why transformers cannot load this format here (None: it can)."""
    if fmt == "gptq":
        missing = [p for p in ("gptqmodel", "optimum") if importlib.util.find_spec(p) is None]
        if missing:
            return f"loading GPTQ in transformers needs {' and '.join(missing)}: pip install 'atp-compress[gptq]'"
    return None


def reload(folder: Path, fmt: str, dtype, device, info: dict):
    """The exported folder loaded the way its users load it: transformers; gptqmodel's own loader
    for GPTQ checkpoints with per-module bit-widths (transformers' GPTQConfig drops `dynamic`)."""
    if fmt == "gptq":  # gptqmodel sizes its worker pool from this when first imported
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))
    if fmt == "gptq" and info.get("quantization_config", {}).get("dynamic"):
        from gptqmodel import GPTQModel

        # its automatic kernel choice picks a 4-bit-only kernel for mixed widths; the torch one takes all
        return GPTQModel.load(str(folder), device="cpu", backend="torch").model, "gptqmodel.GPTQModel.load"
    if fmt == "dense":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device), "transformers"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device)), "transformers"


def check_logits(folder: Path, tokens: torch.Tensor, expected: torch.Tensor, dtype, device, fmt: str, info: dict) -> dict:
    """Reload the folder (see reload) and compare its logits with `expected`."""
    reason = transformers_can_load(fmt)
    if reason is not None:
        return {"checked": False, "reason": reason}
    try:
        reloaded, loader = reload(folder, fmt, dtype, device, info)
        with no_cache(reloaded):
            got = reloaded(tokens.to(device), use_cache=False).logits
    except (RuntimeError, ValueError, OSError, NotImplementedError) as err:  # the runtime refused the checkpoint
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompressError(f"export check failed: the {fmt} checkpoint does not run after reloading: {first}") from err
    diff = (expected.float() - got.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    tolerance = LOGIT_TOLERANCE[fmt] * scale
    return {
        "checked": True,
        "loader": loader,
        "max_abs_logit_diff": diff,
        "relative": diff / scale if scale else 0.0,
        "tolerance": tolerance,
        "identical": diff == 0.0,
        "within_tolerance": diff <= tolerance,
        "tokens": int(tokens.numel()),
    }
