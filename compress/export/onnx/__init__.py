"""ONNX export: graphs that ONNX Runtime runs on its own, checked against the in-memory model.

The folder holds (kv_cache on, the default):

    prefill.onnx       input_ids (batch, sequence) int64, attention_mask (batch, sequence) int64
                       -> logits (batch, sequence, vocab), present.{i}.key / present.{i}.value
                          (batch, kv_heads, sequence, head_dim) for every layer i
    decode.onnx        input_ids (batch, new), attention_mask (batch, past + new),
                       past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim)
                       -> logits (batch, new, vocab), present.{i}.key / .value (past + new)
    prefill.onnx.data  the weights, once: both graphs read them (external data, always)
    config.json, generation_config.json, tokenizer files: the folder is usable on its own

kv_heads and head_dim are each layer's own: a structured model (compress/model/layout.py) keeps a
different number of KV heads per block, and the graphs take their cache shapes from the modules
as traced, never from config.json; info["cache"] lists them per layer, as the graphs' inputs do.
A LowRankLinear stays two MatMuls (its factors), plus a third for a sparse residual, which ONNX
stores dense.

attention_mask is 1 for real tokens and 0 for (left) padding; positions are counted inside the
graphs from it (cumsum - 1, as transformers' generate does), so callers never pass them. Every
layer's cache keeps the whole past, sliding-window layers included: the window is applied by the
mask, which keeps the present/past shapes the same for all layers.

How: torch.onnx.export's dynamo exporter (torch.export + onnxscript) on a small wrapper module
that takes flat tensors and builds a transformers DynamicCache inside forward. torch.export keeps
shapes symbolic, which matters here: transformers only drops the causal / sliding-window mask
(relying on SDPA's is_causal, or on a short sequence not reaching the window) when it is not
tracing, so a traced graph would bake in a choice made for the example length. Attention is
exported as eager (matmul + softmax) for the duration of the export and set back after; the
model's dtype, mode and config are restored too. Weights are always stored as external data (so
the 2 GB protobuf limit never applies, and one file layout for every size), and the decode graph
points into the prefill graph's data file instead of writing a second copy. The export works in
memory (scratch is not used): about 1.5x the model's size at its peak.

verify (model still in memory): every weight matrix is in prefill.onnx.data bit for bit. check
(model gone): ONNX Runtime's logits against the reference's, greedy generation through prefill +
decode, the folder's tokenizer, and perplexity on a few evaluation windows.

Quantised models: GPTQ / round-to-nearest layers hold their dequantised float weights in memory,
which is what the torch model computes with; they are exported as such (dense), with a note.
bitsandbytes layers have no ONNX form and are refused.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from compress.blocks.forward import summed_nll
from compress.config import Config
from compress.errors import CompressError
from compress.export.hf import bnb, gptq
from compress.export.onnx import nbits as onnx_nbits
from compress.export.onnx.nbits import digest
from compress.model.modules import LowRankLinear
from compress.model.tokenizer_files import save_tokenizer

PREFILL = "prefill.onnx"
DECODE = "decode.onnx"
INSTALL_HINT = "pip install 'atp-compress[onnx]'"

# Largest logit difference accepted, relative to the largest |logit|, for a float32 model. ONNX
# Runtime and torch sum in different orders (and ORT fuses some ops), so logits are not bit-equal;
# measured 1e-7 to 6e-7 relative on the tiny llama / qwen2 / gemma3_text test models and 3.2e-6 on
# SmolLM2-135M (30 layers): 1e-4 leaves room for deeper models, while a wrong mask, position or
# weight shows up at 1e-2 and above.
RELATIVE_TOLERANCE = 1e-4
# A bfloat16 / float16 model is exported in float32 (ORT's CPU kernels lack bfloat16, and float32
# holds its weights exactly): it is held to the same bound against the reference's float32 forward
# of those weights (compress/export/reference.py), not against torch's 16-bit one, whose own rounding of
# every activation was measured at 12% of the largest logit on a compressed bfloat16 SmolLM2.
PERPLEXITY_WINDOWS = 8  # ORT perplexity is informative only; more windows cost time, not trust
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 8, 5  # > 1: torch.export specialises sizes 0 and 1


class OnnxExport(Config):
    """`export.onnx`: true (defaults) or its settings."""

    kv_cache: bool = True  # also write decode.onnx, which takes and returns the KV cache
    # The dynamo exporter writes opset 18 (onnxscript's torchlib); higher ones go through the ONNX
    # version converter (18, 20 and 23 checked with onnxruntime 1.32; older runtimes stop lower).
    opset: int = Field(default=18, ge=18, le=23)
    # quantised Linears as ONNX Runtime's MatMulNBits (packed codes + scales, compress/export/onnx/nbits.py)
    # where it holds them exactly; false: every Linear a dense float32 MatMul
    matmul_nbits: bool = True


# ------------------------------------------------------------------ graphs as torch modules


def positions(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position of each of the last `new` tokens, counting only real ones (left padding ignored)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


def cache_keyword(model) -> str:
    """transformers 5 calls the cache argument `cache`; 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def flat_cache(output) -> list[torch.Tensor]:
    cache = output.cache if hasattr(output, "cache") else output.past_key_values
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class PrefillGraph(nn.Module):
    """The model on a prompt; with kv_cache, also every layer's keys and values."""

    def __init__(self, lm: nn.Module, kv_cache: bool):
        super().__init__()
        self.lm = lm
        self.kv_cache = kv_cache
        self.cache_keyword = cache_keyword(lm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        cache = {self.cache_keyword: DynamicCache()} if self.kv_cache else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask, input_ids.shape[1]),
                      use_cache=self.kv_cache, **cache)
        return (out.logits, *flat_cache(out)) if self.kv_cache else out.logits


class DecodeGraph(nn.Module):
    """The model on new tokens after a past: (key, value) per layer, flat, in layer order."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.cache_keyword = cache_keyword(lm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        # the mask covers past and new tokens: saying so lets torch.export name its length past + new
        torch._check(attention_mask.shape[1] == past[0].shape[2] + input_ids.shape[1])
        # no config: every layer a plain DynamicLayer keeping the whole past (the mask slides)
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask, input_ids.shape[1]),
                      use_cache=True, **{self.cache_keyword: cache})
        return (out.logits, *flat_cache(out))


def cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


# ------------------------------------------------------------------ saving


def require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressError(f"export.onnx needs {' and '.join(missing)}: {INSTALL_HINT}")


def refuse_unexportable(model) -> None:
    if bnb.bnb_layers(model):
        raise CompressError("export.onnx: bitsandbytes layers have no ONNX form; quantise with gptq or rtn to export to ONNX")
    if not hasattr(model, "set_attn_implementation"):
        raise CompressError(f"export.onnx: {type(model).__name__} is not a transformers model that can switch to eager attention")


@contextmanager
def exportable(model) -> Iterator[None]:
    """Eval mode, eager attention and float32 while exporting; all set back after, even on error."""
    training = model.training
    attention = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    model.eval()
    model.set_attn_implementation("eager")
    if dtype != torch.float32:
        model.float()  # exact, and exactly undone: float32 holds every bfloat16 / float16 value
    try:
        yield
    finally:
        if dtype != torch.float32:
            model.to(dtype)
        model.set_attn_implementation(attention)
        model.train(training)


def example_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random token ids (and their all-ones mask) to trace with."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), generator=generator)
    return ids, torch.ones_like(ids)


def export_graph(wrapper: nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str], output_names: list[str], cfg: OnnxExport, model_type: str):
    """torch.onnx.export's dynamo exporter; its failures become one-line CompressErrors."""
    try:
        with warnings.catch_warnings():
            # torch's own chatter: Dim names it merges, pytree spec deprecations
            warnings.filterwarnings("ignore", message=r"# The axis name")
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            return torch.onnx.export(wrapper.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                     output_names=output_names, opset_version=cfg.opset, optimize=True, verbose=False)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompressError(f"export.onnx: torch.onnx.export cannot export this {model_type} model: {first}") from err


def export_prefill(model, cfg: OnnxExport, layers: int, example: tuple):
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    outputs = ["logits"] + (cache_names("present", layers) if cfg.kv_cache else [])
    with torch.no_grad():
        return export_graph(PrefillGraph(model, cfg.kv_cache), example, ({0: batch, 1: sequence}, {0: batch, 1: sequence}),
                            ["input_ids", "attention_mask"], outputs, cfg, model.config.model_type)


def export_decode(model, cfg: OnnxExport, layers: int, example: tuple):
    """Traced on two new tokens after a past of EXAMPLE_PAST (sizes 0 and 1 would be specialised)."""
    ids, mask = example
    with torch.no_grad():
        past = PrefillGraph(model, True)(ids[:, :EXAMPLE_PAST], mask[:, :EXAMPLE_PAST])[1:]
    new_ids = ids[:, EXAMPLE_PAST:EXAMPLE_PAST + 2]
    new_mask = mask[:, :EXAMPLE_PAST + 2]
    batch, new, past_length = torch.export.Dim("batch"), torch.export.Dim("new_sequence"), torch.export.Dim("past_sequence")
    dynamic = ({0: batch, 1: new}, {0: batch, 1: torch.export.Dim.AUTO}, tuple({0: batch, 2: past_length} for _ in past))
    with torch.no_grad():
        program = export_graph(DecodeGraph(model), (new_ids, new_mask, *past), dynamic,
                               ["input_ids", "attention_mask", *cache_names("past_key_values", layers)],
                               ["logits", *cache_names("present", layers)], cfg, model.config.model_type)
    name_mask_length(program)
    return program


def cache_layout(model, example: tuple) -> dict[str, list[int]]:
    """Each cached layer's KV heads and head size, read off a tiny forward (what DynamicCache will
    fill): per layer, since structured pruning leaves blocks with different KV heads."""
    ids, mask = example
    with torch.no_grad():
        present = PrefillGraph(model, True)(ids[:, :2], mask[:, :2])[1:]
    keys = present[0::2]  # (batch, kv_heads, sequence, head_dim)
    return {"kv_heads": [k.shape[1] for k in keys], "head_dim": [k.shape[3] for k in keys]}


def save(model, tokenizer, dest: Path, cfg: OnnxExport, scratch: Path) -> dict:
    """Write the graphs, weights, config and tokenizer into dest; returns what the report needs."""
    require("onnx", "onnxscript")
    refuse_unexportable(model)
    dest.mkdir(parents=True, exist_ok=True)
    packed, quant_notes = onnx_nbits.plan(model) if cfg.matmul_nbits else ({}, quantisation_notes(model))
    notes = quant_notes + lowrank_notes(model)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        notes.append(f"the model is {str(dtype).removeprefix('torch.')}: exported in float32 (ONNX Runtime's CPU kernels lack bfloat16)")
    graphs = {}
    with exportable(model):
        example = example_inputs(model)
        cache = cache_layout(model, example)
        layers = len(cache["kv_heads"])
        prefill = export_prefill(model, cfg, layers, example)
        nbits = onnx_nbits.rewrite(prefill.model.graph, packed)
        prefill.save(dest / PREFILL, external_data=True)
        graphs["prefill"] = PREFILL
        del prefill
        gc.collect()  # the program holds transposed copies of the weights: gone before the next export
        if cfg.kv_cache:
            decode = export_decode(model, cfg, layers, example)
            onnx_nbits.rewrite(decode.model.graph, packed)
            shared = save_sharing_weights(decode, dest / DECODE, dest / PREFILL)
            graphs["decode"] = DECODE
            notes.append(f"decode.onnx reads {shared} of its weight tensors from prefill.onnx.data (stored once)")
            del decode
    if len(nbits) < len(packed):  # the exporter wrote some MatMul another way: dense, and said so
        notes.append(f"{len(packed) - len(nbits)} quantised Linears not found as a MatMul on a constant weight: exported densely")
    if nbits:
        bits = sorted({p.bits for p in packed.values() if p.name in nbits})
        notes.append(f"{len(nbits)} quantised Linears as MatMulNBits ({'/'.join(map(str, bits))}-bit codes, com.microsoft): "
                     "ONNX Runtime dequantises them on the fly")
    model.config.save_pretrained(dest)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dest)
    save_tokenizer(tokenizer, dest)
    files = sorted(p.name for p in dest.iterdir() if p.is_file() and not p.name.startswith("."))
    return {
        "format": "onnx",
        "files": files,
        "graphs": graphs,
        "layers": layers,
        "cache": cache,
        "opset": cfg.opset,
        "exporter": "dynamo",
        "external_data": True,
        "matmul_nbits": {p.name: {"bits": p.bits, "block_size": p.block_size} for p in packed.values() if p.name in nbits},
        "mb": round(sum((dest / f).stat().st_size for f in files) / 2**20, 3),
        "notes": notes,
    }


def quantisation_notes(model) -> list[str]:
    layers = gptq.quantized_layers(model)
    if not layers:
        return []
    return [f"{len(layers)} quantised Linears exported densely: their dequantised float32 weights, which is what the torch "
            "model computes with (no integer kernels in the graph)"]


def lowrank_notes(model) -> list[str]:
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not lowrank:
        return []
    notes = [f"{len(lowrank)} low-rank Linears exported as their factors (two MatMuls each)"]
    residual = [m for m in lowrank if m.residual is not None]
    if residual:
        extra = sum(m.rank * (m.in_features + m.out_features) for m in residual)  # the factors, on top of a full matrix
        notes.append(f"{len(residual)} of them have a sparse residual, stored as a dense matrix (ONNX Runtime has no sparse MatMul "
                     f"on CPU): they hold {extra} more weights than the dense Linears they replace")
    return notes


# ------------------------------------------------------------------ weights stored once


INLINE_LIMIT = 64 * 2**20  # decode-only tensors above this go to their own data file, not the protobuf


def save_sharing_weights(program, path: Path, prefill_path: Path) -> int:
    """Save an exported graph so that its initializers equal to one of the prefill graph's point
    into prefill.onnx.data; returns how many do. Matched by content: the exporter folds weight
    transposes into constants named per graph (val_91 in one, val_98 in the other). What is left
    is small (rotary tables, index constants) and stays inline in the protobuf, unless it is not."""
    import onnx_ir

    stored = {digest(v.const_value.numpy()): v.const_value for v in onnx_ir.load(str(prefill_path)).graph.initializers.values()
              if isinstance(v.const_value, onnx_ir.ExternalTensor)}
    shared, inline_bytes = 0, 0
    for name, value in program.model.graph.initializers.items():
        twin = stored.get(digest(value.const_value.numpy()))
        if twin is None:
            inline_bytes += value.const_value.nbytes
            continue
        value.const_value = onnx_ir.ExternalTensor(twin.location, twin.offset, twin.length, twin.dtype, shape=twin.shape,
                                                   name=name, base_dir=twin.base_dir)
        shared += 1
    if inline_bytes > INLINE_LIMIT:
        program.save(path, external_data=True)  # copies the shared ones too: correct, only larger
        return 0
    onnx_ir.save(program.model, str(path))  # external tensors keep their location: prefill.onnx.data
    return shared


def name_mask_length(program) -> None:
    """The decode mask's length is past + new (the exporter only knows it as a fresh symbol)."""
    import onnx_ir

    mask = program.model.graph.inputs[1]
    mask.shape = onnx_ir.Shape([mask.shape[0], "past_sequence + new_sequence"])


# ------------------------------------------------------------------ verify: the bytes are the model's


def verify(model, dest: Path, info: dict, cfg: OnnxExport) -> dict:
    """Every weight matrix of the model is stored bit for bit in prefill.onnx (as itself, or
    transposed where the exporter folded a MatMul's transpose; a MatMulNBits layer's codes and
    scales decode to it). Vectors are left out: the exporter may fold them into expressions
    (Gemma's norms store 1 + weight)."""
    if importlib.util.find_spec("onnx_ir") is None:
        return {"weights": {"checked": False, "reason": f"onnx_ir is not installed: {INSTALL_HINT}"}}
    import onnx_ir

    graph = onnx_ir.load(str(dest / PREFILL)).graph
    stored = {digest(v.const_value.numpy()) for v in graph.initializers.values()}
    packed = info.get("matmul_nbits", {})
    matrices = {name: p for name, p in model.named_parameters() if p.dim() == 2}  # tied weights appear once
    dense = {name: p for name, p in matrices.items() if name.removesuffix(".weight") not in packed}
    missing = [name for name, p in dense.items() if not stored_as_is_or_transposed(p.detach().float().cpu(), stored)]
    missing += onnx_nbits.differing(graph, model, packed)
    if missing:
        raise CompressError(f"export check failed: onnx {PREFILL} does not hold the model's {missing[0]} bit for bit "
                            f"({len(missing)} of {len(matrices)} weight matrices differ)")
    return {"weights": {"checked": True, "matrices": len(matrices), "matmul_nbits": len(packed), "identical": True}}


def stored_as_is_or_transposed(weight: torch.Tensor, stored: set) -> bool:
    return digest(weight.numpy()) in stored or digest(weight.t().contiguous().numpy()) in stored


# ------------------------------------------------------------------ check: run in ONNX Runtime


def check(dest: Path, info: dict, ref, cfg: OnnxExport) -> dict:
    """Run the graphs in ONNX Runtime: prefill logits against the reference, greedy generation
    through prefill + decode against the model's, and perplexity on a few evaluation windows.
    One session at a time: each holds its own copy of the weights."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {"checked": False, "reason": f"onnxruntime is not installed: {INSTALL_HINT}"}
    prefill = session(dest / info["graphs"]["prefill"])
    result = {"checked": True, "runtime": runtime_version(), "parity": logit_parity(prefill, ref)}
    parity = result["parity"]
    if not parity["within_tolerance"]:
        raise CompressError(f"export check failed: onnx prefill logits differ by {parity['max_abs_logit_diff']:g} "
                            f"(tolerance {parity['tolerance']:g}, {parity['relative']:.2e} of the largest logit)")
    if ref.evaluation is not None and len(ref.evaluation):
        result["perplexity"] = runtime_perplexity(prefill, ref)
    prompt = ref.prompt.to(torch.int64)
    prompt_outputs = run(prefill, prompt)
    if "decode" in info["graphs"]:
        del prefill
        step = decode_step(session(dest / info["graphs"]["decode"]))
    else:
        step = rerun_step(prefill)
    tokens = greedy(prompt, prompt_outputs, step, ref.greedy.shape[1], suppressed_tokens(dest))
    result["greedy"] = {"equal": bool(torch.equal(tokens, ref.greedy)), "required": True, "tokens": tokens[0].tolist(),
                        "reference": ref.greedy[0].tolist(), "graphs": "prefill + decode" if "decode" in info["graphs"] else "prefill only"}
    if not result["greedy"]["equal"]:
        raise CompressError(f"export check failed: onnx greedy generation gives {tokens[0].tolist()}, "
                            f"the model {ref.greedy[0].tolist()}")
    tokenizer = tokenizer_parity(dest, ref)
    if tokenizer is not None:
        result["tokenizer"] = tokenizer
    return result


def runtime_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompressError(f"export check failed: onnx {path.name} does not load in ONNX Runtime: {first}") from err


def run(sess, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: list | None = None) -> list[np.ndarray]:
    """A graph's outputs (logits first, then present keys / values) for int64 inputs."""
    ids = input_ids.to(torch.int64).numpy()
    if attention_mask is None:
        past_length = past[0].shape[2] if past else 0
        attention_mask = torch.ones(ids.shape[0], past_length + ids.shape[1], dtype=torch.int64)
    feeds = {"input_ids": ids, "attention_mask": attention_mask.to(torch.int64).numpy()}
    names = [i.name for i in sess.get_inputs()][2:]
    feeds.update(zip(names, past or []))
    return sess.run(None, feeds)


def logit_parity(prefill, ref) -> dict:
    got = torch.from_numpy(run(prefill, ref.tokens)[0])
    expected = ref.runtime_logits.float()  # ONNX Runtime computes in float32 (a 16-bit model is exported in float32)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    tolerance = RELATIVE_TOLERANCE * scale
    return {
        "max_abs_logit_diff": diff,
        "relative": diff / scale if scale else 0.0,
        "tolerance": tolerance,
        "within_tolerance": diff <= tolerance,
        "tokens": int(ref.tokens.numel()),
    }


def suppressed_tokens(dest: Path) -> list[int]:
    """EOS ids: take_reference generates with min_new_tokens = max_new_tokens, which never lets
    generate pick EOS; the runtime's greedy loop must not either."""
    for name in ("generation_config.json", "config.json"):
        path = dest / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def decode_step(decode):
    """One more token through the decode graph, with the cache the last run returned."""
    return lambda sequence, outputs: run(decode, sequence[:, -1:], past=outputs[1:])


def rerun_step(prefill):
    """Without a decode graph: the whole sequence through prefill again."""
    return lambda sequence, outputs: run(prefill, sequence)


def greedy(prompt: torch.Tensor, prompt_outputs: list, step, new_tokens: int, suppressed: list[int]) -> torch.Tensor:
    """Greedy continuation (new tokens only) from the prompt's graph outputs; step(sequence,
    outputs) runs the graph once more after the last token of `sequence` was appended."""
    sequence, outputs, generated = prompt, prompt_outputs, []
    for _ in range(new_tokens):
        logits = torch.from_numpy(outputs[0][:, -1]).clone()
        logits[:, suppressed] = -math.inf
        token = logits.argmax(-1, keepdim=True)
        generated.append(token)
        if len(generated) == new_tokens:
            break
        sequence = torch.cat([sequence, token], dim=1)
        outputs = step(sequence, outputs)
    return torch.cat(generated, dim=1)


def runtime_perplexity(prefill, ref) -> dict:
    """compress.blocks.forward.perplexity's definition (every position predicts the next token; a BOS
    first is never a target) through the runtime, on at most PERPLEXITY_WINDOWS windows.
    Information, not a check: logit parity already bounds it."""
    windows = ref.evaluation[:PERPLEXITY_WINDOWS].to(torch.int64)
    total, count = 0.0, 0
    for window in windows.split(1):  # one at a time: a window's logits are seqlen x vocab floats
        logits = torch.from_numpy(run(prefill, window)[0])
        total += summed_nll(logits[:, :-1], window[:, 1:])
        count += window[:, 1:].numel()
    mean = total / count
    ppl = math.exp(mean) if mean < 700 else math.inf
    reference = getattr(ref, "window_perplexity", None)
    same_windows = len(windows) == len(ref.evaluation) and reference is not None
    return {
        "onnx": ppl,
        "nll": mean,
        "windows": len(windows),
        "of_windows": int(ref.evaluation.shape[0]),
        "tokens": count,
        "bos": ref.bos,
        "reference": reference,
        # the reference covers exactly these windows only when none were left out
        "relative_difference": abs(ppl - reference) / reference if same_windows and math.isfinite(ppl) and reference else None,
    }


def tokenizer_parity(dest: Path, ref) -> dict | None:
    """The folder's own tokenizer gives the reference ids of the sample text (the folder is used alone)."""
    expected = getattr(ref, "sample_ids", None)
    if expected is None:
        return None

    ids = AutoTokenizer.from_pretrained(dest)(ref.sample_text, add_special_tokens=False).input_ids
    if ids != expected:
        raise CompressError(f"export check failed: onnx folder's tokenizer gives {len(ids)} ids for the sample text, "
                            f"the model's tokenizer {len(expected)} (first difference at {first_difference(ids, expected)})")
    return {"sample_ids": len(ids), "equal": True}


def first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
