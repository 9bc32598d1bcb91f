"""GGUF export for llama.cpp: our own HF -> GGUF writer (the gguf package ships none), then
llama.cpp's own quantizer for the quantised types, then checks in llama.cpp itself.

Writing: tensors renamed with gguf's name map; for the llama architecture the q/k rows are
permuted from Hugging Face's rotate-half rope layout to llama.cpp's interleaved one; 1-D tensors
(norms, biases) stay F32; full tokenizer metadata (model, pre-tokenizer, tokens, types, merges,
special ids, add_bos). f32 / f16 / bf16 are written directly; q8_0, q6_k, q4_k_m and q4_0 come from
`llama_model_quantize` on an F32 file (the `gguf` extra: llama-cpp-python). A model quantised by
the quantize stage on a grid that *is* a GGUF type (symmetric, groups of 32 in column order:
4-bit = Q4_0, 8-bit = Q8_0) is written block for block without requantising, so GPTQ's rounding
reaches llama.cpp unchanged.

Restructured models (compress/layout.py): widths are read from the modules, not the config, and
a model its family's llama.cpp graph cannot carry is written as llama.cpp's "deci" architecture
with per-block widths (export/gguf_arch.py). A LowRankLinear goes in as its dense product
(llama.cpp has no factored matmul).

Checks (llama-cpp-python): tokenization of a sample text equals the HF tokenizer's; logits on the
probe window against the in-memory model's; perplexity on the first evaluation windows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from pydantic import Field, field_validator

from compress.config import Config
from compress.errors import CompressError
from compress.export.gguf_arch import Arch, arch_of, block_widths, head_dim, layout_notes
from compress.layout import LowRankLinear
from compress.model import model_type

log = logging.getLogger("compress")

GgufType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q4_0"]
Q = gguf.GGMLQuantizationType
DIRECT = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
# llama.cpp's file types (llama.h: enum llama_ftype) for the types its quantizer makes
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q6_k": 18, "bf16": 32}
# The block type each quantised file type aims at (K-quant files mix types by design)
MAIN_TYPE = {"q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q4_k_m": Q.Q4_K, "q4_0": Q.Q4_0}
# why llama.cpp's quantizer left block matrices in another type (src/llama-quant.cpp, tensor_type_fallback)
FALLBACK_REASON = {
    "q8_0": "rows (input columns) not divisible by 32 stay F16",
    "q4_0": "rows (input columns) not divisible by 32 stay F16",
    "q6_k": "K-quants need rows divisible by 256 (Q8_0 otherwise, F16 when not divisible by 32)",
    "q4_k_m": "K-quants need rows divisible by 256 (Q5_0 otherwise, F16 when not divisible by 32), "
              "and q4_k_m keeps some layers at higher precision by design",
}
# a GPTQ grid that is a GGUF block type as it stands: bits -> (file type, block type)
GRID_TYPES = {4: ("q4_0", Q.Q4_0), 8: ("q8_0", Q.Q8_0)}
GRID_KINDS = {kind for kind, _ in GRID_TYPES.values()}
GRID_WRITTEN = "GPTQ grid written block for block (no requantisation)"

# Largest logit difference accepted in llama.cpp, relative to the largest |logit| of the
# in-memory model: F32 differs only by float summation order (measured 2e-4 on tiny models);
# f16 / bf16 round every weight (6e-4 / 4e-3). The quantised types are lossy by design: for them
# the check is a floor on how often llama.cpp's top token equals the model's, which a broken file
# (wrong rope layout, wrong tokenizer) falls far below; their quality is the perplexity reported
# beside. On random tiny models (flat logits, the hardest case) q4 types agree at 65-90%.
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 2e-2, "bf16": 5e-2}
TOP1_AGREEMENT = {"f32": 0.99, "f16": 0.97, "bf16": 0.95, "q8_0": 0.9, "q6_k": 0.85, "q4_k_m": 0.5, "q4_0": 0.5}



class GgufExport(Config):
    """`export.gguf`: the llama.cpp files to write, one per type."""

    types: list[GgufType] = Field(default=["f16"], min_length=1)

    @field_validator("types")
    @classmethod
    def _unique(cls, types):
        if len(set(types)) != len(types):
            raise ValueError(f"each type once, got {types}")
        return types


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


NO_LLAMA_CPP = "llama-cpp-python is not installed: pip install 'atp-compress[gguf]' (it compiles llama.cpp, ~15 minutes on 2 cores)"


def needs_llama_cpp(cfg: GgufExport, grid_kinds: set[str] = frozenset(GRID_KINDS)) -> list[str]:
    """The types that llama.cpp's quantizer must make. grid_kinds: types the model's GPTQ grid
    is written as directly (before the stages run, any of them may be)."""
    return [t for t in cfg.types if t not in DIRECT and t not in grid_kinds]


# ---------------------------------------------------------------- metadata


def write_hparams(writer: gguf.GGUFWriter, model, arch: Arch) -> None:
    c = model.config
    size = head_dim(c)
    widths = block_widths(model)

    def per_block(values: list[int]) -> int | list[int]:  # one number when all blocks agree
        return values[0] if len(set(values)) == 1 else values

    writer.add_name(getattr(c, "_name_or_path", "") or model_type(model))
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(per_block([w.ff for w in widths]))
    writer.add_head_count(per_block([w.heads for w in widths]))
    writer.add_head_count_kv(per_block([w.kv_heads for w in widths]))
    writer.add_key_length(size)
    writer.add_value_length(size)
    writer.add_rope_dimension_count(size)
    writer.add_rope_freq_base(float(rope_theta(c)))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(c.vocab_size)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


# llama.cpp pre-tokenizer name for the Hugging Face pre_tokenizer layouts we have checked
# (tokenization equality is tested at export time anyway).
def pre_tokenizer_name(backend: dict) -> str:
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if any(p.get("add_prefix_space") for p in parts):  # llama.cpp's BPE adds no leading space
        raise CompressError("export.gguf: the tokenizer adds a prefix space (ByteLevel add_prefix_space), which llama.cpp's BPE tokenizer does not do")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (SmolLM, StarCoder)
    raise CompressError(f"export.gguf: the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one we map to llama.cpp's yet (known: GPT-2 byte-level, digits + byte-level)")


def tokenizer_layout(tokenizer) -> tuple[dict, str]:
    """The tokenizer's JSON and llama.cpp's pre-tokenizer name; only byte-level BPE is written."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE" or model.get("byte_fallback") or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise CompressError("export.gguf: only byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen) are written yet")
    return backend, pre_tokenizer_name(backend)


def preflight(model, tokenizer, cfg: GgufExport) -> None:
    """What would fail at export time, checked before any compression (model may be a skeleton)."""
    arch_of(model)
    if needs_llama_cpp(cfg) and not llama_cpp_available():
        raise CompressError(f"export.gguf: types {needs_llama_cpp(cfg)} need llama.cpp's quantizer; {NO_LLAMA_CPP}")
    if tokenizer is not None:
        backend, _ = tokenizer_layout(tokenizer)
        vocab_rows(tokenizer, backend, model.config.vocab_size)


def vocab_rows(tokenizer, backend: dict, vocab_size: int) -> int:
    """How many tokens the file lists: one per embedding row (the tokenizer must fit in them)."""
    size = max(len(tokenizer), max(backend["model"]["vocab"].values()) + 1)
    if size > vocab_size:
        raise CompressError(f"export.gguf: the tokenizer has {size} tokens but the model's embedding only {vocab_size} rows; llama.cpp needs one row per token")
    return vocab_size  # padded with unused tokens, as the embedding is


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, scratch: Path, vocab_size: int) -> None:
    """Byte-level BPE tokenizers ("gpt2" in llama.cpp): tokens in id order, their types, merges,
    special ids and whether BOS is added."""
    backend, pre = tokenizer_layout(tokenizer)
    model = backend["model"]
    size = vocab_rows(tokenizer, backend, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in backend.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    folder = scratch / "tokenizer"
    tokenizer.save_pretrained(folder)
    special = gguf.SpecialVocab(folder, load_merges=bool(model.get("merges")), n_vocab=size)
    # what tokenizer("x") does, as the data windows' `bos: auto` reads it
    ids = tokenizer("x").input_ids
    special.add_special_token["bos"] = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------- tensors


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half rope rows (per head: first half, second half) -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of permute_rows: llama.cpp's interleaved pairs -> rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ROPE_ROWS = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
# a LowRankLinear's tensors -> what the Linear it stands for has there (None: folded into the weight)
LOWRANK_PARTS = {"down.weight": "weight", "up.weight": None, "residual.weight": None, "up.bias": "bias"}


def dense_state(model):
    """(hf name, tensor) of the model's state, each tensor once (a tied lm_head is left to llama.cpp,
    which falls back to token_embd itself), each LowRankLinear as the Linear it multiplies by: its
    dense product under NAME.weight, its bias under NAME.bias."""
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    seen = set()  # data pointers of the model's own tensors, alive as long as the model
    for hf_name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        owner, part = next(((o, p) for p in LOWRANK_PARTS if hf_name.endswith("." + p) and (o := hf_name[: -len(p) - 1]) in lowrank),
                           (None, None))
        if owner is None:
            yield hf_name, tensor
        elif LOWRANK_PARTS[part] == "weight":
            with torch.no_grad():
                dense = lowrank[owner].dense_weight()
            yield f"{owner}.weight", dense
        elif LOWRANK_PARTS[part] == "bias":
            yield f"{owner}.bias", tensor


def gguf_tensors(model, arch: Arch):
    """(gguf name, hf name, weight float32 in llama.cpp's row order, row permutation heads or None)."""
    c = model.config
    size = head_dim(c)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], c.num_hidden_layers)
    for hf_name, tensor in dense_state(model):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CompressError(f"export.gguf: no GGUF name for tensor {hf_name}")
        # q / k rows (and biases) head by head; the head count is the module's own (structured pruning)
        heads = tensor.shape[0] // size if arch.permute_qk and hf_name.endswith(ROPE_ROWS) else None
        w = tensor.detach().float().cpu()
        yield name, hf_name, (permute_rows(w, heads) if heads else w), heads


def on_block_grid(module) -> bool:
    """The layer's GPTQ grid is a GGUF block type as it stands: symmetric, 4 or 8 bits, groups of
    32 columns in column order."""
    state = getattr(module, "quant_state", None)
    if state is None or not state.grid.sym or state.grid.bits not in GRID_TYPES:
        return False
    cols = state.g_idx.numel()
    return cols % 32 == 0 and state.grid.width(cols) == 32 and torch.equal(state.g_idx.long(), torch.arange(cols) // 32)


def grid_blocks(module, heads: int | None) -> tuple[Q, np.ndarray] | None:
    """The layer's GPTQ grid written as GGUF blocks (raw bytes), when the grid is one (see
    on_block_grid). None otherwise."""
    if not on_block_grid(module):
        return None
    state = module.quant_state
    bits = state.grid.bits
    q = state.codes(module.weight.detach()).to(torch.int64) - (1 << (bits - 1))  # (rows, cols), centred
    scales = state.scales.t()  # (rows, groups): float16 values
    if heads:
        q, scales = permute_rows(q, heads), permute_rows(scales, heads)
    rows = q.shape[0]
    d = scales.half().contiguous().numpy().view(np.uint8).reshape(rows, -1, 2)
    blocks = q.reshape(rows, -1, 32)
    if bits == 8:
        payload = blocks.to(torch.int8).contiguous().numpy().view(np.uint8)
    else:  # Q4_0: element j in the low nibble of byte j, element j + 16 in its high nibble
        u = (blocks + 8).to(torch.uint8)
        payload = (u[..., :16] | (u[..., 16:] << 4)).numpy()
    return GRID_TYPES[bits][1], np.concatenate([d, payload], axis=-1).reshape(rows, -1)


def write_file(path: Path, model, tokenizer, arch: Arch, scratch: Path, kind: str, on_grid: bool = False) -> dict:
    """Write one GGUF file. kind: f32 / f16 / bf16 (every matrix in that type), or a grid type
    (q4_0 / q8_0) whose matrices on the GPTQ grid go in block for block, the others in Q8_0, or in
    F16 where rows are not whole 32-blocks (narrowed MLPs), as llama.cpp's quantizer does."""
    modules = dict(model.named_modules())
    writer = gguf.GGUFWriter(str(path), arch.name)
    write_hparams(writer, model, arch)
    write_tokenizer(writer, tokenizer, scratch, model.config.vocab_size)
    writer.add_file_type(LLAMA_FTYPE[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    requantised, fallback = [], []
    for name, hf_name, w, heads in gguf_tensors(model, arch):
        array = w.numpy()
        if w.dim() == 1 or kind == "f32":
            writer.add_tensor(name, array.astype(np.float32))
            continue
        if kind in ("f16", "bf16"):
            qtype = DIRECT[kind]
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            continue
        blocks = grid_blocks(modules.get(hf_name.removesuffix(".weight")), heads) if on_grid else None
        if blocks is not None:
            writer.add_tensor(name, blocks[1], raw_dtype=blocks[0])
        elif array.shape[-1] % 32:
            fallback.append(hf_name)
            writer.add_tensor(name, gguf.quants.quantize(array, Q.F16), raw_dtype=Q.F16)
        else:
            requantised.append(hf_name)
            writer.add_tensor(name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"requantised": requantised, "f16": fallback}


@contextlib.contextmanager
def quiet_fds(log_file: Path):
    """llama.cpp writes its progress to the process's stderr/stdout: send it to a file."""
    with open(log_file, "ab") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def llama_quantize(source: Path, out: Path, kind: str, threads: int, log_file: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[kind]
    params.nthread = threads
    with quiet_fds(log_file):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise CompressError(f"export.gguf: llama.cpp could not quantize to {kind} (status {status}; its log: {log_file})")


def tensor_types(path: Path) -> tuple[Counter, dict[str, str]]:
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return Counter(types.values()), types


def decoded(path: Path, model, arch: Arch, keep):
    """(gguf name, hf name, the model's weight in the file's row order, the file's values decoded
    to float32) for each tensor that keep(gguf name, hf name, weight) selects, one at a time."""
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, hf_name, w, _ in gguf_tensors(model, arch):
        if keep(name, hf_name, w):
            t = stored[name]
            yield name, hf_name, w, gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)


def zeros_kept(path: Path, model, arch: Arch) -> float | None:
    """Share of the model's zero weights (in block matrices) that stay exactly zero in the file."""
    def block_matrix_with_zeros(name, hf_name, w):
        return w.dim() == 2 and name.startswith("blk.") and bool((w == 0).any())

    zeros = kept = 0
    for _, _, w, values in decoded(path, model, arch, block_matrix_with_zeros):
        mask = (w == 0).numpy()
        zeros += int(mask.sum())
        kept += int((values[mask] == 0).sum())
    return kept / zeros if zeros else None


# ---------------------------------------------------------------- exporter


def file_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def save(model, tokenizer, dest: Path, cfg: GgufExport, scratch: Path) -> dict:
    arch = arch_of(model)
    # a type the GPTQ grid can be written as block for block (g128 4-bit is not Q4_0: llama.cpp requantises it)
    grid_kinds = {GRID_TYPES[m.quant_state.grid.bits][0] for m in model.modules() if on_block_grid(m)}
    if needs_llama_cpp(cfg, grid_kinds) and not llama_cpp_available():
        raise CompressError(f"export.gguf: types {needs_llama_cpp(cfg, grid_kinds)} need llama.cpp's quantizer; {NO_LLAMA_CPP}")
    dest.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    files, notes, base = {}, layout_notes(model, arch), None
    window = getattr(model.config, "sliding_window", None) if model_type(model) == "mistral" else None
    if window:  # llama.cpp runs Mistral as llama, attending to the whole context
        notes.append(f"the model's sliding window ({window} tokens) is not applied by llama.cpp: outputs agree up to {window} tokens of context")
    for kind in cfg.types:
        path = dest / file_name(kind)
        if kind in DIRECT or kind in grid_kinds:
            written = write_file(path, model, tokenizer, arch, scratch, kind, on_grid=kind in grid_kinds)
            how = "written directly" if kind in DIRECT else GRID_WRITTEN
            if written["requantised"]:
                notes.append(f"{kind}: {len(written['requantised'])} matrices not on a {kind} grid were quantised to Q8_0 ({', '.join(written['requantised'][:3])}...)")
            if written["f16"]:
                notes.append(f"{kind}: {len(written['f16'])} matrices have rows that are not whole 32-value blocks and were written as F16 ({', '.join(written['f16'][:3])}...)")
        else:
            if base is None:
                base = scratch / "base-f32.gguf"
                write_file(base, model, tokenizer, arch, scratch, "f32")
            llama_quantize(base, path, kind, torch.get_num_threads(), scratch / "llama-quantize.log")
            how = "llama.cpp quantize from F32"
            if any(getattr(m, "quant_state", None) is not None for m in model.modules()):
                notes.append(f"{kind}: the model's quantisation grid is not {kind}'s: dequantised and requantised by llama.cpp")
        counts, types = tensor_types(path)
        entry = {"file": path.name, "mb": round(path.stat().st_size / 2**20, 2), "how": how, "tensor_types": dict(counts)}
        if how == GRID_WRITTEN and written["f16"]:
            entry["f16"] = written["f16"]  # rows not whole blocks: F16, not the grid's exact values
        if kind in MAIN_TYPE:
            fallen = {n: t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and t not in ("F32", MAIN_TYPE[kind].name)}
            if fallen and how.startswith("llama.cpp"):
                by_type = Counter(fallen.values())
                entry["fallbacks"] = dict(by_type)
                notes.append(f"{kind}: {len(fallen)} block matrices are not {MAIN_TYPE[kind].name} ({', '.join(f'{n} {t}' for t, n in by_type.items())}); "
                             f"{FALLBACK_REASON[kind]}")
        entry["zeros_kept"] = zeros_kept(path, model, arch)
        files[kind] = entry
    return {"format": "gguf", "arch": arch.name, "files": files, "notes": notes}


def verify(model, dest: Path, info: dict, cfg: GgufExport) -> dict:
    """F32 files and grid-written blocks decode to exactly the model's weights."""
    arch = arch_of(model)
    out = {}
    modules = dict(model.named_modules())
    for kind, entry in info["files"].items():
        if kind != "f32" and entry["how"] != GRID_WRITTEN:
            continue
        def written_exactly(name, hf_name, w, kind=kind, f16=frozenset(entry.get("f16", ()))):
            # f32: every tensor; grid files: the GPTQ layers that went in as blocks
            return kind == "f32" or (on_block_grid(modules.get(hf_name.removesuffix(".weight"))) and hf_name not in f16)

        worst, checked = 0.0, 0
        for _, _, w, values in decoded(dest / entry["file"], model, arch, written_exactly):
            worst = max(worst, float(np.abs(values - w.numpy()).max()))
            checked += 1
        if worst != 0.0:
            raise CompressError(f"export check failed: gguf {kind} weights differ from the model's by {worst:g}")
        out[kind] = {"tensors": checked, "identical": True}
    return {"weights": out}


def check(dest: Path, info: dict, ref, cfg: GgufExport) -> dict:
    if not llama_cpp_available():
        log.warning("export check: gguf files not loaded in llama.cpp: %s", NO_LLAMA_CPP)
        return {"checked": False, "reason": NO_LLAMA_CPP}
    results = {}
    for kind, entry in info["files"].items():
        results[kind] = check_file(dest / entry["file"], kind, ref, cfg)
    return {"checked": True, "files_checked": results}


def open_llama(path: Path, n_ctx: int):
    import llama_cpp

    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                               n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(), verbose=False)
    except (ValueError, RuntimeError) as err:
        raise CompressError(f"export check failed: llama.cpp cannot load {path.name}: {err}") from None


def window_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def check_file(path: Path, kind: str, ref, cfg: GgufExport) -> dict:
    windows = ref.evaluation
    n_ctx = max(ref.tokens.shape[1], windows.shape[1] if windows is not None and len(windows) else 0)
    llm = open_llama(path, n_ctx)
    try:
        out = {"tokenization_equal": None}
        if ref.sample_ids is not None:
            got = llm.tokenize(ref.sample_text.encode("utf-8"), add_bos=False, special=False)
            out["tokenization_equal"] = got == ref.sample_ids
            if not out["tokenization_equal"]:
                first = next((i for i, (a, b) in enumerate(zip(got, ref.sample_ids)) if a != b), min(len(got), len(ref.sample_ids)))
                raise CompressError(f"export check failed: gguf tokenization differs from the HF tokenizer's at token {first} of the sample text")
        expected = ref.logits[0].numpy()
        got = window_logits(llm, ref.tokens[0].tolist())
        diff = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
        out.update({"max_abs_logit_diff": diff, "relative": diff / scale, "top1_agreement": agreement,
                    "tokens": int(ref.tokens.shape[1])})
        tolerance = LOGIT_TOLERANCE.get(kind)
        if tolerance is not None and diff > tolerance * scale:
            raise CompressError(f"export check failed: gguf {kind} logits differ by {diff:g} in llama.cpp (tolerance {tolerance * scale:g})")
        if agreement < TOP1_AGREEMENT[kind]:
            raise CompressError(f"export check failed: gguf {kind} agrees with the model's top token at {agreement:.1%} of positions in llama.cpp (at least {TOP1_AGREEMENT[kind]:.0%} expected)")
        if windows is not None and len(windows):
            out["perplexity"] = llama_perplexity(llm, windows)
            out["reference_perplexity"] = ref.window_perplexity
            out["windows"] = int(len(windows))
    finally:
        llm.close()
    return out


def llama_perplexity(llm, windows: torch.Tensor) -> float:
    """As compress.evaluate.perplexity: every window scored on its tokens 1..T-1."""
    total, count = 0.0, 0
    for window in windows:
        tokens = window.tolist()
        logits = torch.from_numpy(window_logits(llm, tokens))[:-1].double()
        nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        total += float(nll)
        count += len(tokens) - 1
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf
