"""What llama.cpp's graphs can carry of a model whose blocks were narrowed, and what to do when its
family's graph cannot: the one part of the GGUF export that llama.cpp's converter does not know.

The converter writes a family's architecture from config.json, which holds one width for all
blocks. llama.cpp's graphs for llama, qwen3, gemma2/3 and phi3 size every block's tensors with
block 0's head counts and FFN width (LLAMA_LOAD_LOCALS in src/llama-model.h), qwen2's also makes q
and o n_embd wide, and only llama's loads o_proj / down_proj biases (src/models/*.cpp). llama.cpp's
"deci" graph (src/models/deci.cpp, DeciLM / Nemotron) is llama's with n_head(il), n_head_kv(il) and
n_ff(il) per block, rope factors and optional q/k/v, o and gate/up/down biases. So:

- every block equally narrowed: the family's own graph, with the narrowed widths in config.json;
- otherwise, llama and qwen2 files become deci files (widths as per-block arrays); qwen2's rope is
  NEOX (rotate-half, as Hugging Face stores q/k) while deci's is llama's interleaved one, so its q/k
  rows are permuted head by head on the way, as the converter does for llama;
- other families are refused with the reason: deci has no slot for their q/k norms, post-norms or
  logit soft-capping. The converter's own DeciLM path takes only uniform query heads and FFN widths
  in multiples of 256 (conversion/deci.py), so it cannot take these models either.

Evidence: the llama.cpp vendored in llama-cpp-python 0.3.36, and tests/export/test_restructured.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from compress.errors import CompressError
from compress.model.anatomy import decoder_blocks, head_dim
from compress.model.modules import LowRankLinear


@dataclass(frozen=True)
class Graph:
    """How llama.cpp's graph for an architecture sizes a block."""

    widths: Literal["config", "uniform", "per_block"] = "uniform"  # config's only | block 0's for all | each its own
    out_biases: bool = False  # loads o_proj / down_proj biases (blk.N.attn_output.bias, ffn_down.bias)


# llama.cpp architecture (general.architecture of the converter's file) -> its graph. An
# architecture not listed is taken as "uniform widths, no output biases", the common case.
GRAPHS = {
    "llama": Graph("uniform", out_biases=True),
    "qwen2": Graph("config"),
    "deci": Graph("per_block", out_biases=True),
}
# Families whose file can become a deci file, and whether their q/k rows must be permuted into
# llama's interleaved rope order on the way (llama.cpp's llama_model_rope_type: NEOX for qwen2).
DECI_FROM = {"llama": False, "qwen2": True}


def graph(arch: str) -> Graph:
    return GRAPHS.get(arch, Graph())


@dataclass(frozen=True)
class Widths:
    """One block's attention heads, KV heads and MLP channels, as its modules are."""

    heads: int
    kv_heads: int
    ff: int


def config_widths(config) -> Widths:
    return Widths(config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                  config.intermediate_size)


def separate_projections(block) -> bool:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    return all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
        all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))


def block_widths(model) -> list[Widths]:
    """Each block's widths read from its projections (structured pruning narrows them per block);
    the config's for families with fused projections (phi3), which the structured stage refuses."""
    size = head_dim(model.config)
    blocks = decoder_blocks(model)
    if not all(separate_projections(b) for b in blocks):
        return [config_widths(model.config)] * len(blocks)
    out = []
    for i, block in enumerate(blocks):
        attn, mlp = block.self_attn, block.mlp
        q, k, v, o = attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, attn.o_proj.in_features
        gate, up, down = mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features
        if q % size or k % size or k != v or o != q or not (gate == up == down):
            raise CompressError(f"export.gguf: block {i} has projections llama.cpp cannot build (head_dim {size}: q {q}, k {k}, v {v}, "
                                f"o input {o}; gate {gate}, up {up}, down input {down})")
        heads, kv_heads = q // size, k // size
        if kv_heads == 0 or gate == 0 or heads % kv_heads:
            raise CompressError(f"export.gguf: block {i} keeps {heads} query heads, {kv_heads} KV heads and {gate} MLP channels; "
                                "llama.cpp needs at least one KV head, query heads a multiple of KV heads, and MLP channels")
        out.append(Widths(heads, kv_heads, gate))
    return out


def has_out_biases(model) -> bool:
    return any(separate_projections(b) and (b.self_attn.o_proj.bias is not None or b.mlp.down_proj.bias is not None)
               for b in decoder_blocks(model))


def limits(arch: str, model) -> list[str]:
    """What llama.cpp's graph for arch cannot build of the model as it is (empty: nothing)."""
    g, widths, why = graph(arch), block_widths(model), []
    if g.widths == "config" and any(w != config_widths(model.config) for w in widths):
        why.append("builds the config's widths only")
    if g.widths == "uniform" and len(set(widths)) > 1:
        why.append("takes every block's widths from block 0")
    if not g.out_biases and has_out_biases(model):
        why.append("loads no o_proj/down_proj bias")
    return why


@dataclass(frozen=True)
class Plan:
    """How a model goes into GGUF: the family's file as the converter writes it from the model at
    its config's widths (narrowed blocks zero-padded), then cut back to each block's widths, as the
    family's file or, when `deci`, as a deci file."""

    family: str  # llama.cpp architecture the converter writes
    widths: Widths  # the config's: what the converter's file holds
    blocks: list[Widths]  # each block's own
    deci: bool = False
    permute_qk: bool = False  # deci from a NEOX-rope family
    notes: tuple[str, ...] = ()

    @property
    def arch(self) -> str:
        return "deci" if self.deci else self.family

    @property
    def padded(self) -> bool:
        return any(w != self.widths for w in self.blocks)


def plan(model, family: str) -> Plan:
    """family: llama.cpp's architecture for the model (from the converter). Raises when neither
    the family's graph nor deci can carry the model."""
    blocks = block_widths(model)
    uniform = Plan(family, config_widths(model.config), blocks)
    why = limits(family, model)
    if not why:
        return uniform
    if family not in DECI_FROM:
        raise CompressError(f"export.gguf: llama.cpp's {family} graph {' and '.join(why)}, and its per-block 'deci' graph has no slot "
                            f"for {family}'s own layers (q/k norms, post-norms, soft-capping): export this model with every block "
                            "equally narrowed (structured allocation uniform, bias_compensation false), or to HF / ONNX")
    note = (f"written as llama.cpp architecture 'deci' (Llama's graph, widths per block): llama.cpp's {family} graph {' and '.join(why)}; "
            f"heads {[w.heads for w in blocks]}, KV heads {[w.kv_heads for w in blocks]}, FFN {[w.ff for w in blocks]}")
    return replace(uniform, deci=True, permute_qk=DECI_FROM[family], notes=(note,))


def lowrank_notes(model) -> list[str]:
    lowrank = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not lowrank:
        return []
    return [f"{len(lowrank)} low-rank modules written as their dense product ({', '.join(lowrank[:3])}{'...' if len(lowrank) > 3 else ''}): "
            "llama.cpp has no factored matmul, so these layers are as large in the file as dense ones"]


# ---------------------------------------------------------------- rope row orders


