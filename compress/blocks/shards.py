"""Safetensors checkpoints written a few tensors at a time, as Hugging Face shards them: the one
writer behind every sharded folder (the GPTQ checkpoint, a streamed model's HF folder, the
folder llama.cpp's converter reads).

Tensors are handed over block by block (a streamed model has one block in memory); a shard is
written once it reaches MAX_SHARD_BYTES, or where the caller ends it (one shard per block), so
memory holds at most one shard; a block file already on disk can be taken as a shard as it is
(hard-linked). One shard is named <stem>.safetensors; several are
<stem>-0000k-of-0000n.safetensors with <stem>.safetensors.index.json, the names transformers and
gptqmodel look for. The same tensors give the same files whether the model was streamed or in
memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from compress.blocks.store import store_of
from compress.model import tensor_files
from compress.model.anatomy import outside_blocks

MAX_SHARD_BYTES = 2**30


class ShardWriter:
    def __init__(self, folder: Path, stem: str = "model", max_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.stem, self.max_bytes = Path(folder), stem, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # (temporary file, its tensor names)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.pending[name] = t.detach().cpu().contiguous()
            self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.max_bytes:
            self.end_shard()

    def end_shard(self) -> None:
        """The tensors added since the last shard become one."""
        if not self.pending:
            return
        path = self._next_path()
        tensor_files.save(self.pending, path, {"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def link(self, file: Path) -> None:
        """A safetensors file on disk becomes a shard as it is: hard-linked (copied across file
        systems), so the folder takes no second copy of it."""
        self.end_shard()
        path = self._next_path()
        try:
            os.link(file, path)
        except OSError:  # another file system
            shutil.copyfile(file, path)
        with safe_open(path, "pt") as handle:
            self.written.append((path, list(handle.keys())))

    def _next_path(self) -> Path:
        path = self.folder / f".shard-{len(self.written):05d}.tmp"
        path.unlink(missing_ok=True)  # left by an export that failed before a resume
        return path

    def close(self) -> list[str]:
        """Rename the shards to their final names, write the index if there are several; returns
        the file names."""
        self.end_shard()
        n = len(self.written)
        if n == 1:
            name = f"{self.stem}.safetensors"
            os.replace(self.written[0][0], self.folder / name)
            return [name]
        names, weight_map = [], {}
        for k, (path, keys) in enumerate(self.written):
            name = f"{self.stem}-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        total = sum((self.folder / name).stat().st_size for name in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_block_shards(model, dest: Path, stem: str = "model") -> list[str]:
    """The model's weights in `dest` as an HF checkpoint: the tensors outside the blocks in one
    shard, then each block's final file as its shard, hard-linked (the staged copy is deleted after
    the exports: no second copy on disk), or written from memory when the block is still the
    source's."""
    store = store_of(model)
    writer = ShardWriter(dest, stem)
    writer.add(outside_blocks(model))
    writer.end_shard()
    for i in range(len(store.blocks)):
        staged = store.final(i)
        if staged is not None:
            writer.link(staged)
        else:
            with store.loaded(i):
                writer.add({f"{store.prefix}.{i}.{k}": p for k, p in store.blocks[i].named_parameters()})
                writer.end_shard()
    return writer.close()
