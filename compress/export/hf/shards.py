"""Safetensors checkpoints written a few tensors at a time, as Hugging Face shards them.

Exporters hand tensors over block by block (a streamed model has one block in memory); a shard
is written once it reaches MAX_SHARD_BYTES, so memory holds at most one shard. One shard is named
model.safetensors; several are model-0000k-of-0000n.safetensors with model.safetensors.index.json,
the names transformers and gptqmodel look for. The same tensors give the same files whether the
model was streamed or in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from compress.model import tensor_files

MAX_SHARD_BYTES = 2**30


class ShardWriter:
    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # (temporary file, its tensor names)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.pending[name] = t.detach().cpu().contiguous()
            self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written):05d}.tmp"
        tensor_files.save(self.pending, path, {"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Rename the shards to their final names, write the index if there are several; returns
        the file names."""
        self.flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.written[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for k, (path, keys) in enumerate(self.written):
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        total = sum((self.folder / name).stat().st_size for name in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names

