"""Which llama.cpp architecture a model is written as, from the widths its blocks really have.

A family's own llama.cpp graph takes every block's head counts and FFN width from block 0
(src/models/llama.cpp, qwen2.cpp: LLAMA_LOAD_LOCALS), and qwen2's also assumes q = hidden size and
loads no o_proj / down_proj bias; llama.cpp's "deci" graph (src/models/deci.cpp, DeciLM /
Nemotron) is Llama's with hparams.n_head(il) / n_head_kv(il) / n_ff(il) per block and optional
q/k/v, o and down biases, so a model its family's graph cannot carry (structured pruning, bias
compensation) is written as deci, with per-block arrays. Evidence: the llama.cpp vendored in
llama-cpp-python 0.3.36 (commit 0c1e570), and tests/test_export_restructured.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compress.errors import CompressError
from compress.layout import LowRankLinear
from compress.model import decoder_blocks, model_type


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's architecture name
    permute_qk: bool  # llama.cpp's llama rope is interleaved; HF's is rotate-half
    # which block widths llama.cpp's graph for it builds: the config's, one for all blocks
    # (block 0's, from the file), or each block's own (arrays)
    widths: Literal["config", "uniform", "per_block"] = "uniform"
    out_biases: bool = True  # loads o_proj / down_proj biases (blk.N.attn_output.bias, ffn_down.bias)


# HF model_type -> llama.cpp architecture. Mistral is llama in llama.cpp (without sliding windows).
ARCHS = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    # llama.cpp's qwen2 makes q and o n_embd wide and has no o / down bias (src/models/qwen2.cpp)
    "qwen2": Arch("qwen2", permute_qk=False, widths="config", out_biases=False),
}
# Llama's graph with every block's head counts and FFN width its own (src/models/deci.cpp); optional
# q/k/v, o and gate/up/down biases. Used for what a family's own graph cannot carry.
DECI = Arch("deci", permute_qk=True, widths="per_block")


@dataclass(frozen=True)
class Widths:
    """One block's attention heads, KV heads and MLP channels, as its modules are."""

    heads: int
    kv_heads: int
    ff: int


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_widths(config) -> Widths:
    return Widths(config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                  config.intermediate_size)


def block_widths(model) -> list[Widths]:
    """Each block's widths read from its projections (structured pruning narrows them per block)."""
    size = head_dim(model.config)
    out = []
    for i, block in enumerate(decoder_blocks(model)):
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
    return any(b.self_attn.o_proj.bias is not None or b.mlp.down_proj.bias is not None for b in decoder_blocks(model))


def limits(arch: Arch, model) -> list[str]:
    """What llama.cpp's graph for arch cannot build of the model as it is (empty: nothing)."""
    widths, why = block_widths(model), []
    if arch.widths == "config" and any(w != config_widths(model.config) for w in widths):
        why.append("builds the config's widths only")
    if arch.widths == "uniform" and len(set(widths)) > 1:
        why.append("takes every block's widths from block 0")
    if not arch.out_biases and has_out_biases(model):
        why.append("loads no o_proj/down_proj bias")
    return why


def arch_of(model) -> Arch:
    kind = model_type(model)
    if kind not in ARCHS:
        raise CompressError(f"export.gguf: no GGUF writer for model_type {kind!r} yet (supported: {', '.join(sorted(ARCHS))})")
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise CompressError(f"export.gguf: rope type {rope['rope_type']!r} is not written yet (plain rope only)")
    return DECI if limits(ARCHS[kind], model) else ARCHS[kind]


def layout_notes(model, arch: Arch) -> list[str]:
    """What the file says about a restructured model (empty for a plain one)."""
    notes = []
    kind = model_type(model)
    if arch is DECI:
        family, widths = ARCHS[kind], block_widths(model)
        notes.append(f"written as llama.cpp architecture 'deci' (Llama's graph, widths per block): llama.cpp's {family.name} graph "
                     f"{' and '.join(limits(family, model))}; heads {[w.heads for w in widths]}, KV heads {[w.kv_heads for w in widths]}, "
                     f"FFN {[w.ff for w in widths]}")
    lowrank = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if lowrank:
        notes.append(f"{len(lowrank)} low-rank modules written as their dense product ({', '.join(lowrank[:3])}{'...' if len(lowrank) > 3 else ''}): "
                     "llama.cpp has no factored matmul, so these layers are as large in the file as dense ones")
    return notes
