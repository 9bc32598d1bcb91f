"""Sparse safetensors: pruned tensors stored as a bitmask plus their kept values, so that a
70%-sparse model's file really is smaller (float32: 4 bytes per kept value + 1 bit per weight).

Per compressed tensor `name` (the tensor layout of compressed-tensors' legacy "sparse-bitmask"
format, which llm-compressor wrote; compressed-tensors 0.20 no longer decompresses it, so no
runtime reads it but ours):
    name.shape        int64 (2,)                    the dense shape (rows, cols)
    name.compressed   model dtype (nonzero,)        the nonzero values, row by row
    name.bitmask      uint8 (rows, ceil(cols / 8))  1 where a value is kept, numpy.packbits little-endian
    name.row_offsets  int64 (rows,)                 where each row's values start in `compressed`
Tensors that would not get smaller are stored as they are. The weights go into
model.sparse.safetensors (not model.safetensors), so transformers refuses the folder with "no
model file" instead of loading random weights; `load_sparse` (and so `compress eval FOLDER`, and
every command that takes a model) restores the model bit for bit. sparsity_config.json marks the
folder and lists what was compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from compress.model import layout, tensor_files
from compress.errors import CompressError
from compress.model.tokenizer_files import save_tokenizer

WEIGHTS_FILE = "model.sparse.safetensors"
CONFIG_FILE = "sparsity_config.json"
FORMAT = "atp-sparse-bitmask-v1"
SUFFIXES = (".shape", ".compressed", ".bitmask", ".row_offsets")


def is_sparse_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def compressed_bytes(tensor: torch.Tensor) -> int:
    rows, cols = tensor.shape
    return int(torch.count_nonzero(tensor)) * tensor.element_size() + rows * ((cols + 7) // 8) + rows * 8 + 16


def compress(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = tensor.shape
    mask = tensor != 0
    counts = mask.sum(dim=1)
    offsets = torch.zeros(rows, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    bitmask = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    return {
        ".shape": torch.tensor([rows, cols], dtype=torch.int64),
        ".compressed": tensor[mask].contiguous(),  # row-major order: row by row
        ".bitmask": torch.from_numpy(bitmask),
        ".row_offsets": offsets,
    }


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rows, cols = (int(v) for v in parts[".shape"])
    mask = np.unpackbits(parts[".bitmask"].numpy(), axis=-1, count=cols, bitorder="little").astype(bool)
    mask = torch.from_numpy(mask)
    dense = torch.zeros(rows, cols, dtype=parts[".compressed"].dtype)
    dense[mask] = parts[".compressed"]
    return dense


def unique_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict without tied copies: {name: tensor}, {alias: name it shares}."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def save_sparse(model, tokenizer, folder: Path) -> dict:
    """Write the model into folder in the sparse format; returns the export info."""
    tensors, aliases = unique_tensors(model)
    out, compressed, dense_bytes = {}, [], 0
    for name, tensor in tensors.items():
        dense_bytes += tensor.numel() * tensor.element_size()
        if tensor.dim() == 2 and tensor.is_floating_point() and compressed_bytes(tensor) < tensor.numel() * tensor.element_size():
            out.update({name + suffix: part for suffix, part in compress(tensor).items()})
            compressed.append(name)
        else:
            out[name] = tensor
    # not safetensors' save_file: it orders the metadata as a hash map does (same model, different bytes)
    tensor_files.save({k: t.detach().cpu() for k, t in out.items()}, folder / WEIGHTS_FILE, {"format": "pt", "atp_compress": FORMAT})
    shapes = layout.describe(model)
    if shapes:
        layout.write(folder, shapes)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    zeros = sum(t.numel() - int(torch.count_nonzero(t)) for n, t in tensors.items() if n in compressed)
    weights = sum(tensors[n].numel() for n in compressed)
    config = {
        "format": FORMAT,
        "weights_file": WEIGHTS_FILE,
        "compressed": compressed,
        "tied": aliases,
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "compressed_sparsity": zeros / weights if weights else 0.0,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    file_mb = (folder / WEIGHTS_FILE).stat().st_size / 2**20
    return {
        "format": "sparse",
        "compressed_tensors": len(compressed),
        "compressed_sparsity": config["compressed_sparsity"],
        "mb": round(file_mb, 2),
        "dense_mb": round(dense_bytes / 2**20, 2),
        "ratio": round(file_mb / (dense_bytes / 2**20), 4),
        "notes": [
            f"{len(compressed)} tensors stored as bitmask + kept values ({config['compressed_sparsity']:.1%} of their weights are zero); "
            f"{file_mb:.1f} MB against {dense_bytes / 2**20:.1f} MB dense",
            "transformers cannot load this folder; load it with compress (compress eval FOLDER) or compress.export.sparse.load_sparse",
        ],
    }


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CompressError(f"{folder / CONFIG_FILE}: not a readable sparsity config ({err})") from None
    if config.get("format") != FORMAT:
        raise CompressError(f"{folder / CONFIG_FILE}: format {config.get('format')!r} is not {FORMAT!r}")
    return config


def iter_tensors(folder: Path):
    """(name, dense tensor) for every tensor of a sparse folder, one at a time."""
    config = read_config(folder)
    compressed = set(config["compressed"])
    with safe_open(str(folder / config["weights_file"]), framework="pt") as f:
        for name in compressed:
            yield name, decompress({s: f.get_tensor(name + s) for s in SUFFIXES})
        for key in f.keys():
            if not key.endswith(SUFFIXES) or key.rsplit(".", 1)[0] not in compressed:
                yield key, f.get_tensor(key)


def load_sparse(folder: Path, dtype: torch.dtype | None = None):
    """The model of a sparse folder, bit-identical to the one saved (in `dtype` if given)."""
    config = read_config(folder)
    stored = getattr(torch, config["dtype"])
    model = layout.from_config(folder, stored)  # low-rank / narrower modules as layout.json says
    layout.load_state(model, dict(iter_tensors(folder)), folder)
    if dtype is not None and dtype != stored:
        model = model.to(dtype)
    return model.eval()


def check_saved(model, folder: Path) -> dict:
    """Every tensor read back from the file equals the model's, bit for bit."""
    tensors, _ = unique_tensors(model)
    differing, checked = [], 0
    for name, tensor in iter_tensors(folder):
        checked += 1
        if name not in tensors or not torch.equal(tensors[name], tensor):
            differing.append(name)
    return {"tensors": checked, "identical": not differing and checked == len(tensors), "differing": differing[:5]}
