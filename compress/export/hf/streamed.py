"""The HF folder of a streamed model, written and checked one block at a time: the model is never
whole in memory, so each block's final file is a shard (hard-linked), and the check compares the
folder's tensors with the blocks bit for bit instead of reloading the model in transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from compress.blocks.shards import write_block_shards
from compress.blocks.sources import WeightSource
from compress.blocks.store import store_of
from compress.errors import CompressError
from compress.model import layout
from compress.model.tokenizer_files import save_tokenizer


def save_hf(model, tokenizer, dest: Path) -> dict:
    """The model as sharded safetensors, one shard per block (each block's newest file, hard-linked
    where it can be) plus one for the rest: the model is never whole in memory. Blocks of low-rank
    or narrowed modules make a compress.layout folder: layout.json, model.layout-*.safetensors."""
    shapes = layout.describe(model)
    files = write_block_shards(model, dest, layout.SHARD_STEM if shapes else "model")
    if shapes:
        layout.write(dest, shapes)
    model.config.save_pretrained(dest)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    save_tokenizer(tokenizer, dest)
    return {"format": "layout" if shapes else "dense", "files": files, "streamed": True}


def check_hf(model, dest: Path) -> dict:
    """Every block tensor in the export equals the block's final version bit for bit (read one
    block at a time); the model is too big to reload whole in transformers here."""
    store = store_of(model)
    exported = WeightSource(dest)
    checked = 0
    for i, block in store.each(final=True):
        for name, p in block.named_parameters():
            full = f"{store.prefix}.{i}.{name}"
            if not torch.equal(exported.get(full).to(p.dtype), p.detach()):
                raise CompressError(f"export check failed: {full} in {dest} differs from the compressed block")
            checked += 1
    return {"tensors": checked, "identical": True}
