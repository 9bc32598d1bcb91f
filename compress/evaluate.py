"""Perplexity over non-overlapping windows: exp(mean NLL of every predicted token).

Each window of seqlen tokens predicts its seqlen - 1 last tokens from the ones before; windows do
not see each other. The result carries seqlen and the token count so numbers are comparable only
with numbers measured the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from compress.calibrate import no_cache


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


def perplexity(model, tokens: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> Perplexity:
    """tokens: (windows, seqlen) int64."""
    start = time.perf_counter()
    total_nll = 0.0
    count = 0
    device = next(model.parameters()).device
    with no_cache(model):
        for batch in tqdm(tokens.to(device).split(batch_size), desc=desc, leave=False):
            logits = model(batch, use_cache=False).logits  # (b, seqlen, vocab)
            targets = batch[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            count += targets.numel()
    mean = total_nll / count
    return Perplexity(
        ppl=math.exp(mean) if mean < 700 else math.inf,
        nll=mean,
        tokens=count,
        windows=tokens.shape[0],
        seqlen=tokens.shape[1],
        seconds=time.perf_counter() - start,
    )
