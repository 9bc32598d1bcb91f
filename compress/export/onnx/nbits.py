"""Quantised Linears as ONNX Runtime's MatMulNBits (com.microsoft): the integer codes packed per
block of input columns, one scale (and zero point) per block and output row, dequantised by ORT
on the fly as (q - zero) * scale. The graph then stores what the GPTQ checkpoint stores, not
float32 matrices.

Which layers: integer grids (GPTQ / round-to-nearest) of 2, 4 or 8 bits whose groups are runs of
16, 32, ... columns in column order (block_size is a power of two >= 16; per-channel grids take
the power of two at or above the row length, the tail padded), and llama.cpp's symmetric one-scale
formats q4_0 / q8_0 (w = d * q is (u - 8) * d, (u - 128) * d). The others stay dense, with a
note: 3-bit codes have no MatMulNBits form, act-order's scattered groups no sequential block,
K-quants two levels of scales, asymmetric block formats a float offset that (u - zero) * scale
would round differently.

Exact: (u - zero) is a small integer and scale a float16 value held in float32, so ORT's
dequantised weight equals the model's float32 weight bit for bit (verify decodes the graph's
initializers and compares), and with accuracy_level 0 the products are float32 as MatMul's.

How: torch.onnx.export writes each Linear as MatMul(x, W^T) with W^T a constant; rewrite() finds
that constant by content and replaces the MatMul with MatMulNBits on the packed initializers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from compress.algorithms.ggml_formats import GgufState
from compress.algorithms.quant import QuantState

DOMAIN = "com.microsoft"
OP = "MatMulNBits"
BITS = (2, 4, 8)  # what ONNX Runtime's CPU kernel decodes (checked with onnxruntime 1.32)
EXACT_BLOCK_FORMATS = ("q4_0", "q8_0")


@dataclass
class Packed:
    """One Linear's MatMulNBits initializers and attributes."""

    name: str  # the module's name in the model
    K: int  # input features
    N: int  # output features
    bits: int
    block_size: int
    codes: np.ndarray  # (N, blocks, block_size * bits / 8) uint8
    scales: np.ndarray  # (N * blocks,) float32
    zero_points: np.ndarray | None  # (N * ceil(blocks * bits / 8),) uint8; None: 2^(bits-1)


def pack_values(values: np.ndarray, bits: int) -> np.ndarray:
    """Little-end packing along the last axis: 8 / bits values per byte, the first in the low bits."""
    per = 8 // bits
    grouped = values.astype(np.uint16).reshape(*values.shape[:-1], -1, per)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint16)
    for i in range(per):
        out |= grouped[..., i] << (bits * i)
    return out.astype(np.uint8)


def unpack_values(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)


def block_size_of(group: int) -> int | None:
    """MatMulNBits' block: a power of two >= 16 equal to the group, or None."""
    return group if group >= 16 and group & (group - 1) == 0 else None


def layout(state, cols: int) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None] | str:
    """(bits, block_size, offset added to the codes, scales (N, blocks), zeros (N, blocks) or None)
    for a layer MatMulNBits holds exactly; otherwise why not."""
    if isinstance(state, GgufState):
        fmt = state.fmt
        if fmt.name not in EXACT_BLOCK_FORMATS:
            return f"{fmt.name} blocks have no exact MatMulNBits form"
        bits = 4 if fmt.name == "q4_0" else 8
        return bits, fmt.width, -fmt.lo, state.d.float(), None
    grid = state.grid
    if grid.bits not in BITS:
        return f"{grid.bits}-bit codes (MatMulNBits takes {', '.join(map(str, BITS))})"
    if grid.group_size == -1:
        block = 1 << max(4, (cols - 1).bit_length())  # one block per row, padded
        groups = torch.zeros(cols, dtype=torch.long)
    else:
        block = block_size_of(grid.group_size)
        if block is None:
            return f"groups of {grid.group_size} columns (MatMulNBits blocks are powers of two >= 16)"
        groups = torch.arange(cols) // block
    if not torch.equal(state.g_idx.long(), groups):
        return "act-order groups (columns not in group order)"
    zeros = state.zeros.t().float()
    default = 2 ** (grid.bits - 1)
    return grid.bits, block, 0, state.scales.t().float(), None if bool((zeros == default).all()) else zeros


def pack(name: str, module) -> Packed | str:
    """The layer's MatMulNBits initializers, or why it stays dense."""
    state = module.quant_state
    W = module.weight.detach()
    N, K = W.shape
    how = layout(state, K)
    if isinstance(how, str):
        return how
    bits, block, offset, scales, zeros = how
    blocks = -(-K // block)
    codes = (state.codes(W) + offset).numpy().astype(np.uint8)  # (N, K), 0 .. 2^bits - 1
    codes = np.pad(codes, ((0, 0), (0, blocks * block - K)))  # the tail of the last block: never read
    packed_zeros = None
    if zeros is not None:
        z = zeros.numpy().astype(np.uint8)
        z = np.pad(z, ((0, 0), (0, (-blocks) % (8 // bits))))
        packed_zeros = pack_values(z, bits).reshape(-1)
    return Packed(name, K, N, bits, block, pack_values(codes.reshape(N, blocks, block), bits),
                  scales.numpy().astype(np.float32).reshape(-1), packed_zeros)


def dequantized(p: Packed) -> np.ndarray:
    """The (N, K) float32 weight ORT computes with: (u - zero) * scale."""
    blocks = p.codes.shape[1]
    u = unpack_values(p.codes, p.bits).astype(np.float32)  # (N, blocks, block)
    if p.zero_points is None:
        zero = np.full((p.N, blocks), 2 ** (p.bits - 1), dtype=np.float32)
    else:
        zero = unpack_values(p.zero_points.reshape(p.N, -1), p.bits)[:, :blocks].astype(np.float32)
    w = (u - zero[..., None]) * p.scales.reshape(p.N, blocks)[..., None]
    return w.reshape(p.N, -1)[:, : p.K]


def digest(array) -> tuple:
    """What makes two stored tensors the same: dtype, shape and every byte."""
    array = np.ascontiguousarray(array)
    return str(array.dtype), array.shape, hashlib.blake2b(array.view(np.uint8).reshape(-1), digest_size=20).digest()


def plan(model) -> tuple[dict[tuple, Packed], list[str]]:
    """digest of W^T (the exporter's MatMul constant) -> packed layer, for every quantised Linear
    MatMulNBits holds exactly; and notes on the ones it does not."""
    packed, dense = {}, {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "quant_state", None), (QuantState, GgufState)):
            continue
        result = pack(name, module)
        if isinstance(result, str):
            dense.setdefault(result, []).append(name)
            continue
        packed[digest(module.weight.detach().float().t().contiguous().numpy())] = result
    notes = [f"{len(names)} quantised Linears exported densely ({why}): their dequantised float32 weights, e.g. {names[0]}"
             for why, names in dense.items()]
    return packed, notes


def rewrite(graph, packed: dict[tuple, Packed]) -> list[str]:
    """Replace every MatMul whose weight is a packed layer's W^T by MatMulNBits; returns the
    layers replaced. The dense constants go (unless something else still reads them)."""
    import onnx_ir as ir

    done = []
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or len(weight.shape or ()) != 2:
            continue
        p = packed.get(digest(weight.const_value.numpy()))
        if p is None:
            continue
        inputs = [node.inputs[0]]
        for part, array in (("qweight", p.codes), ("scales", p.scales), ("qzeros", p.zero_points)):
            if array is None:
                continue
            value = ir.Value(name=f"{p.name}.{part}", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             const_value=ir.tensor(array, name=f"{p.name}.{part}"))
            if value.name not in graph.initializers:
                graph.register_initializer(value)
            inputs.append(graph.initializers[value.name])
        attributes = [ir.AttrInt64("K", p.K), ir.AttrInt64("N", p.N), ir.AttrInt64("bits", p.bits),
                      ir.AttrInt64("block_size", p.block_size), ir.AttrInt64("accuracy_level", 0)]
        replacement = ir.Node(DOMAIN, OP, inputs, attributes, num_outputs=1, name=f"{p.name}.{OP}")
        out, new = node.outputs[0], replacement.outputs[0]
        new.shape, new.type = out.shape, out.type
        graph.insert_before(node, replacement)
        ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)  # lm_head: its output is "logits"
        graph.remove(node, safe=True)
        new.name = out.name
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        done.append(p.name)
    if done:
        graph.opset_imports[DOMAIN] = 1
    return done


def read(node) -> Packed:
    """A MatMulNBits node's initializers and attributes as saved."""
    attr = {name: a.value for name, a in node.attributes.items()}
    arrays = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in node.inputs[1:4]]
    codes, scales, zeros = (arrays + [None, None, None])[:3]
    return Packed(node.name.removesuffix(f".{OP}"), attr["K"], attr["N"], attr["bits"], attr["block_size"], codes,
                  scales.reshape(-1), None if zeros is None else zeros.reshape(-1))


def differing(graph, model, names) -> list[str]:
    """The layers in `names` whose MatMulNBits node is missing or does not decode to the model's
    weight (float32, bit for bit)."""
    nodes = {node.name.removesuffix(f".{OP}"): node for node in graph if node.op_type == OP}
    modules = dict(model.named_modules())
    bad = []
    for name in names:
        node = nodes.get(name)
        weight = modules[name].weight.detach().float().cpu().numpy()
        if node is None or not np.array_equal(dequantized(read(node)), weight):
            bad.append(f"{name}.weight")
    return bad
