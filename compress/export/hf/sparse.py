"""Writing sparse safetensors folders (their format: compress/model/sparse_folder.py): each pruned
matrix as a bitmask plus its kept values, and the check that the folder decodes to the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from compress.model import layout, tensor_files
from compress.model.sparse_folder import CONFIG_FILE, FORMAT, WEIGHTS_FILE, iter_tensors
from compress.model.tensor_files import unique_tensors
from compress.model.tokenizer_files import save_tokenizer


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
            "transformers cannot load this folder; load it with compress (compress eval FOLDER) or compress.model.sparse_folder.load_sparse",
        ],
    }


def check_saved(model, folder: Path) -> dict:
    """Every tensor read back from the file equals the model's, bit for bit."""
    tensors, _ = unique_tensors(model)
    differing, checked = [], 0
    for name, tensor in iter_tensors(folder):
        checked += 1
        if name not in tensors or not torch.equal(tensors[name], tensor):
            differing.append(name)
    return {"tensors": checked, "identical": not differing and checked == len(tensors), "differing": differing[:5]}
