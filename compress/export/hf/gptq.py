"""GPTQ checkpoints in the "gptq" (v1) format that gptqmodel and AutoGPTQ write and
`AutoModelForCausalLM.from_pretrained` loads (with the `gptq` extra: gptqmodel + optimum).

Per quantised Linear (K = in_features, N = out_features, G groups):
    qweight  int32 (K * bits / 32, N)   codes packed along K, little-endian fields
    qzeros   int32 (G, N * bits / 32)   zero points minus one, packed along N
    scales   float16 (G, N)
    g_idx    int32 (K,)                 group of each input column
2/4/8-bit fields are whole fractions of a word; 3-bit packs 32 values into 3 words (10 + a
split one + 10 + a split one + 10). v1 stores zero - 1: for 2/4/8 bits as one arithmetic sum
over the word, which is what loaders undo by adding 0x11111111-style constants (so a zero point
of 0 survives); 3-bit loaders add 1 field by field, so there each field is (zero - 1) mod 8.

The in-memory model holds scales16 * (q - zero) in float32: reading the file back gives exactly
the same weights (check_dequantized).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from compress.algorithms.quant import Grid, QuantState
from compress.blocks.shards import ShardWriter
from compress.blocks.store import store_of
from compress.errors import CompressError
from compress.model.anatomy import block_linears, block_prefix, get_weight, outside_blocks
from compress.model.tokenizer_files import save_tokenizer

PACK_MULTIPLE = 32  # in and out features must be multiples of this (3-bit words hold 32 codes)


def _wrap_int32(words: torch.Tensor) -> torch.Tensor:
    return (((words + 2**31) % 2**32) - 2**31).to(torch.int32)


def pack_fields(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers along `dim` packed into int32 words (little-endian fields), as an arithmetic sum
    in int64 wrapped to int32: a field may be -1 (a zero point of 0, minus one)."""
    v = values.to(torch.int64).movedim(dim, 0)
    n = v.shape[0]
    if bits in (2, 4, 8):
        per = 32 // bits
        v = v.reshape(n // per, per, *v.shape[1:])
        shifts = (torch.arange(per) * bits).reshape(1, per, *[1] * (v.dim() - 2))
        words = (v << shifts).sum(dim=1)
    elif bits == 3:
        v = v.reshape(n // 32, 32, *v.shape[1:]) & 7
        w0 = sum(v[:, i] << (3 * i) for i in range(10)) + ((v[:, 10] & 3) << 30)
        w1 = (v[:, 10] >> 2) + sum(v[:, 11 + i] << (3 * i + 1) for i in range(10)) + ((v[:, 21] & 1) << 31)
        w2 = (v[:, 21] >> 1) + sum(v[:, 22 + i] << (3 * i + 2) for i in range(10))
        words = torch.stack([w0, w1, w2], dim=1).reshape(-1, *v.shape[2:])
    else:
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    return _wrap_int32(words).movedim(0, dim).contiguous()


def unpack_fields(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack_fields for non-negative fields (int64)."""
    w = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        fields = [(w >> (bits * j)) & (2**bits - 1) for j in range(32 // bits)]
        out = torch.stack(fields, dim=1).reshape(-1, *w.shape[1:])
    else:
        w = w.reshape(-1, 3, *w.shape[1:])
        w0, w1, w2 = w[:, 0], w[:, 1], w[:, 2]
        fields = [(w0 >> (3 * i)) & 7 for i in range(10)]
        fields.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        fields += [(w1 >> (3 * i + 1)) & 7 for i in range(10)]
        fields.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        fields += [(w2 >> (3 * i + 2)) & 7 for i in range(10)]
        out = torch.stack(fields, dim=1).reshape(-1, *w.shape[2:])
    return out.movedim(0, dim)


def pack_layer(W: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of a weight W (N, K) lying on `state`'s grid."""
    bits = state.grid.bits
    q = state.codes(W)  # (N, K)
    zeros = state.zeros.to(torch.int64) - 1  # v1: zero - 1
    if bits == 3:
        zeros = zeros & 7
    return {
        "qweight": pack_fields(q.t(), bits, dim=0),
        "qzeros": pack_fields(zeros, bits, dim=1),
        "scales": state.scales.half().contiguous(),
        "g_idx": state.g_idx.to(torch.int32).contiguous(),
    }


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points (G, N) int64 from v1's packed zero - 1."""
    if bits == 3:
        return (unpack_fields(qzeros, bits, dim=1) + 1) & 7
    add = sum(1 << (bits * j) for j in range(32 // bits))  # + 1 in every field, as a word
    return unpack_fields(qzeros.to(torch.int64) + add, bits, dim=1)


def unpack_layer(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Dequantised weight (N, K), float32, from the four GPTQ tensors of one layer."""
    q = unpack_fields(tensors["qweight"], bits, dim=0)  # (K, N)
    zeros = unpack_zeros(tensors["qzeros"], bits)
    g = tensors["g_idx"].long()
    scales = tensors["scales"].float()
    return (scales[g] * (q - zeros[g]).float()).t().contiguous()


# ---------------------------------------------------------------- the model


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    """Layers on an integer GPTQ grid (llama.cpp block formats are not GPTQ checkpoints) among
    the modules in memory (a streamed model's blocks hold theirs only while loaded: is_quantized)."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "quant_state", None), QuantState)}


def is_quantized(model) -> bool:
    """Any block holds a GPTQ layer (a streamed model's blocks are looked at one at a time)."""
    return any(quantized_layers(block) for _, block in store_of(model).each())


@dataclass
class LayerGrid:
    grid: Grid
    act_order: bool  # g_idx not sorted: groups in activation order (desc_act)
    columns: int


def quantization_config(grids: dict[str, LayerGrid], per_block: list[tuple[set[str], set[str]]]) -> tuple[dict, list[str]]:
    """config.json's quantization_config, and notes on what loaders honour.

    The most common (bits, group_size, sym) is the base; other layers get gptqmodel's `dynamic`
    per-module overrides, which transformers' GPTQConfig drops (only gptqmodel's own loader reads
    them). per_block: per block, (quantised Linear names, all Linear names) relative to the block."""
    base, _ = Counter((g.grid.bits, g.grid.group_size, g.grid.sym) for g in grids.values()).most_common(1)[0]
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "bits": base[0],
        "group_size": base[1],
        "sym": base[2],
        "desc_act": any(g.act_order for g in grids.values()),
        "lm_head": False,
        "pack_dtype": "int32",
        "true_sequential": True,
        "meta": {"quantizer": ["atp-compress"]},
    }
    notes = []
    partial = sorted(name for name, g in grids.items() if g.grid.group_size != -1 and g.columns % g.grid.group_size)
    if partial:
        # gptqmodel's default 4-bit CPU kernel (aten int4pack) needs whole groups; its torch kernel
        # takes a short last group, and transformers passes `backend` on to it
        config["backend"] = "torch"
        notes.append(f"{len(partial)} layers end with a short group (in_features not a multiple of group_size, e.g. {partial[0]}): "
                     "config.json asks for gptqmodel's torch kernel (backend: torch)")
    dynamic = {
        f"+:^{name.replace('.', '[.]')}$": {"bits": g.grid.bits, "group_size": g.grid.group_size, "sym": g.grid.sym}
        for name, g in grids.items()
        if (g.grid.bits, g.grid.group_size, g.grid.sym) != base
    }
    if dynamic:
        config["dynamic"] = dynamic
        notes.append(
            f"{len(dynamic)} layers differ from the base grid (int{base[0]} g{base[1]}): they are `dynamic` overrides, "
            "which gptqmodel's GPTQModel.load honours (backend torch on CPU) and transformers' GPTQConfig ignores"
        )
    if len({frozenset(q) for q, _ in per_block}) != 1:
        notes.append("blocks quantise different sets of Linears: transformers cannot express that (modules_in_block_to_quantize)")
    elif any(len(names) < len(all_names) for names, all_names in per_block):
        config["modules_in_block_to_quantize"] = [sorted(per_block[0][0])]
    return config, notes


def save_gptq(model, tokenizer, folder: Path) -> dict:
    """Write a GPTQ checkpoint, one decoder block at a time from the model's block store (a
    streamed model is never whole in memory; the files are the same either way): each quantised
    weight packed, every other floating tensor (embeddings, norms, the head) in float16, as
    gptqmodel stores them. Returns what the report needs (format, config, notes)."""
    store, prefix = store_of(model), block_prefix(model)
    writer = ShardWriter(folder)
    writer.add({k: half(t) for k, t in outside_blocks(model).items()})
    grids, per_block = {}, []
    for i, block in store.each():
        linears = block_linears(block)
        quantised = [rel for rel, m in linears.items() if isinstance(getattr(m, "quant_state", None), QuantState)]
        layers = {f"{prefix}.{i}.{rel}": linears[rel] for rel in quantised}
        check_packable(layers)
        tensors = {f"{prefix}.{i}.{k}": half(t) for k, t in block.state_dict().items()}
        for name, m in layers.items():
            del tensors[f"{name}.weight"]
            try:
                tensors.update({f"{name}.{key}": t for key, t in pack_layer(get_weight(m), m.quant_state).items()})
            except ValueError as err:
                raise CompressError(f"export.hf: {name}: {err}") from None
            g_idx = m.quant_state.g_idx
            grids[name] = LayerGrid(m.quant_state.grid, bool((g_idx[1:] < g_idx[:-1]).any()), get_weight(m).shape[1])
        per_block.append((set(quantised), set(linears)))
        writer.add(dict(sorted(tensors.items())))
    files = writer.close()
    config, notes = quantization_config(grids, per_block)
    model.config.quantization_config = config
    dtype = model.config.dtype
    model.config.dtype = torch.float16  # what the unquantised tensors are stored in, as gptqmodel writes them
    try:
        model.config.save_pretrained(folder)
    finally:
        del model.config.quantization_config
        model.config.dtype = dtype
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    (folder / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_tokenizer(tokenizer, folder)
    return {"format": "gptq", "quantization_config": config, "notes": notes, "shards": files}


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half() if t.is_floating_point() else t


def check_packable(layers: dict[str, torch.nn.Module]) -> None:
    for name, m in layers.items():
        rows, cols = get_weight(m).shape
        if rows % PACK_MULTIPLE or cols % PACK_MULTIPLE:
            raise CompressError(f"export.hf: {name} is {rows}x{cols}; the GPTQ format needs both sides divisible by {PACK_MULTIPLE}")


def iter_packed(folder: Path, read: bool = True):
    """(name, grid, its four GPTQ tensors) of every quantised layer, read one at a time; the grid
    is config.json's, with gptqmodel's `dynamic` per-module overrides applied (read False: the
    tensors are not read, None)."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    overrides = {key.split(":", 1)[1]: value for key, value in config.get("dynamic", {}).items()}
    base = {"bits": config["bits"], "group_size": config.get("group_size", -1), "sym": config.get("sym", True)}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in sorted(k for k in f.keys() if k.endswith(".qweight")):
                name = key.removesuffix(".qweight")
                grid = Grid(**{**base, **next((o for p, o in overrides.items() if re.match(p, name)), {})})
                yield name, grid, ({part: f.get_tensor(f"{name}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")} if read else None)


def iter_dequantized(folder: Path):
    """(name, weight (N, K) float32) of every quantised layer, decoded from the files by our own
    reader one layer at a time."""
    for name, grid, tensors in iter_packed(folder):
        yield name, unpack_layer(tensors, grid.bits)


def load_states(model, folder: Path) -> int:
    """Put a GPTQ folder's layers into a dense model of the same config: each quantised Linear
    gets its decoded weight and its grid (quant_state), as the quantize stage left it. Returns
    the number of layers."""
    modules = dict(model.named_modules())
    count = 0
    for name, grid, tensors in iter_packed(folder):
        module = modules[name]
        with torch.no_grad():
            module.weight.copy_(unpack_layer(tensors, grid.bits).to(module.weight.dtype))
        zeros = unpack_zeros(tensors["qzeros"], grid.bits)
        module.quant_state = QuantState(grid, tensors["scales"].float(), zeros.float(), tensors["g_idx"].to(torch.int32))
        count += 1
    return count


def read_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_dequantized(folder))


def check_dequantized(model, folder: Path) -> dict:
    """Our reader's weights against the model's, layer by layer (a streamed model's block by
    block): must be equal; and every unquantised tensor the model's rounded to float16."""
    store, prefix = store_of(model), block_prefix(model)
    files = SavedTensors(folder)
    quantised = set(files.grids)
    seen, diff, others = set(), 0.0, []
    outside = outside_blocks(model)
    others += [k for k, t in outside.items() if t.is_floating_point() and not torch.equal(files.get(k), t.half())]
    for i, block in store.each():
        for rel, t in block.state_dict().items():
            key = f"{prefix}.{i}.{rel}"
            layer = key.removesuffix(".weight")
            if key.endswith(".weight") and layer in quantised:
                m = block.get_submodule(rel.removesuffix(".weight"))
                if not isinstance(getattr(m, "quant_state", None), QuantState):
                    raise CompressError(f"export check: the GPTQ files hold {layer}, which the model did not quantise")
                W = files.dequantized(layer)
                # compared in the model's dtype: a bfloat16 model holds the grid values rounded to bfloat16
                diff = max(diff, float((W.to(t.dtype).float() - get_weight(m).float()).abs().max()))
                seen.add(layer)
            elif t.is_floating_point() and not torch.equal(files.get(key), t.half()):
                others.append(key)
    if seen != quantised:
        raise CompressError(f"export check: the GPTQ files hold {len(quantised)} quantised layers, the model {len(seen)}")
    return {"layers": len(seen), "max_abs_weight_diff": diff, "identical": diff == 0.0 and not others,
            "float16_tensors_differ": others}


class SavedTensors:
    """A GPTQ folder's tensors by name, read one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                self.files.update({k: path for k in f.keys()})
        self.grids = {name: grid for name, grid, _ in iter_packed(folder, read=False)}

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def dequantized(self, name: str) -> torch.Tensor:
        return unpack_layer({part: self.get(f"{name}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")}, self.grids[name].bits)
