"""Perplexity over non-overlapping windows: exp(mean NLL of every predicted token).

Each window of seqlen tokens predicts its seqlen - 1 last tokens from the ones before; windows do
not see each other. A window that starts with BOS (see data.py) never scores the BOS position. The result carries seqlen and the token count so numbers are comparable only
with numbers measured the same way.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from compress.blocks import devices
from compress.blocks.runner import capture_inputs, no_cache, sequential
from compress.blocks.store import store_of
from compress.model.anatomy import block_prefix


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


NLL_ROWS = 64  # positions per log-softmax: its float32 temporaries stay ~12 MB for a 49k vocabulary


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over all positions; logits (b, n, vocab), targets (b, n).

    Taken a few rows at a time: one log-softmax over a whole window would hold two more copies
    of the logits (100 MB each for 512 tokens of a 49k vocabulary)."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return sum(
        float(F.cross_entropy(rows.float(), target, reduction="sum"))
        for rows, target in zip(logits.split(NLL_ROWS), targets.split(NLL_ROWS))
    )


def perplexity(model, tokens: torch.Tensor, batch_size: int = 1, desc: str = "perplexity", dtype: torch.dtype | None = None) -> Perplexity:
    """tokens: (windows, seqlen) int64. dtype: computed in that dtype (see blockwise_logits)."""
    start = time.perf_counter()
    if not store_of(model).resident or dtype is not None:
        total_nll, count = blockwise_nll(model, tokens, dtype)  # a streamed model: one block in memory at a time
        return _result(total_nll, count, tokens, start)
    total_nll = 0.0
    count = 0
    with devices.dispatched(model) as device, no_cache(model):
        for batch in tqdm(tokens.to(device).split(batch_size), desc=desc, leave=False):
            logits = model(batch, use_cache=False).logits  # (b, seqlen, vocab)
            total_nll += summed_nll(logits[:, :-1], batch[:, 1:])
            count += batch[:, 1:].numel()
            del logits
    return _result(total_nll, count, tokens, start)


def blockwise_nll(model, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Summed NLL of every window (tokens 1..T-1) and the count, the blocks run one at a time over
    all windows (one pass over the weights, not one per window): the evaluation of a streamed
    model (compress/blocks/sources.py), each block onloaded to the recipe's GPU if it names one."""
    total = 0.0
    for window, h, head in blockwise_hidden(model, tokens, dtype):
        # the head a few positions at a time: a whole window's logits are 100 MB for a 49k vocabulary
        targets = window[1:].to(h.device)
        for rows, target in zip(h[0, :-1].split(NLL_ROWS), targets.split(NLL_ROWS)):
            total += float(F.cross_entropy(head(rows).float(), target, reduction="sum"))
    return total, tokens.shape[0] * (tokens.shape[1] - 1)


def blockwise_logits(model, tokens: torch.Tensor, dtype: torch.dtype | None = None):
    """(window, its logits (1, t, vocab)) for each window of tokens (n, t), the blocks run one
    at a time over all windows: a streamed model's forward pass. dtype: every product computed in
    that dtype from the model's own weights (float32 for a 16-bit model: what llama.cpp and ONNX
    Runtime compute with them), one block's copy at a time; the tensors outside the blocks are
    cast for the pass and back (exact: float32 holds every 16-bit value)."""
    for window, h, head in blockwise_hidden(model, tokens, dtype):
        yield window, head(h)


def blockwise_hidden(model, tokens: torch.Tensor, dtype: torch.dtype | None = None):
    """(window, its final-normed hidden states (1, t, hidden), the output head) for each window,
    the blocks run one at a time over all windows (blockwise_logits without the logits)."""
    device = devices.of(model)
    with cast_outside_blocks(model, dtype):
        inputs = capture_inputs(model, tokens, dtype, skip_blocks=dtype is not None)
        hidden = sequential(model, inputs, lambda i, b: {}, lambda i, b: False, "perplexity blocks", dtype=dtype, keep_last=True)
        norm, head = model.model.norm, model.get_output_embeddings()
        with torch.inference_mode(), devices.onloaded(norm, device), devices.onloaded(head, device):
            logits = softcapped(head, getattr(getattr(model.config, "text_config", None) or model.config, "final_logit_softcapping", None))
            for h, window in zip(hidden, tokens):
                yield window, norm(h.to(head.weight.dtype)), logits


def softcapped(head, cap: float | None):
    """The head as the model's forward applies it: Gemma 2 squashes its logits into (-cap, cap)."""
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


@contextmanager
def cast_outside_blocks(model, dtype: torch.dtype | None):
    """The floating tensors outside the decoder blocks (embeddings, final norm, head, rotary
    buffers) in dtype while the context lasts, then back in their own dtypes."""
    if dtype is None:
        yield
        return
    prefix = block_prefix(model) + "."
    tensors = [t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not name.startswith(prefix) and t.is_floating_point() and t.device.type != "meta" and t.dtype != dtype]
    originals = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, original in zip(tensors, originals):
            t.data = t.data.to(original)


def _result(total_nll: float, count: int, tokens: torch.Tensor, start: float) -> Perplexity:
    mean = total_nll / count
    return Perplexity(
        ppl=math.exp(mean) if mean < 700 else math.inf,
        nll=mean,
        tokens=count,
        windows=tokens.shape[0],
        seqlen=tokens.shape[1],
        seconds=time.perf_counter() - start,
    )
