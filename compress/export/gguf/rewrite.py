"""Copies of a GGUF file with some metadata and tensors changed: how our two additions reach a file
that llama.cpp's converter or quantizer wrote.

- narrow: per-block widths. The converter writes a model whose blocks were zero-padded to the
  config's widths; each block's tensors are cut back to its own rows and columns, and the widths
  written as the family's scalars (every block alike) or as a deci file's per-block arrays
  (compress/export/gguf/arch.py says which).
- with_tensors: GPTQ grids. Tensors of the quantizer's file are replaced by our own blocks.

Everything else (tokenizer, rope, hyperparameters, the tensors left alone) is copied byte for byte
from the memory-mapped source, one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from compress.export.gguf.arch import Plan
from compress.model.gguf_file import GgufIndex, TensorEntry, permute_rows

Q = gguf.GGMLQuantizationType
# (raw bytes (rows, bytes per row) or float32 array, type) of a tensor to write in place of the source's
Replacement = tuple[np.ndarray, Q]


def rewrite(src: Path, dst: Path, tensors: Callable[[TensorEntry, GgufIndex], Replacement | None],
            arch: str | None = None, set_fields: Callable[[gguf.GGUFWriter], None] | None = None,
            skip_fields: frozenset[str] = frozenset()) -> Path:
    """Copy src to dst; tensors(t, source) gives a replacement for t or None (copied as is). arch:
    a new general.architecture, the source's '<old arch>.' keys renamed to it. set_fields writes
    keys not copied (skip_fields names them, by their name in the source)."""
    source = GgufIndex(src)
    old = source.arch
    arch = arch or old
    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for name, value, vtype, sub in source.metadata():
        if name == "general.architecture" or name in skip_fields:
            continue
        key = arch + name[len(old):] if name.startswith(old + ".") else name
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if set_fields is not None:
        set_fields(writer)
    chosen = []
    for t in source.tensors.values():
        new = tensors(t, source)
        data, qtype = new if new is not None else (source.raw(t.name).reshape(gguf.quant_shape_to_byte_shape(t.shape, t.type)), t.type)
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
        chosen.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in chosen:
        writer.write_tensor_data(data)
    writer.close()
    os.replace(partial, dst)
    return dst


# ---------------------------------------------------------------- per-block widths


# which axis of each block tensor (as numpy holds it: rows = outputs) follows which width
ROWS = {"attn_q": "q", "attn_k": "kv", "attn_v": "kv", "ffn_gate": "ff", "ffn_up": "ff"}
COLUMNS = {"attn_output": "q", "ffn_down": "ff"}
ROPE = ("attn_q", "attn_k")


def narrow(src: Path, dst: Path, plan: Plan, head_dim: int) -> Path:
    """The converter's file of a zero-padded model -> each block at its own widths (F32 source)."""
    def size(block: int, which: str) -> int:
        w = plan.blocks[block]
        return {"q": w.heads * head_dim, "kv": w.kv_heads * head_dim, "ff": w.ff}[which]

    def cut(t: TensorEntry, source: GgufIndex) -> Replacement | None:
        parts = t.name.split(".")  # blk.<i>.<kind>.<weight|bias>
        if parts[0] != "blk" or len(parts) != 4:
            return None
        block, kind = int(parts[1]), parts[2]
        if kind not in ROWS and kind not in COLUMNS:
            return None
        assert t.type == Q.F32, f"{t.name}: narrowing reads the F32 conversion"
        data = source.values(t.name)
        if kind in ROWS:
            data = data[: size(block, ROWS[kind])]
            if plan.permute_qk and kind in ROPE:  # NEOX rows -> llama's interleaved pairs, head by head
                heads = data.shape[0] // head_dim
                data = permute_rows(data, heads) if heads else data
        elif data.ndim == 2:  # o / down weights lose columns; their biases keep n_embd
            data = data[:, : size(block, COLUMNS[kind])]
        return np.ascontiguousarray(data), Q.F32

    blocks = plan.blocks
    if plan.deci or len(set(blocks)) > 1:
        values = {"feed_forward_length": [w.ff for w in blocks], "attention.head_count": [w.heads for w in blocks],
                  "attention.head_count_kv": [w.kv_heads for w in blocks]}
    else:
        values = {"feed_forward_length": blocks[0].ff, "attention.head_count": blocks[0].heads,
                  "attention.head_count_kv": blocks[0].kv_heads}

    def widths(writer: gguf.GGUFWriter) -> None:
        writer.add_feed_forward_length(values["feed_forward_length"])
        writer.add_head_count(values["attention.head_count"])
        writer.add_head_count_kv(values["attention.head_count_kv"])
        # llama.cpp takes n_embd / n_head when no key length is written: fewer heads, wider heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    skip = frozenset(f"{plan.family}.{k}" for k in (*values, "attention.key_length", "attention.value_length"))
    return rewrite(src, dst, cut, arch=plan.arch, set_fields=widths, skip_fields=skip)


def with_tensors(src: Path, dst: Path, replacements: dict[str, Replacement]) -> Path:
    return rewrite(src, dst, lambda t, source: replacements.get(t.name))
