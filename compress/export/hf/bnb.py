"""bitsandbytes checkpoints (NF4 / FP4 / INT8), saved the way transformers saves them.

The in-memory model holds each quantised layer's weights as bitsandbytes dequantises them. To
write the checkpoint, that model is saved dense into a scratch folder and loaded back through
transformers with a BitsAndBytesConfig that quantises exactly those layers; bitsandbytes'
quantisers are idempotent on their own output (the largest weight of each block maps to +/-1),
so the codes it stores are the ones our weights came from, which check_dequantized confirms.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from compress.errors import CompressError
from compress.model.anatomy import get_weight
from compress.model.tokenizer_files import save_tokenizer


def bnb_layers(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if getattr(m, "bnb_format", None)}


def bnb_config(model, layers: dict[str, nn.Module]):
    formats = {m.bnb_format for m in layers.values()}
    if len(formats) > 1:
        raise CompressError(f"export.hf: one bitsandbytes format per checkpoint, the model has {sorted(formats)}")
    fmt = formats.pop()
    # every other Linear (lm_head included) stays as it is; full names, escaped (they are regexes)
    skip = [re.escape(name) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in layers]
    if fmt == "int8":
        return fmt, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return fmt, BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )


def save_bnb(model, tokenizer, folder: Path, scratch: Path) -> dict:
    layers = bnb_layers(model)
    fmt, config = bnb_config(model, layers)
    dense = scratch / "bnb-dense"
    model.save_pretrained(dense, safe_serialization=True)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, dtype=next(model.parameters()).dtype, device_map="cpu")
        diff = weight_diff(model, quantized, layers)
        if diff != 0.0:
            raise CompressError(f"export.hf: bitsandbytes re-quantised the {fmt} weights differently (max diff {diff:g})")
        quantized.save_pretrained(folder, safe_serialization=True)
    finally:
        shutil.rmtree(dense, ignore_errors=True)
    save_tokenizer(tokenizer, folder)
    return {"format": f"bitsandbytes {fmt}", "quantization_config": config.to_dict(), "notes": []}


def dequantized(module: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes Linear4bit / Linear8bitLt computes with."""
    import bitsandbytes.functional as F

    W = module.weight
    if getattr(W, "quant_state", None) is not None:  # 4-bit
        return F.dequantize_4bit(W.data, W.quant_state).float()
    if getattr(W, "SCB", None) is not None:  # 8-bit: int8 codes and a per-row absmax
        return W.data.float() * W.SCB.float()[:, None] / 127
    return get_weight(module).float()


def weight_diff(model, quantized, layers: dict[str, nn.Module]) -> float:
    """Largest difference between our layers' weights and the bitsandbytes model's."""
    return max(float((dequantized(quantized.get_submodule(name)) - get_weight(m).float()).abs().max()) for name, m in layers.items())


def check_dequantized(model, folder: Path) -> dict:
    """Reload the saved checkpoint through transformers and compare the weights it computes with."""
    layers = bnb_layers(model)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype, device_map="cpu")
    diff = weight_diff(model, reloaded, layers)
    return {"layers": len(layers), "max_abs_weight_diff": diff, "identical": diff == 0.0}
