"""Score what is deployed: an exported artefact loaded in its own runtime, measured the same way
as the in-memory model (perplexity and lm-eval zero-shot accuracy).

A `Runtime` holds one loaded artefact and gives the logits of one token sequence:

* "hf": an exported HF folder reloaded in torch (compress.model.load_model). lm-eval scores it with
  its own HFLM, exactly as compress.zeroshot scores the in-memory model, and perplexity is
  compress.evaluate.perplexity itself.
* "gguf": a GGUF file in llama.cpp itself (llama_cpp.Llama, in this process). lm-eval's own gguf
  client talks to a llama.cpp server and drops the last token of each continuation, so we do not
  use it.
* "onnx": an exported ONNX folder in ONNX Runtime; only prefill.onnx is needed to score
  (input_ids, attention_mask -> logits first), with the HF tokenizer saved beside it.

For the last two, `RuntimeLM` is the lm-eval model: a TemplateLM (lm-eval encodes the context /
continuation pairs, and uses the prefix token for an empty context) whose `_loglikelihood_tokens`
builds each request's input as HFLM does (context + continuation, left-truncated to max_length + 1,
last token dropped), takes the runtime's logits and sums the log-softmax of the continuation's
tokens. Rolling log-likelihoods (perplexity tasks) use lm-eval's own window functions, as HFLM does.
Generation tasks are refused.

Speed: requests are scored one at a time (llama.cpp and ONNX Runtime use every thread on one
sequence) in lexicographic token order, so the options of a multiple-choice question, which share
their context, follow one another; the GGUF runtime keeps llama.cpp's KV cache for the longest
common token prefix with the previous sequence and evaluates only the rest.

`runtime_perplexity` is compress.evaluate.perplexity's definition (each window of T tokens scores
its tokens 1..T-1; windows do not see each other) for any runtime.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from compress.blocks.forward import Perplexity, perplexity, summed_nll
from compress.errors import CompressError
from compress.evaluation.zeroshot import build_hflm
from compress.export.gguf import quiet_fds
from compress.export.onnx import run, session
from compress.model.anatomy import context_length
from compress.model.gguf_file import GgufIndex
from compress.model.load import load_model

KINDS = ("hf", "gguf", "onnx")
MAX_CONTEXT = 2048  # cap on the context a runtime is opened with: llama.cpp allocates n_ctx x vocab logits
# llama.cpp's KV cache: F16 is its default, i.e. what a deployment runs (it moves an F32 file's
# log-likelihoods by ~1e-4 relative); F32 leaves only float summation order (~1e-7)
KV_TYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32"}


class Runtime:
    """A loaded artefact that scores token sequences."""

    label: str  # "model", "hf", "gguf q8_0", "onnx"
    path: Path | None
    max_length: int  # longest sequence logits() accepts

    def logits(self, tokens: list[int], last: int | None = None) -> torch.Tensor:
        """(len(tokens), vocab) float32 logits of one sequence; only its `last` positions' rows
        when given (a continuation's: a copy of every row costs more than the scoring)."""
        raise NotImplementedError

    def lm(self, batch_size: int = 1, bos: bool | None = None):
        """An lm-eval LM that scores with this runtime. bos: BOS first in every request; None: as
        the artefact's tokenizer does by default."""
        return RuntimeLM(self, bos)

    def close(self) -> None:
        pass

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, {self.path})"


class TorchRuntime(Runtime):
    """A torch model with its HF tokenizer: the in-memory model, or an exported HF folder reloaded."""

    def __init__(self, model, tokenizer, label: str = "model", path: Path | None = None):
        self.model, self.tokenizer, self.label, self.path = model, tokenizer, label, path
        self.max_length = context_length(model.config) or MAX_CONTEXT

    def logits(self, tokens: list[int], last: int | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(torch.tensor([tokens], device=device), use_cache=False, logits_to_keep=last or 0).logits
        return logits[0].float().cpu()

    def lm(self, batch_size: int = 16, bos: bool | None = None):
        return build_hflm(self.model, self.tokenizer, batch_size, bos)

    def close(self) -> None:
        self.model = None


class GgufRuntime(Runtime):
    """A GGUF file in llama.cpp, with llama.cpp's own tokenizer from the file."""

    def __init__(self, path: Path, label: str | None = None, n_ctx: int | None = None, kv_cache: str = "f16",
                 reuse_prefix: bool = True):
        self.path, self.label = Path(path), label or f"gguf {_gguf_type(path)}"
        self.reuse_prefix = reuse_prefix  # False: every sequence from scratch (to check the reuse)
        self.evaluated = 0  # tokens llama.cpp actually ran: what the prefix reuse saves shows here
        meta = _gguf_metadata(self.path)
        trained = meta.get(f"{meta.get('general.architecture')}.context_length")
        self.max_length = int(n_ctx or min(int(trained or MAX_CONTEXT), MAX_CONTEXT))
        try:
            import llama_cpp
        except ImportError as err:
            raise CompressError(f"{self.path}: scoring a GGUF file needs llama-cpp-python: pip install 'atp-compress[gguf]' ({err})") from err
        if kv_cache not in KV_TYPES:
            raise CompressError(f"{self.path}: kv_cache {kv_cache!r} is not one of {', '.join(KV_TYPES)}")
        kv_type = getattr(llama_cpp, KV_TYPES[kv_cache])
        threads = torch.get_num_threads()
        try:
            with quiet_fds(Path(os.devnull)):  # llama.cpp prints its loading chatter on the process's fds
                self.llm = llama_cpp.Llama(str(self.path), n_ctx=self.max_length, n_batch=self.max_length, n_ubatch=self.max_length,
                                           logits_all=True, n_threads=threads, n_threads_batch=threads, type_k=kv_type, type_v=kv_type,
                                           verbose=False)
        except (ValueError, RuntimeError) as err:
            raise CompressError(f"{self.path}: llama.cpp cannot load this GGUF file: {err}") from None
        # llama.cpp invents a BOS id (11 for BPE vocabularies) when the file names none: read the file's own
        self.bos_token_id = int(meta["tokenizer.ggml.bos_token_id"]) if "tokenizer.ggml.bos_token_id" in meta else None
        self.eot_token_id = int(meta.get("tokenizer.ggml.eos_token_id", self.llm.token_eos()))
        # as HFLM: an empty context is scored after BOS, or after EOS when there is no BOS
        self.prefix_token_id = self.bos_token_id if self.bos_token_id is not None else self.eot_token_id

    def encode(self, text: str, bos: bool | None) -> list[int]:
        if bos is None:  # llama.cpp adds BOS when the file says so (tokenizer.ggml.add_bos_token)
            return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if bos and self.bos_token_id is None:
            raise CompressError(f"{self.path}: BOS asked for, but this GGUF file's tokenizer has no BOS token")
        return [self.bos_token_id, *tokens] if bos else tokens

    def logits(self, tokens: list[int], last: int | None = None) -> torch.Tensor:
        llm, n = self.llm, len(tokens)
        if not 0 < n <= self.max_length:
            raise CompressError(f"{self.path}: a sequence of {n} tokens does not fit llama.cpp's context of {self.max_length}; open the file with n_ctx={n} or more")
        keep = common_prefix(llm.input_ids[: llm.n_tokens], tokens) if self.reuse_prefix else 0
        if keep < n:
            # Rows 0..keep-1 of llm.scores and the KV cache up to keep still belong to this prefix;
            # eval() drops the cache from n_tokens on (memory seq_rm) and appends the rest.
            llm.n_tokens = keep
            llm.eval(tokens[keep:])
            self.evaluated += n - keep
        # when the whole sequence is a prefix of the cached one, its rows are all there already
        return torch.from_numpy(np.array(llm.scores[n - (last or n) : n], dtype=np.float32))

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


class OnnxRuntime(Runtime):
    """An exported ONNX folder: prefill.onnx in ONNX Runtime, the HF tokenizer saved beside it."""

    def __init__(self, folder: Path, label: str | None = None):

        self.path, self.label = Path(folder), label or "onnx"
        graph = self.path / "prefill.onnx"
        if not graph.is_file():
            raise CompressError(f"{graph}: not found; give the folder an ONNX export wrote (prefill.onnx, decode.onnx, tokenizer)")
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise CompressError(f"{graph}: scoring an ONNX export needs onnxruntime: pip install 'atp-compress[onnx]' ({err})") from err

        self.session = session(graph)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.max_length = min(context_length(AutoConfig.from_pretrained(self.path)) or MAX_CONTEXT, MAX_CONTEXT)
        self.bos_token_id = self.tokenizer.bos_token_id
        self.eot_token_id = self.tokenizer.eos_token_id
        self.prefix_token_id = self.bos_token_id if self.bos_token_id is not None else self.eot_token_id

    def encode(self, text: str, bos: bool | None) -> list[int]:
        # as HFLM's tok_encode: add_special_tokens decides BOS; None keeps the tokenizer's default
        return self.tokenizer.encode(text, **({} if bos is None else {"add_special_tokens": bos}))

    def logits(self, tokens: list[int], last: int | None = None) -> torch.Tensor:
        return torch.from_numpy(run(self.session, torch.tensor([tokens]))[0][0, -(last or len(tokens)) :]).float()

    def close(self) -> None:
        self.session = None


def open_runtime(kind: str, path: Path, label: str | None = None, n_ctx: int | None = None, kv_cache: str = "f16") -> Runtime:
    """Load an exported artefact in its own runtime. kind: "hf" (a folder), "gguf" (a .gguf file),
    "onnx" (a folder with prefill.onnx). GGUF only: n_ctx, llama.cpp's context (default: the
    model's, at most MAX_CONTEXT); kv_cache, "f16" (llama.cpp's default) or "f32"."""
    path = Path(path)
    if kind not in KINDS:
        raise CompressError(f"runtime: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if not path.exists():
        what = {"hf": "an exported HF folder", "gguf": "a .gguf file", "onnx": "an exported ONNX folder"}[kind]
        raise CompressError(f"{path}: not found; give {what}")
    if kind == "hf":
        loaded = load_model(str(path))
        return TorchRuntime(loaded.model, loaded.tokenizer, label or "hf", path)
    if kind == "gguf":
        if not path.is_file():
            raise CompressError(f"{path}: not a file; give one .gguf file of the export (e.g. model-q8_0.gguf)")
        return GgufRuntime(path, label, n_ctx, kv_cache)
    return OnnxRuntime(path, label)


def runtime_perplexity(runtime: Runtime, windows: torch.Tensor) -> Perplexity:
    """compress.blocks.forward.perplexity through the runtime: windows (n, T) int64, each window scores
    its tokens 1..T-1."""
    if isinstance(runtime, TorchRuntime):
        return perplexity(runtime.model, windows, desc=f"perplexity {runtime.label}")
    start = time.perf_counter()
    total, count = 0.0, 0
    for window in tqdm(windows.to(torch.int64), desc=f"perplexity {runtime.label}", leave=False):
        logits = runtime.logits(window.tolist())  # (T, vocab)
        total += summed_nll(logits[:-1], window[1:])
        count += window.numel() - 1
    mean = total / count
    return Perplexity(ppl=math.exp(mean) if mean < 700 else math.inf, nll=mean, tokens=count, windows=windows.shape[0],
                      seqlen=windows.shape[1], seconds=time.perf_counter() - start)


def common_prefix(cached, tokens: list[int]) -> int:
    """Length of the longest common prefix of a cached id array and a token list."""
    n = min(len(cached), len(tokens))
    differ = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(tokens[:n], dtype=np.asarray(cached).dtype))
    return int(differ[0]) if len(differ) else n


def _gguf_metadata(path: Path) -> dict:
    """The file's scalar metadata (strings and numbers; arrays as their length), read without llama.cpp."""
    if not path.is_file():
        raise CompressError(f"{path}: not found; give a .gguf file of the export")
    try:
        return GgufIndex(path).fields
    except (ValueError, OSError, struct.error) as err:
        raise CompressError(f"{path}: not a readable GGUF file: {err}") from None


def _gguf_type(path: Path) -> str:
    """q8_0 from model-q8_0.gguf (our exporter's naming), else the file's stem."""
    stem = Path(path).stem
    return stem.removeprefix("model-")


# ---------------------------------------------------------------------------------------------
# lm-eval over a Runtime
# ---------------------------------------------------------------------------------------------


def RuntimeLM(runtime: Runtime, bos: bool | None = None):
    """An lm-eval LM scoring with a runtime that has encode / prefix_token_id / eot_token_id
    (GgufRuntime, OnnxRuntime)."""
    return _runtime_lm_class()(runtime, bos)


@functools.cache
def _runtime_lm_class():
    """Built on first use: lm-eval is an optional extra, and importing it costs a second."""
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError as err:
        raise CompressError(f"zero-shot evaluation needs lm-eval 0.4.13: pip install 'atp-compress[eval]' (import failed: {err})") from err

    class _RuntimeLM(TemplateLM):
        tokenizer = None  # lm-eval's chat templates need an HF tokenizer; we score plain prompts

        def __init__(self, runtime: Runtime, bos: bool | None):
            super().__init__()
            self.runtime, self.bos = runtime, bos

        @property
        def eot_token_id(self) -> int:
            return self.runtime.eot_token_id

        @property
        def prefix_token_id(self) -> int:
            return self.runtime.prefix_token_id

        @property
        def bos_token_id(self) -> int | None:
            return self.runtime.bos_token_id

        @property
        def max_length(self) -> int:
            return self.runtime.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.runtime.encode(string, self.bos if add_special_tokens is None else add_special_tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            return loglikelihood_tokens(self, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return loglikelihood_rolling(self, requests, disable_tqdm, get_rolling_token_windows, make_disjoint_window)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise CompressError(f"zero-shot: generation tasks are not supported on {self.runtime.label} here; "
                                "choose log-likelihood (multiple-choice or perplexity) tasks")

    return _RuntimeLM


def loglikelihood_tokens(lm, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
    """lm-eval's (sum of log p, greedy?) of each request's continuation, through the runtime."""
    # HFLM's input: context + continuation, left-truncated to max_length + 1, last token dropped
    inputs = [(context + continuation)[-(lm.max_length + 1):][:-1] for _, context, continuation in requests]
    # lexicographic order: requests sharing a context follow one another (KV prefix reuse)
    order = sorted(range(len(requests)), key=lambda i: inputs[i])
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for i in tqdm(order, desc=f"loglikelihood {lm.runtime.label}", disable=disable_tqdm, leave=False):
        text, _, continuation = requests[i]
        target = torch.tensor(continuation)
        logits = lm.runtime.logits(inputs[i], last=len(continuation))  # (len(continuation), vocab)
        logp = F.log_softmax(logits.double(), dim=-1)
        answer = (float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all()))
        out[i] = answer
        if text is not None:  # rolling windows come without one
            lm.cache_hook.add_partial("loglikelihood", text, answer)
    return out


def loglikelihood_rolling(lm, requests, disable_tqdm: bool, rolling_windows, disjoint) -> list[float]:
    """Sum of log p over all of each text's tokens, in disjoint windows of max_length tokens, the
    first one after prefix_token_id (as HFLM). rolling_windows / disjoint: lm-eval's own helpers."""
    results = []
    for (text,) in tqdm([r.args for r in requests], desc=f"rolling {lm.runtime.label}", disable=disable_tqdm, leave=False):
        windows = [disjoint(w) for w in rolling_windows(
            token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1)]
        total = sum(ll for ll, _ in loglikelihood_tokens(lm, [(None, c, x) for c, x in windows], disable_tqdm=True))
        lm.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        results.append(total)
    return results
