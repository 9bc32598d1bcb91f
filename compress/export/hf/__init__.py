"""Hugging Face export: a folder that AutoModelForCausalLM.from_pretrained loads, in the format the
model's layers call for (dense safetensors; GPTQ when layers sit on integer grids; bitsandbytes
when they were quantised with it), or, with `format: sparse`, pruned tensors stored as bitmask +
kept values (compress/export/hf/sparse.py: smaller, read by our loader only).

The checks run in two steps so that the caller can free its model in between: verify (the saved
weights decode to exactly the in-memory ones) needs the model; check (the folder reloaded gives
the reference logits) only the logits taken before.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from compress.algorithms import ggml_formats
from compress.algorithms.ggml_formats import GRIDS_FILE, GgufState
from compress.blocks.runner import no_cache
from compress.blocks.store import store_of
from compress.config import Config
from compress.errors import CompressError
from compress.export.hf import bnb, gptq, sparse, streamed
from compress.model import layout
from compress.model.sparse_folder import load_sparse
from compress.model.tokenizer_files import save_tokenizer

log = logging.getLogger("compress")

# Largest logit difference accepted after a reload, relative to the largest |logit|. Dense is
# exact. The quantised formats' CPU kernels round activations: gptqmodel's 4-bit kernel computes
# in bfloat16, bitsandbytes' int8 matmul casts inputs to float16 and its 4-bit CPU path to
# bfloat16 (each measured at 0.3-0.8% on tiny models).
LOGIT_TOLERANCE = {"dense": 0.0, "layout": 0.0, "sparse": 0.0, "gptq": 2e-2, "bnb": 2e-2}


class HfExport(Config):
    """`export.hf`: true (dense), false (none) or {format: dense | sparse}."""

    format: Literal["dense", "sparse"] = "dense"


def export_format(model, cfg: HfExport = HfExport()) -> tuple[str, str | None]:
    """(dense | layout (dense, with per-module shapes: low-rank or structured) | sparse | gptq | bnb,
    how the model is quantised: gptq | bnb | None)."""
    quantised = "gptq" if gptq.is_quantized(model) else "bnb" if bnb.bnb_layers(model) else None
    if quantised and cfg.format == "sparse":
        raise CompressError(f"export.hf.format: sparse stores unquantised tensors; this model is quantised ({quantised}), whose checkpoint packs its weights already: use format: dense")
    if quantised and layout.describe(model):
        # GPTQ and bitsandbytes loaders build every Linear from config.json's single width
        return "layout", quantised
    if cfg.format == "dense" and layout.describe(model):
        return "layout", quantised
    return quantised or cfg.format, quantised


def save(model, tokenizer, folder: Path, cfg: HfExport, scratch: Path) -> dict:
    """Write the model into folder; returns its format, files and notes."""
    folder.mkdir(parents=True, exist_ok=True)
    fmt, quantised = export_format(model, cfg)
    if fmt == "sparse":
        info = sparse.save_sparse(model, tokenizer, folder)
    elif fmt == "gptq":
        info = gptq.save_gptq(model, tokenizer, folder)
    elif fmt == "bnb":
        info = bnb.save_bnb(model, tokenizer, folder, scratch)
    elif not store_of(model).resident:  # a streamed model: block by block, never whole in memory (dense or layout)
        info = streamed.save_hf(model, tokenizer, folder)
        info["notes"] = layout_notes(model, quantised) if fmt == "layout" else []
    elif fmt == "layout":
        info = save_layout(model, tokenizer, folder, quantised)
    else:
        model.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(tokenizer, folder)
        info = {"format": "dense", "notes": []}
    blocks = save_block_grids(model, folder)
    if blocks:
        info["notes"].append(f"{blocks} layers on llama.cpp block formats are stored dequantised here (no HF loader reads those "
                             f"formats), their block parameters in {GRIDS_FILE}: the GGUF export (types [grid]), now or later "
                             "with compress export, keeps their blocks")
    info["kind"] = fmt
    info["streamed"] = not store_of(model).resident
    info["files"] = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    return info


def save_block_grids(model, folder: Path) -> int:
    """The block parameters of every layer on a llama.cpp format (compress/algorithms/ggml_formats.py), so
    that a later `compress export --to gguf` writes the same blocks; returns how many layers."""
    store = store_of(model)
    tensors, layers = {}, {}
    for i, block in store.each():  # the states are small: a streamed model's are gathered block by block
        for rel, m in block.named_modules():
            if isinstance(getattr(m, "quant_state", None), GgufState):
                name = f"{store.prefix}.{i}.{rel}"
                layers[name] = {"format": m.quant_state.fmt.name, "file_type": m.quant_state.file_type}
                tensors.update(ggml_formats.state_tensors(name, m.quant_state))
    if not layers:
        return 0
    # one metadata key: safetensors writes its metadata map in a per-process order, so two keys would
    # make the same model's file differ byte for byte between runs
    save_file(tensors, str(folder / GRIDS_FILE), metadata={"layers": json.dumps(layers)})
    return len(layers)


def load_block_grids(model, folder: Path) -> int:
    """Give each layer listed in the folder's ggml_grids.safetensors its block format back; its
    weights (read from the folder) must lie on it exactly. Returns how many layers."""
    path = folder / GRIDS_FILE
    if not path.is_file():
        return 0
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        if "layers" in metadata:  # format and the mix that chose it, per layer
            layers = json.loads(metadata["layers"])
            formats = {name: entry["format"] for name, entry in layers.items()}
            file_types = {name: entry["file_type"] for name, entry in layers.items()}
        else:  # written before mixes: formats only
            formats, file_types = json.loads(metadata["formats"]), {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = dict(model.named_modules())
    for name, fmt in formats.items():
        module = modules.get(name)
        if module is None:
            raise CompressError(f"{path}: lists {name}, which the model does not have")
        state = ggml_formats.state_from_tensors(fmt, name, tensors, file_types.get(name))
        try:
            state.codes(module.weight.detach())
        except ValueError:
            raise CompressError(f"{path}: {name}'s weights in the folder are not on its {fmt} blocks (the folder was changed?)") from None
        module.quant_state = state
    return len(formats)


def save_layout(model, tokenizer, folder: Path, quantised: str | None) -> dict:
    shapes = layout.describe(model)
    layout.save(model, tokenizer, folder, shapes)
    return {"format": "layout", "modules": len(shapes), "notes": layout_notes(model, quantised)}


def layout_notes(model, quantised: str | None) -> list[str]:
    shapes = layout.describe(model)
    kinds = sorted({spec["type"] for spec in shapes.values()})
    notes = [f"{len(shapes)} modules differ from config.json ({', '.join(kinds)}): their shapes are in {layout.LAYOUT_FILE}; "
             "transformers cannot load this folder, compress can (compress eval FOLDER, or compress.layout.load)"]
    if quantised:
        notes.append("the quantised layers are stored dequantised: GPTQ and bitsandbytes checkpoints need config.json's uniform "
                     "shapes; the GGUF export keeps the grids")
    return notes


def verify(model, folder: Path, info: dict, cfg: HfExport) -> dict:
    """The saved weights, read back, equal the in-memory model's (decoded, for quantised formats)."""
    weights = check_weights(model, folder, info["kind"])
    if weights is not None and not weights["identical"]:
        detail = weights.get("max_abs_weight_diff", weights.get("differing"))
        raise CompressError(f"export check failed: saved {info['kind']} weights differ from the model's ({detail})")
    return {"weights": weights} if weights is not None else {}


def check(folder: Path, info: dict, ref, cfg: HfExport) -> dict:
    """Reload the folder the way its users do and compare logits with the reference."""
    fmt = info["kind"]
    if info.get("streamed"):  # verify compared every tensor, decoded, with the compressed blocks
        return {"parity": {"checked": False, "reason": "streamed run: the export's tensors are compared with the compressed blocks "
                           "bit for bit (decoded), not reloaded whole"}}
    parity = check_logits(folder, ref.tokens, ref.logits, ref.dtype, ref.device, fmt, info)
    if not parity["checked"]:
        log.warning("export check: %s", parity["reason"])
    elif not parity["within_tolerance"]:
        raise CompressError(
            f"export check failed: reloaded {fmt} logits differ by {parity['max_abs_logit_diff']:g} "
            f"(tolerance {parity['tolerance']:g})"
        )
    return {"parity": parity}


def check_weights(model, folder: Path, fmt: str) -> dict | None:
    """Quantised and sparse formats: the saved weights, decoded, equal the in-memory model's."""
    if fmt in ("dense", "layout") and not store_of(model).resident:
        return streamed.check_hf(model, folder)
    if fmt == "sparse":
        return sparse.check_saved(model, folder)
    if fmt == "layout":
        return check_layout_saved(model, folder)
    if fmt == "gptq":
        return gptq.check_dequantized(model, folder)
    if fmt == "bnb":
        return bnb.check_dequantized(model, folder)
    return None


def check_layout_saved(model, folder: Path) -> dict:
    reloaded = layout.load(folder)
    saved = reloaded.state_dict()
    differing = [k for k, t in model.state_dict().items() if k not in saved or not torch.equal(t.cpu(), saved[k])]
    return {"tensors": len(saved), "identical": not differing, "differing": differing[:5]}


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
    if fmt == "sparse":
        return load_sparse(folder, dtype).to(device), "compress.model.sparse_folder.load_sparse"
    if fmt == "layout":
        return layout.load(folder, dtype).to(device), "compress.model.layout.load"
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
    del reloaded
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
