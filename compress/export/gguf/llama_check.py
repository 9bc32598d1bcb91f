"""GGUF files loaded in llama.cpp itself (llama-cpp-python) and compared with the in-memory model:

- tokenization: llama.cpp's tokenizer from the file against the HF tokenizer, on a sample mixing
  prose, code, digits, several scripts and the tokenizer's own special tokens; once as plain text
  (special tokens parsed), once with what each adds by itself (BOS / EOS);
- logits on the probe windows; greedy continuation of a prompt (f32 / f16 / bf16 must continue as
  the model does, except where the model's top two logits are closer than the type's rounding);
- perplexity on the first evaluation windows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError

log = logging.getLogger("compress")

# Largest logit difference accepted in llama.cpp, relative to the largest |logit| of the
# in-memory model: F32 differs only by float summation order (measured 3e-4 to 8e-4 on the tiny
# family models, with an F32 KV cache); f16 / bf16 round every weight (1e-3 / 4e-3). Within that
# bound the top token can change only where the model's top two were nearly tied, so the float
# types need no top-1 floor. The quantised types are lossy by design: for them the check is a
# floor on how often llama.cpp's top token equals the model's, which a broken file (wrong rope
# layout, wrong tokenizer) falls far below (to chance: 1 / vocabulary); their quality is the
# perplexity reported beside. On random tiny models (flat logits, the hardest case) q8_0 agrees at
# 86-98% (Gemma's soft-capped logits lowest), q4 types at 55-90%.
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 2e-2, "bf16": 5e-2}
TOP1_AGREEMENT = {"f32": 0.0, "f16": 0.0, "bf16": 0.0, "q8_0": 0.8, "q6_k": 0.8, "q5_k_m": 0.7, "q5_k_s": 0.7, "q5_1": 0.7,
                  "q5_0": 0.7, "q4_k_m": 0.5, "q4_k_s": 0.5, "q4_1": 0.5, "q4_0": 0.5, "q3_k_l": 0.3, "q3_k_m": 0.3,
                  "q3_k_s": 0.3, "q2_k": 0.2}

NO_LLAMA_CPP = "llama-cpp-python is not installed: pip install 'atp-compress[gguf]' (it compiles llama.cpp, ~15 minutes on 2 cores)"


def check(dest: Path, info: dict, ref, cfg) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        log.warning("export check: gguf files not loaded in llama.cpp: %s", NO_LLAMA_CPP)
        return {"checked": False, "reason": NO_LLAMA_CPP}
    results = {}
    for kind, entry in info["files"].items():  # a grid file is held to the bounds of the named type it is closest to
        results[kind] = check_file(dest / entry["file"], entry.get("base", kind), ref)
    return {"checked": True, "files_checked": results}


def open_llama(path: Path, n_ctx: int, f32_cache: bool = False, repack: bool = False):
    """The file in llama.cpp; f32_cache: keys and values in float32 (llama.cpp's default F16 cache
    rounds them, which an F32 file's check should not see). repack: let llama.cpp copy the
    quantised weights into its interleaved layouts for the AVX-512 / AMX kernels (its default, what
    a user's runtime does); the check reads them from the memory-mapped file instead, since the
    copy doubles the memory a quantised file takes (a 7B's q4_0: 9.2 GB peak against 4.5 GB) and the
    check is about the file's contents, not about llama.cpp's kernels."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    try:
        with extra_buffer_types(repack):
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                   n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(), verbose=False, **cache)
    except (ValueError, RuntimeError) as err:
        raise CompressError(f"export check failed: llama.cpp cannot load {path.name}: {err}") from None


@contextlib.contextmanager
def extra_buffer_types(enabled: bool):
    """llama_model_params.use_extra_bufts (llama.cpp's --no-repack when False), which
    llama-cpp-python's Llama does not take as an argument: its __init__ starts from
    llama_model_default_params(), so the defaults it reads are swapped while the model loads."""
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def params():
        out = defaults()
        out.use_extra_bufts = enabled
        return out

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


def window_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def check_tokenization(llm, ref) -> dict:
    """The sample as plain text, and with the special tokens each tokenizer adds by itself.

    One difference is llama.cpp's rule, not the file's: its SentencePiece tokenizer starts the text
    after every special token as a new text, with the space SentencePiece puts first (as encoding
    each piece on its own does, and transformers' legacy Llama tokenizer), while transformers 5's
    Llama tokenizer puts that space only at the very start. No GGUF field changes it. For such a
    vocabulary the sample is compared piece by piece between its special tokens instead (every
    piece's ids and the special tokens' ids must still be equal), and the result says so."""
    text = ref.sample_text.encode("utf-8")
    out = {"tokenization_equal": True, "sample_tokens": len(ref.sample_ids)}
    got = llm.tokenize(text, add_bos=False, special=True)
    at = first_difference(got, ref.sample_ids)
    if at is not None:
        if not (restarts_after_specials(llm) and ref.sample_pieces and pieces_equal(llm, ref.sample_pieces)):
            raise_difference("the sample text", got, ref.sample_ids, at)
        out.update(tokenization_equal="piece by piece", tokenization_note=AFTER_SPECIAL_NOTE, first_difference_whole=at)
    got_added = llm.tokenize(text, add_bos=True, special=True)
    if at is None:
        at_added = first_difference(got_added, ref.sample_ids_added)
        if at_added is not None:
            raise_difference("the sample text with BOS/EOS as each adds them", got_added, ref.sample_ids_added, at_added)
    elif framing(got_added, got) != framing(ref.sample_ids_added, ref.sample_ids):
        raise CompressError(f"export check failed: gguf adds {framing(got_added, got)} (before, after) to the sample text, "
                            f"the HF tokenizer {framing(ref.sample_ids_added, ref.sample_ids)}")
    return out


AFTER_SPECIAL_NOTE = ("llama.cpp puts SentencePiece's leading space after every special token, the HF tokenizer only at the start; "
                      "compared piece by piece between the special tokens")


def restarts_after_specials(llm) -> bool:
    """llama.cpp's tokenizer of the file is SentencePiece's with a leading space (see check_tokenization)."""
    meta = getattr(llm, "metadata", None) or {}
    return meta.get("tokenizer.ggml.model") == "llama" and str(meta.get("tokenizer.ggml.add_space_prefix", "true")).lower() != "false"


def pieces_equal(llm, pieces: list[tuple[str, list[int]]]) -> bool:
    return all(llm.tokenize(piece.encode("utf-8"), add_bos=False, special=True) == ids for piece, ids in pieces)


def framing(with_added: list[int], plain: list[int]) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) the plain tokenization inside the one with the tokens a tokenizer adds."""
    for start in range(len(with_added) - len(plain) + 1):
        if with_added[start:start + len(plain)] == plain:
            return with_added[:start], with_added[start + len(plain):]
    return None


def raise_difference(what: str, got: list[int], expected: list[int], at: int):
    show = lambda ids: ids[max(at - 2, 0): at + 3]  # noqa: E731
    raise CompressError(f"export check failed: gguf tokenization of {what} differs from the HF tokenizer's at token {at} "
                        f"(llama.cpp {show(got)}, HF {show(expected)})")


def greedy(llm, prompt: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def check_greedy(llm, ref, kind: str, scale: float) -> dict:
    """llama.cpp's greedy continuation of the reference prompt; f32 / f16 / bf16 must equal the
    model's up to a step where the model's top two logits were within the type's tolerance."""
    expected = ref.greedy[0].tolist()
    got = greedy(llm, ref.prompt[0].tolist(), len(expected))
    at = first_difference(got, expected)
    out = {"greedy_equal": at is None, "greedy_tokens": len(expected)}
    if at is None:
        return out
    margin = float(ref.greedy_margins[at])
    tolerance = LOGIT_TOLERANCE.get(kind)
    out.update(greedy_diverged_at=at, greedy_margin=margin)
    if tolerance is not None and margin > tolerance * scale:
        raise CompressError(f"export check failed: gguf {kind} greedy continuation differs from the model's at token {at} in llama.cpp, "
                            f"where the model's top two logits are {margin:.3g} apart (more than the {kind} tolerance {tolerance * scale:.3g})")
    return out


def check_file(path: Path, kind: str, ref) -> dict:
    windows = ref.evaluation
    n_ctx = max(ref.tokens.shape[1], windows.shape[1] if windows is not None and len(windows) else 0,
                ref.prompt.shape[1] + ref.greedy.shape[1] + 1, len(ref.sample_ids_added or []) + 1)
    llm = open_llama(path, n_ctx, f32_cache=kind == "f32")
    try:
        out = {"tokenization_equal": None}
        if ref.sample_ids is not None:
            out.update(check_tokenization(llm, ref))
        expected = ref.runtime_logits[0].numpy()  # llama.cpp computes in float32 from the file's weights
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
        out.update(check_greedy(llm, ref, kind, scale))
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
