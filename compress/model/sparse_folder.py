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

from compress.errors import CompressError
from compress.model import layout


def is_sparse_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rows, cols = (int(v) for v in parts[".shape"])
    mask = np.unpackbits(parts[".bitmask"].numpy(), axis=-1, count=cols, bitorder="little").astype(bool)
    mask = torch.from_numpy(mask)
    dense = torch.zeros(rows, cols, dtype=parts[".compressed"].dtype)
    dense[mask] = parts[".compressed"]
    return dense


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


WEIGHTS_FILE = "model.sparse.safetensors"


CONFIG_FILE = "sparsity_config.json"


FORMAT = "atp-sparse-bitmask-v1"


SUFFIXES = (".shape", ".compressed", ".bitmask", ".row_offsets")
