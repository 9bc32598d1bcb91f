"""Safetensors files written straight from the tensors' memory.

safetensors.torch.save_file turns every tensor into a bytes object before writing: a second copy
of the whole shard in memory (for a 7B model's float32 embeddings, 0.8 GB more at the peak). The
format is simple enough to write tensor by tensor: an 8-byte little-endian header length, a JSON
header ({name: dtype, shape, data_offsets}, "__metadata__"), padded with spaces to 8 bytes, then
the tensors' bytes back to back. safetensors' own reader (safe_open, transformers, gptqmodel,
llama.cpp's converter) reads these files.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (CPU, any of DTYPES) to path atomically: a killed write never leaves half a
    file under the final name."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    ordered, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()  # a view of the parameter when it is contiguous already: no copy
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        ordered.append(t)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in ordered:
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)


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
