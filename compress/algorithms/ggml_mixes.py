"""llama.cpp's named file types as per-tensor plans: which block format each decoder matrix gets
in a `q4_k_m`, `q3_k_m`, `q2_k` ... file, so that GPTQ quantises every matrix onto the type
llama.cpp would write there and the file has llama.cpp's exact byte count.

The rules are those of llama.cpp's quantizer without an importance matrix (src/llama-quant.cpp,
llama_tensor_get_type_impl, then tensor_type_fallback) for dense, non-Falcon models: a mix keeps
attn_v (or a fused attn_qkv), attn_output and ffn_down wider where they matter most, often in the
first and last eighth of the blocks (`use_more_bits`), and a matrix whose rows are not whole
blocks of its type falls back (q2_k / q3_k -> q4_0, q4_k -> q5_0, ...; ggml_formats.fitting).
llama.cpp numbers the attn_v and ffn_down tensors in file order (by block): their index is the
block's. tests/algorithms/test_ggml_mixes.py compares every plan with the types llama.cpp's own
quantizer writes.

Pure functions of names and shapes; the quantize stage (compress/stages/quantize.py) calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.algorithms import ggml_formats

# file type -> the block format of every matrix no rule singles out (llama_ftype_get_default_type)
MIXES = {
    "q2_k": "q2_k",  # (q2_k_s is left out: llama.cpp refuses it without an importance matrix, and exports run without one)
    "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k",
    "q5_k_s": "q5_k", "q5_k_m": "q5_k",
}
# what llama.cpp names each decoder matrix (gguf tensor names), from the HF module's last name
ROLES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "qkv_proj": "attn_qkv", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "gate_up_proj": "ffn_up", "down_proj": "ffn_down",
}


def role_of(module_name: str) -> str:
    """The llama.cpp category of a decoder Linear ("other" for names no rule knows)."""
    return ROLES.get(module_name.rsplit(".", 1)[-1], "other")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of blocks for the wider type: the first and last eighth, and every third
    block between (C integer division)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules read from the model: blocks, query heads per KV head, and whether
    llama.cpp takes it for a 70B Llama (80 blocks with grouped KV heads)."""

    n_layers: int
    n_gqa: int
    is_70b: bool = False


def chosen_type(mix: str, role: str, i: int, facts: ModelFacts) -> str:
    """The block format llama.cpp's mix gives the matrix of `role` in block i, before the
    fallback for rows that are not whole blocks."""
    new, n = MIXES[mix], facts.n_layers
    if role in ("attn_v", "attn_qkv"):
        if mix == "q2_k":
            new = "q4_k" if facts.n_gqa >= 4 else "q3_k"
        elif mix == "q3_k_m":
            new = "q5_k" if i < 2 else "q4_k"
        elif mix == "q3_k_l":
            new = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            new = "q6_k"
        elif mix == "q4_k_s" and i < 4:
            new = "q5_k"
        if facts.is_70b and new in ("q3_k", "q4_k"):  # 8 heads share attn_v: wider for little size
            new = "q5_k"
    elif role == "ffn_down":
        if mix == "q2_k":
            new = "q3_k"
        elif mix == "q3_k_m":
            new = "q5_k" if i < n // 16 else "q4_k"
        elif mix == "q3_k_l":
            new = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            new = "q6_k"
        elif mix == "q4_k_s" and i < n // 8:
            new = "q5_k"
    elif role == "attn_output":
        new = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, new)
    return new


def layer_format(mix: str, module_name: str, i: int, cols: int, facts: ModelFacts) -> ggml_formats.BlockFormat | None:
    """The format a decoder Linear of `cols` input columns is written in, in block i of a `mix`
    file: the mix's choice, its fallback, or None (llama.cpp leaves it in F16)."""
    return ggml_formats.fitting(chosen_type(mix, role_of(module_name), i, facts), cols)
