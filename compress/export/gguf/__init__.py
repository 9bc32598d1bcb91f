"""GGUF export for llama.cpp, through llama.cpp's own tools.

    model -> a dense HF folder (scratch) -> llama.cpp's converter (compress/export/gguf/convert.py)
          -> base GGUF -> llama.cpp's quantizer for every other type -> checks in llama.cpp

The base is F32, or F16 / BF16 when every weight is already in that type (no rounding either
way; a 7B's base is then 13 GB, not 27).

The converter knows the architectures, rope scalings and tokenizers (it recognises a BPE
pre-tokenizer by hashing a tokenization); our code keeps only what it cannot do:
- per-block widths of structured models: blocks are zero-padded to the config's widths for the
  converter and cut back afterwards, as the family's file or a deci file (compress/export/gguf/arch.py,
  compress/export/gguf/rewrite.py);
- GPTQ grids that are GGUF block types (symmetric, 4 or 8 bits, groups of 32 in column order: Q4_0
  / Q8_0): those matrices are written block for block into llama.cpp's quantized file, so GPTQ's
  rounding reaches llama.cpp unchanged;
- SentencePiece vocabularies the converter would read without their scores: a tokenizer.model
  rebuilt from the GGUF file the model came from, or from tokenizer.json
  (compress/model/tokenizer_files.py), which the converter reads them from.
A LowRankLinear goes in as its dense product (llama.cpp has no factored matmul).

Row orders are never assumed: each matrix of the base file is matched to the model's row by row
(the converter permutes q/k rows for llama's rope), and verify checks that every matrix is the
model's, exactly. The checks in llama.cpp live in compress/export/gguf/llama_check.py.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from pydantic import Field, field_validator

from compress.algorithms.ggml_formats import FORMATS, GgufState
from compress.algorithms.quant import QuantState
from compress.blocks.shards import ShardWriter, write_block_shards
from compress.blocks.store import store_of
from compress.config import Config
from compress.errors import CompressError
from compress.export.gguf import arch as gguf_arch
from compress.export.gguf import convert as llama_convert
from compress.export.gguf import pack as gguf_pack
from compress.export.gguf import rewrite as gguf_rewrite
from compress.export.gguf.arch import Widths, lowrank_notes
from compress.export.gguf.llama_check import NO_LLAMA_CPP, TOP1_AGREEMENT, check  # noqa: F401  (check: the exporter's; TOP1_AGREEMENT: its floors)
from compress.model import layout, tokenizer_files
from compress.model.anatomy import block_prefix, decoder_blocks, head_dim, model_type, outside_blocks
from compress.model.gguf_file import GgufIndex
from compress.model.modules import LowRankLinear

log = logging.getLogger("compress")

Q = gguf.GGMLQuantizationType
NamedType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0",
                    "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]
# "grid": every matrix the quantize stage put on a block format, in that format block for block;
# the other tensors in llama.cpp's choice for the closest named type
GgufType = Literal[NamedType, "grid"]
# llama.cpp's file type (llama.h: enum llama_ftype) of each
FTYPE = {kind: gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"]
         for kind in NamedType.__args__}
# the block type a quantised file type aims at (K-quant mixes keep some matrices wider by design)
MAIN_TYPE = {kind: Q[kind.upper().removesuffix("_M").removesuffix("_S").removesuffix("_L")] for kind in NamedType.__args__ if kind.startswith("q")}
# types the converter writes itself, used when llama.cpp's quantizer is not installed
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# why llama.cpp's quantizer left block matrices in another type (src/llama-quant.cpp, tensor_type_fallback)
FALLBACK_REASON = {
    "legacy": "rows (input columns) not divisible by 32 stay F16",
    "k": "K-quants need rows divisible by 256 (Q5_0 / Q5_1 / Q8_0 otherwise, F16 when not divisible by 32), "
         "and the _M / _L mixes keep some layers at higher precision by design",
}
GRID_WRITTEN = "llama.cpp quantize, grids written block for block"


class GgufExport(Config):
    """`export.gguf`: the llama.cpp files to write, one per type."""

    types: list[GgufType] = Field(default=["f16"], min_length=1)
    # the output and token-embedding matrices' types in the quantised files (default: llama.cpp's choice)
    output_type: Literal["f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0"] | None = None
    embedding_type: Literal["f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0"] | None = None

    @field_validator("types")
    @classmethod
    def _unique(cls, types):
        if len(set(types)) != len(types):
            raise ValueError(f"each type once, got {types}")
        return types


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def needs_llama_cpp(cfg: GgufExport) -> list[str]:
    """The types only llama.cpp's quantizer makes."""
    return [t for t in cfg.types if t not in CONVERTER_TYPES]


# ---------------------------------------------------------------- the folder the converter reads


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files with its tokenizer.model (built from tokenizer.json where the model
    came without one), and the USER_DEFINED pieces listed."""
    tokenizer_files.save_tokenizer(tokenizer, folder)
    tokenizer_files.model_from_tokenizer_json(folder)
    tokenizer_files.list_user_defined(folder)


def base_type(model) -> str:
    """The converter's output type, which every other file is made from: the weights' own 16-bit
    type when they all have it (lossless, and half of F32's disk for a 7B), F32 otherwise and for
    narrowed blocks (compress/export/gguf/rewrite.py cuts them back from an F32 file)."""
    full = gguf_arch.config_widths(model.config)
    if any(w != full for w in gguf_arch.block_widths(model)):
        return "f32"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtypes.pop(), "f32") if len(dtypes) == 1 else "f32"


DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def converter_config(model) -> dict:
    """config.json for the converter: the model's, without a quantization_config (the folder holds
    plain float weights in the base type), head_dim written out (narrowed blocks keep it)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.setdefault("head_dim", head_dim(model.config))
    if not data.get("architectures"):  # a model loaded from GGUF or built from a config names none
        data["architectures"] = [type(model).__name__]
    data["torch_dtype"] = data["dtype"] = str(DTYPE[base_type(model)]).removeprefix("torch.")
    return data


def padded(tensor: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """tensor with zero rows / columns appended up to rows x cols."""
    pad_rows = 0 if rows is None else rows - tensor.shape[0]
    pad_cols = 0 if cols is None or tensor.dim() == 1 else cols - tensor.shape[1]
    if pad_rows == 0 and pad_cols == 0:
        return tensor
    pad = (0, pad_cols, 0, pad_rows) if tensor.dim() == 2 else (0, pad_rows)
    return torch.nn.functional.pad(tensor, pad)


# rows / columns each projection has at the config's widths (the converter's layout)
PAD_ROWS = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ff", "up_proj": "ff"}
PAD_COLS = {"o_proj": "q", "down_proj": "ff"}


def at_config_widths(name: str, tensor: torch.Tensor, full: Widths, size: int) -> torch.Tensor:
    module = name.rsplit(".", 2)[-2]  # ...self_attn.q_proj.weight -> q_proj
    width = {"q": full.heads * size, "kv": full.kv_heads * size, "ff": full.ff}
    if module in PAD_ROWS:
        return padded(tensor, rows=width[PAD_ROWS[module]])
    if module in PAD_COLS and tensor.dim() == 2:
        return padded(tensor, cols=width[PAD_COLS[module]])
    return tensor


def dense_state(model):
    """(hf name, tensor) of the model's state: the tensors outside the decoder blocks, then each
    block's, taken from the block store in turn (a streamed model's one block at a time: a tensor
    is valid until the next block's come), each tensor once (a tied lm_head is the converter's
    business), each LowRankLinear as the Linear it multiplies by: its dense product under
    NAME.weight, its bias under NAME.bias."""
    store = store_of(model)
    yield from _dense(model, outside_blocks(model).items())
    for i, block in store.each():
        yield from _dense(block, ((f"{store.prefix}.{i}.{k}", t) for k, t in block.state_dict().items()), f"{store.prefix}.{i}.")


def _dense(module, items, prefix: str = ""):
    lowrank = {prefix + name: m for name, m in module.named_modules() if isinstance(m, LowRankLinear)}
    seen = set()
    for hf_name, tensor in items:
        if tensor.data_ptr() in seen or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        seen.add(tensor.data_ptr())
        owner, _, part = hf_name.rpartition(".")
        owner, _, sub = owner.rpartition(".")
        if owner not in lowrank:
            yield hf_name, tensor
        elif (sub, part) == ("down", "weight"):
            with torch.no_grad():
                yield f"{owner}.weight", lowrank[owner].dense_weight()
        elif (sub, part) == ("up", "bias"):
            yield f"{owner}.bias", tensor


def write_convert_folder(model, tokenizer, folder: Path) -> Path:
    """The model as a plain HF checkpoint in the base type at its config's widths (narrowed blocks
    zero-padded), one safetensors shard per block so that memory holds one block's copies. A
    streamed model's block files are such shards already where its blocks have the config's
    layout (no narrowed or low-rank blocks): they are hard-linked, not copied."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(converter_config(model), indent=2))
    save_tokenizer(tokenizer, folder)
    if not store_of(model).resident and not layout.describe(model):
        write_block_shards(model, folder)
        return folder
    dtype = DTYPE[base_type(model)]
    full, size, prefix = gguf_arch.config_widths(model.config), head_dim(model.config), block_prefix(model) + "."
    writer, current = ShardWriter(folder, max_bytes=float("inf")), "rest"
    for name, tensor in dense_state(model):  # written block by block, as the store hands them over
        block = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else "rest"
        if block != current:
            writer.end_shard()
        current = block
        writer.add({name: at_config_widths(name, tensor.detach().to(dtype).cpu(), full, size)})
    writer.close()
    return folder


# ---------------------------------------------------------------- preflight


_FAMILIES: dict[str, str] = {}  # digest of a vocab-only folder -> the converter's verdict, per process


class Pending:
    """A check still running (the converter in a subprocess); result() waits for its verdict."""

    def __init__(self, result, cancel=lambda: None):
        self.result, self.cancel = result, cancel


def family_of(model, tokenizer, scratch: Path) -> Pending:
    """llama.cpp's architecture for the model, from a vocab-only conversion of its config and
    tokenizer, started in the background: it fails, with the converter's reason, on an
    architecture or tokenizer the converter does not know (an unrecognised BPE pre-tokenizer, say)."""
    folder = scratch / "vocab-only"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(converter_config(model), indent=2))
    save_tokenizer(tokenizer, folder)
    digest = hashlib.sha256(str(llama_convert.converter_dir()).encode())
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode() + file.read_bytes())
    key = digest.hexdigest()
    if key in _FAMILIES:  # validate, then run, in one process: the converter runs once
        return Pending(lambda: _FAMILIES[key])
    conversion = llama_convert.Conversion(folder, scratch / "vocab.gguf", "f32", scratch / "converter.log", vocab_only=True)

    def result() -> str:
        _FAMILIES[key] = GgufIndex(conversion.wait()).arch
        return _FAMILIES[key]

    return Pending(result, conversion.cancel)


def preflight(model, tokenizer, cfg: GgufExport, scratch: Path | None = None, restructured: dict | None = None) -> Pending:
    """What would fail at export time, checked before any compression (model may be a skeleton):
    llama.cpp's quantizer for the types that need it, the converter, and the converter's verdict
    on the architecture and tokenizer, which comes back in the background: Pending.result() waits
    for it, raises what is wrong, and returns llama.cpp's architecture. restructured: {"per_block":
    bool, "out_biases": bool} when a structured stage will narrow the blocks."""
    if needs_llama_cpp(cfg) and not llama_cpp_available():
        raise CompressError(f"export.gguf: types {needs_llama_cpp(cfg)} need llama.cpp's quantizer; {NO_LLAMA_CPP}")
    llama_convert.converter_dir()
    if tokenizer is None:
        return Pending(lambda: None)
    temporary = None if scratch else tempfile.TemporaryDirectory(prefix="gguf-preflight-")
    pending = family_of(model, tokenizer, scratch or Path(temporary.name))

    def result() -> str:
        try:
            family = pending.result()
        finally:
            if temporary is not None:
                temporary.cleanup()
        check_narrowing(family, restructured)
        return family

    def cancel() -> None:
        pending.cancel()
        if temporary is not None:
            temporary.cleanup()

    return Pending(result, cancel)


def check_narrowing(family: str, restructured: dict | None) -> None:
    """Refuse what the structured stages would do to the blocks when llama.cpp has no graph for it."""
    if not restructured or family in gguf_arch.DECI_FROM:
        return
    g = gguf_arch.graph(family)
    why = [w for w, bad in (("takes every block's widths from block 0", restructured.get("per_block") and g.widths != "per_block"),
                           ("loads no o_proj/down_proj bias", restructured.get("out_biases") and not g.out_biases)) if bad]
    if why:
        raise CompressError(f"export.gguf: llama.cpp's {family} graph {' and '.join(why)}, which the structured stage would need, "
                            f"and its per-block 'deci' graph cannot carry {family}'s own layers: use a uniform allocation and "
                            "bias_compensation: false for a GGUF export of this model")


# ---------------------------------------------------------------- rows: which file row is which model row


def name_map(arch: str, blocks: int):
    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in names:
        raise CompressError(f"export.gguf: the gguf package {gguf.__version__ if hasattr(gguf, '__version__') else ''} does not know "
                            f"llama.cpp architecture {arch!r}; its tensors cannot be matched to the model's")
    return gguf.get_tensor_name_map(names[arch], blocks)


def row_order(file_rows: np.ndarray, model_rows: np.ndarray) -> np.ndarray | None:
    """perm with file_rows[i] == model_rows[perm[i]] for every row, or None when the file's matrix
    is not the model's in some row order (rows that are equal may pair either way)."""
    if file_rows.shape != model_rows.shape:
        return None
    if np.array_equal(file_rows, model_rows):
        return np.arange(len(file_rows))
    # + 0.0 turns -0.0 into 0.0: a zero code times a negative scale is -0.0 on one side and may be
    # 0.0 on the other (equal values, different bytes)
    where: dict[bytes, list[int]] = defaultdict(list)
    for i, row in enumerate(np.ascontiguousarray(model_rows) + np.float32(0)):
        where[row.tobytes()].append(i)
    perm = np.empty(len(file_rows), dtype=np.int64)
    for i, row in enumerate(np.ascontiguousarray(file_rows) + np.float32(0)):
        found = where.get(row.tobytes())
        if not found:
            return None
        perm[i] = found.pop() if len(found) > 1 else found[0]
    return perm


def matrices(model):
    """(hf name, float32 (rows, cols) weight) of every 2-D tensor the file holds, as the converter's
    folder holds it: dense products for low-rank modules, rounded to the base type as written
    there (the product of two bfloat16 factors is not a bfloat16 matrix)."""
    dtype = DTYPE[base_type(model)]
    for name, tensor in dense_state(model):
        if tensor.dim() == 2:
            yield name, tensor.detach().to(dtype).float().cpu()


def row_orders(base: Path, model, arch: str) -> dict[str, tuple[str, np.ndarray]]:
    """hf weight name -> (gguf name, perm) for every matrix of the base file that is the model's
    matrix in some row order. Raises naming the first matrix that is not."""
    stored = GgufIndex(base)
    names = name_map(arch, len(decoder_blocks(model)))
    orders = {}
    for hf_name, w in matrices(model):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name not in stored.tensors:
            raise CompressError(f"export check failed: the converter's file has no tensor for {hf_name}")
        perm = row_order(stored.values(name), w.numpy())
        if perm is None:
            raise CompressError(f"export check failed: gguf tensor {name} is not the model's {hf_name} (not even in another row order)")
        orders[hf_name] = (name, perm)
    return orders


# ---------------------------------------------------------------- grids written as GGUF blocks


def block_state(module) -> GgufState | None:
    """The layer's grid as one of llama.cpp's block formats, when it is one: the quantize stage's
    `grid:` formats, and integer GPTQ grids that are Q4_0 / Q8_0 as they stand (symmetric, 4 or 8
    bits, groups of 32 columns in column order). None otherwise (llama.cpp requantises it)."""
    state = getattr(module, "quant_state", None)
    if isinstance(state, GgufState):
        return state
    if not isinstance(state, QuantState) or not state.grid.sym or state.grid.bits not in (4, 8):
        return None
    cols = state.g_idx.numel()
    if cols % 32 or state.grid.width(cols) != 32 or not torch.equal(state.g_idx.long(), torch.arange(cols) // 32):
        return None
    return GgufState(FORMATS["q4_0" if state.grid.bits == 4 else "q8_0"], d=state.scales.t().float())


def gridded(model) -> tuple[dict[str, GgufState], bool]:
    """hf weight name -> block format of every layer on one, and whether any layer is quantised
    (one pass over the blocks)."""
    store, states, quantised = store_of(model), {}, False
    for i, block in store.each():
        for rel, m in block.named_modules():
            quantised |= getattr(m, "quant_state", None) is not None
            if (st := block_state(m)) is not None:
                states[f"{store.prefix}.{i}.{rel}.weight"] = st
    return states, quantised


def grid_blocks(module, perm: np.ndarray | None = None) -> tuple[np.ndarray, Q] | None:
    """The layer's grid as GGUF blocks (raw bytes, rows in the file's order perm), or None."""
    state = block_state(module)
    if state is None:
        return None
    q = state.codes(module.weight.detach())
    if perm is not None:
        index = torch.from_numpy(perm)
        q, state = q[index], state.rows(index)
    return gguf_pack.pack(state, q), state.fmt.qtype


# file type whose llama.cpp mix is closest to a grid: what the tensors without a grid take
NAMED_TYPE = {"q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0", "q2_k": "q2_k",
              "q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "q6_k": "q6_k"}


def grid_base(model, states: dict[str, GgufState]) -> str:
    """The named type for a `grid` file's other tensors: the mix that chose the formats (grid:
    q4_k_m ...: the file is then that type's, byte for byte), else the one of the format most
    weights are on."""
    mixes = {st.file_type for st in states.values()}
    if len(mixes) == 1 and (mix := mixes.pop()) is not None:
        return mix
    counts = Counter()
    modules = dict(model.named_modules())
    for name, st in states.items():
        counts[st.fmt.name] += modules[name.removesuffix(".weight")].weight.numel()
    return NAMED_TYPE[counts.most_common(1)[0][0]]


def grid_replacements(model, states: dict[str, GgufState], orders: dict, file_types: dict[str, str] | None) -> dict[str, tuple[np.ndarray, Q]]:
    """gguf name -> our blocks for every gridded matrix; with file_types (a named type's file),
    only where llama.cpp chose the grid's own type for that tensor."""
    store, out = store_of(model), {}
    for i, block in store.each():
        for rel, module in block.named_modules():
            hf_name = f"{store.prefix}.{i}.{rel}.weight"
            if hf_name not in states:
                continue
            gguf_name, perm = orders[hf_name]
            if file_types is None or file_types.get(gguf_name) == states[hf_name].fmt.qtype.name:
                out[gguf_name] = grid_blocks(module, perm)
    return out


# ---------------------------------------------------------------- llama.cpp's quantizer


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


def llama_quantize(source: Path, out: Path, kind: str, threads: int, log_file: Path, cfg: "GgufExport | None" = None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPE[kind])
    params.nthread = threads
    if cfg is not None and cfg.output_type:  # llama.cpp's own overrides for the two largest tensors
        params.output_tensor_type = int(Q[cfg.output_type.upper()])
    if cfg is not None and cfg.embedding_type:
        params.token_embedding_type = int(Q[cfg.embedding_type.upper()])
    with quiet_fds(log_file):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise CompressError(f"export.gguf: llama.cpp could not quantize to {kind} (status {status}; its log: {log_file})")


def decoded(stored: GgufIndex, orders: dict, keep) -> tuple:
    """(hf name, the file's values decoded to float32 in the model's row order) for each matrix
    that keep(hf name) selects, one at a time."""
    for hf_name, (name, perm) in orders.items():
        if keep(hf_name):
            values = stored.values(name)
            back = np.empty_like(values)
            back[perm] = values
            yield hf_name, back


def zeros_kept(stored: GgufIndex, model, orders: dict) -> float | None:
    """Share of the model's zero weights (in block matrices) that stay exactly zero in the file
    (one matrix in memory at a time)."""
    zeros = kept = 0
    prefix = block_prefix(model) + "."
    for hf_name, w in matrices(model):
        mask = (w == 0).numpy()
        if not hf_name.startswith(prefix) or not mask.any():
            continue
        _, values = next(decoded(stored, {hf_name: orders[hf_name]}, lambda n: True))
        zeros += int(mask.sum())
        kept += int((values[mask] == 0).sum())
    return kept / zeros if zeros else None


# ---------------------------------------------------------------- exporter


def file_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def describe_fallbacks(kind: str, types: dict[str, str]) -> tuple[dict, str | None]:
    main = MAIN_TYPE.get(kind)
    if main is None:
        return {}, None
    fallen = Counter(t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and t not in ("F32", main.name))
    if not fallen:
        return {}, None
    reason = FALLBACK_REASON["k" if "_K" in main.name else "legacy"]
    return dict(fallen), f"{kind}: {sum(fallen.values())} block matrices are not {main.name} ({', '.join(f'{n} {t}' for t, n in fallen.items())}); {reason}"


def save(model, tokenizer, dest: Path, cfg: GgufExport, scratch: Path) -> dict:
    if needs_llama_cpp(cfg) and not llama_cpp_available():
        raise CompressError(f"export.gguf: types {needs_llama_cpp(cfg)} need llama.cpp's quantizer; {NO_LLAMA_CPP}")
    dest.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    log_file = scratch / "llama.cpp.log"
    folder = write_convert_folder(model, tokenizer, scratch / "hf")
    base_kind = base_type(model)
    converted = llama_convert.convert(folder, scratch / f"converted-{base_kind}.gguf", base_kind, log_file)
    family = GgufIndex(converted).arch
    plan = gguf_arch.plan(model, family)
    base = gguf_rewrite.narrow(converted, scratch / "base-f32.gguf", plan, head_dim(model.config)) if plan.padded or plan.deci else converted
    orders = row_orders(base, model, family)
    notes = [*plan.notes, *lowrank_notes(model)]
    window = getattr(model.config, "sliding_window", None) if model_type(model) == "mistral" else None
    if window:  # llama.cpp runs Mistral as llama, attending to the whole context
        notes.append(f"the model's sliding window ({window} tokens) is not applied by llama.cpp: outputs agree up to {window} tokens of context")
    states, quantised = gridded(model)
    if "grid" in cfg.types and not states:
        raise CompressError("export.gguf.types: grid writes the quantize stage's llama.cpp block formats, and no layer is on one "
                            "(quantize with grid: q4_k ..., or GPTQ 4 / 8 bits in groups of 32 without act_order)")
    threads = torch.get_num_threads()
    files = {}
    for kind in cfg.types:
        path = dest / file_name(kind)
        entry = {"file": path.name}
        if kind == base_kind:
            shutil.copyfile(base, path)
            entry["how"] = "llama.cpp's converter"
        elif kind == "f32" or not llama_cpp_available():  # f32 / f16 / bf16 / q8_0 (needs_llama_cpp refused the rest)
            if plan.padded or plan.deci:
                raise CompressError(f"export.gguf: {kind} of a model with narrowed blocks comes from llama.cpp's quantizer; {NO_LLAMA_CPP}")
            llama_convert.convert(folder, path, kind, log_file)
            entry["how"] = "llama.cpp's converter"
        else:
            entry.update(quantized_file(model, kind, base, base_kind, path, scratch, cfg, states, orders, threads, log_file))
            left = len(states) - entry.get("grid_matrices", 0)
            if quantised and kind not in ("f16", "bf16") and (left or not states):
                notes.append(f"{kind}: {left or 'all'} quantised matrices are not on a {kind} file's types for them: dequantised and requantised by llama.cpp")
        stored = GgufIndex(path)
        types = stored.types()
        entry.update(mb=round(path.stat().st_size / 2**20, 2), tensor_types=dict(Counter(types.values())))
        fallbacks, note = describe_fallbacks(kind, types)
        if fallbacks:
            entry["fallbacks"] = fallbacks
            notes.append(note)
        entry["zeros_kept"] = zeros_kept(stored, model, orders)
        files[kind] = entry
    shutil.rmtree(folder, ignore_errors=True)  # as large as the model: gone before the next export
    return {"format": "gguf", "arch": plan.arch, "family": family, "base": base_kind, "files": files, "notes": notes,
            "converter": str(llama_convert.converter_dir())}


def quantized_file(model, kind: str, base: Path, base_kind: str, path: Path, scratch: Path, cfg: GgufExport, states: dict,
                   orders: dict, threads: int, log_file: Path) -> dict:
    """A type llama.cpp's quantizer makes from the base file; then every gridded matrix whose type
    in the file is its grid's own is replaced by our blocks, bit for bit (a `grid` file: all of them)."""
    named = grid_base(model, states) if kind == "grid" else kind
    made = scratch / file_name(kind)
    llama_quantize(base, made, named, threads, log_file, cfg)
    blocks = grid_replacements(model, states, orders, None if kind == "grid" else GgufIndex(made).types()) if states else {}
    if not blocks:
        os.replace(made, path)
        return {"how": f"llama.cpp quantize from {base_kind.upper()}"}
    gguf_rewrite.with_tensors(made, path, blocks)
    made.unlink()
    return {"how": GRID_WRITTEN, "grid_matrices": len(blocks), "base": named}


def verify(model, dest: Path, info: dict, cfg: GgufExport) -> dict:
    """Every matrix of the F32 file (and of the base type's: F16 / BF16 of a 16-bit model) is the
    model's (in the file's row order), exactly; so is every GPTQ matrix written block for block
    into a quantised file."""
    out = {}
    for kind in dict.fromkeys(("f32", info.get("base", "f32"))):
        if kind in info["files"]:
            orders = row_orders(dest / info["files"][kind]["file"], model, info["family"])  # raises naming a matrix that differs
            out[kind] = {"tensors": len(orders), "identical": True}
    states, _ = gridded(model)
    names = name_map(info["family"], len(decoder_blocks(model)))
    dtype = DTYPE[base_type(model)]  # a 16-bit model holds the grid values rounded to its dtype
    for kind, entry in info["files"].items():
        if entry["how"] != GRID_WRITTEN:
            continue
        stored = GgufIndex(dest / entry["file"])
        types, checked = stored.types(), 0
        for hf_name, w in matrices(model):
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if hf_name not in states or types.get(name) != states[hf_name].fmt.qtype.name:
                continue  # no grid, or requantised into another type by llama.cpp's mix
            values = stored.values(name)
            if dtype != torch.float32:
                values = torch.from_numpy(values).to(dtype).float().numpy()
            if row_order(values, w.numpy()) is None:
                raise CompressError(f"export check failed: gguf {kind} tensor {name} does not decode to the model's {hf_name}")
            checked += 1
        out[kind] = {"tensors": checked, "identical": True}
    return {"weights": out}
