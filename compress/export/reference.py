"""What every export is compared with: the in-memory model's outputs, taken once before the model
is freed, so that no check ever holds two models."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compress.blocks.forward import blockwise_logits, perplexity
from compress.blocks.runner import no_cache
from compress.blocks.store import store_of

# Tokenized by the HF tokenizer and by each runtime's own (GGUF): digits, numbers, contractions,
# whitespace runs, tabs, accents, several scripts (Latin, CJK, Cyrillic, Arabic, Devanagari,
# Hangul, Greek), emoji, code; sample_text() puts the tokenizer's own special tokens in it.
SAMPLE_TEXT = (
    "The 3 quick brown foxes jumped over 12,345 lazy dogs -- didn't they? Yes: they'd done it "
    "before (in 1999), and they'll do it again.\n\n  Indented line\twith a tab; café, naïve, 東京, "
    "Москва, القاهرة, मुंबई, 서울, Αθήνα 🚀🦙.\n{special}"
    "def f(x):\n    return x ** 2  # squares 3.14159, 1e-3, 0x1F\n"
)


def sample_specials(tokenizer=None) -> list[str]:
    """The special tokens sample_text writes out: the tokenizer's EOS and BOS."""
    return list(dict.fromkeys(t for t in (getattr(tokenizer, "eos_token", None), getattr(tokenizer, "bos_token", None)) if t))


def sample_text(tokenizer=None) -> str:
    """SAMPLE_TEXT with the tokenizer's EOS and BOS written out on a line of their own (each
    tokenizer must parse them as its special tokens, not as text)."""
    return SAMPLE_TEXT.format(special="".join(f"{t}\n" for t in sample_specials(tokenizer)))


def sample_pieces(tokenizer) -> list[tuple[str, list[int]]]:
    """sample_text cut before and after each special token, each piece with the tokenizer's ids
    of it alone: what a runtime is compared with where it treats the text after a special token
    as a new text (llama.cpp's SentencePiece tokenizer, see compress/export/gguf/llama_check.py)."""
    specials = sample_specials(tokenizer)
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", sample_text(tokenizer)) if specials else [sample_text(tokenizer)]
    return [(part, tokenizer(part, add_special_tokens=False).input_ids) for part in parts if part]


@dataclass
class Reference:
    tokens: torch.Tensor  # (n, t) probe windows
    logits: torch.Tensor  # (n, t, vocab) float32: the in-memory model's logits on `tokens` (what the HF folder must give)
    dtype: torch.dtype  # the model's dtype and device, to reload in
    device: torch.device
    prompt: torch.Tensor  # (1, p) a prompt for generation
    greedy: torch.Tensor  # (1, g) the model's greedy continuation of `prompt` (new tokens only)
    evaluation: torch.Tensor | None = None  # (k, seqlen) evaluation windows, for perplexity in a runtime
    window_perplexity: float | None = None  # the in-memory model's perplexity on exactly those windows
    bos: bool = False  # evaluation windows start with BOS (never a scored target)
    sample_text: str = SAMPLE_TEXT
    sample_ids: list[int] | None = None  # the HF tokenizer's ids of sample_text (special tokens in it parsed, none added)
    sample_ids_added: list[int] | None = None  # ... with the BOS / EOS the tokenizer adds by itself
    greedy_margins: torch.Tensor | None = None  # (g,) the model's top-1 minus top-2 logit at each greedy step
    # sample_text cut at its special tokens: (piece, the HF tokenizer's ids of that piece alone)
    sample_pieces: list[tuple[str, list[int]]] | None = None
    # (n, t, vocab): the logits of the model's weights with every product in float32, what llama.cpp
    # and ONNX Runtime compute with them; `logits` itself for a float32 model. prompt's greedy
    # continuation, its margins and window_perplexity are computed the same way.
    float_logits: torch.Tensor | None = None

    @property
    def runtime_logits(self) -> torch.Tensor:
        return self.logits if self.float_logits is None else self.float_logits


def forward_logits(model, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(n, t, vocab) float32 logits on CPU: a plain forward, or block by block for a streamed model
    or one computed in another dtype (evaluate.blockwise_logits)."""
    if store_of(model).resident and dtype is None:
        param = next(model.parameters())
        with no_cache(model):
            return model(tokens.to(param.device), use_cache=False).logits.float().cpu()
    return torch.cat([logits.float().cpu() for _, logits in blockwise_logits(model, tokens, dtype)])


def greedy_steps(model, prompt: torch.Tensor, new_tokens: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens (1, g), per step the top-1 minus top-2 logit (g,)) of greedy decoding: with
    generate, or for a streamed model (or in another dtype) one block-by-block pass per step over
    the whole prefix."""
    if store_of(model).resident and dtype is None:
        param = next(model.parameters())
        out = model.generate(prompt.to(param.device), attention_mask=torch.ones_like(prompt, device=param.device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        top2 = torch.stack([step[0].float().topk(2).values for step in out.logits]).cpu()  # (g, 2)
        return out.sequences[:, prompt.shape[1]:].cpu(), top2[:, 0] - top2[:, 1]
    sequence, margins, eos = prompt.cpu(), [], eos_ids(model)
    for _ in range(new_tokens):
        last = forward_logits(model, sequence, dtype)[0, -1]
        top2 = last.topk(2)
        margins.append(top2.values[0] - top2.values[1])  # of the raw logits, as generate's output_logits
        last[eos] = -torch.inf  # min_new_tokens: generate never picks EOS here
        sequence = torch.cat([sequence, last.argmax().view(1, 1)], dim=1)
    return sequence[:, prompt.shape[1]:], torch.stack(margins)


def eos_ids(model) -> list[int]:
    """The EOS ids generate stops at (its generation config's, else the model config's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(model.config, "eos_token_id", None) if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def take_reference(model, tokens: torch.Tensor, tokenizer=None, evaluation: torch.Tensor | None = None,
                   bos: bool = False, new_tokens: int = 16) -> Reference:
    """Logits on `tokens`, a greedy continuation of the first window's first 8 tokens, and the
    perplexity on `evaluation` (already cut to the windows the runtimes will score).

    A 16-bit model's logits are also taken with every product in float32 (float_logits), and the
    continuation and perplexity only so: llama.cpp and ONNX Runtime compute in float32 from its
    weights, while torch rounds every activation to 16 bits, which on a compressed bfloat16 model
    was measured 7x further from the float32 result than llama.cpp's bf16 file (4.64 against 0.62
    of a largest logit of 39.5, SmolLM2 structured -> low-rank -> GPTQ)."""
    param = next(model.parameters())
    compute = None if param.dtype == torch.float32 else torch.float32
    logits = forward_logits(model, tokens)
    float_logits = None if compute is None else forward_logits(model, tokens, compute)
    prompt = tokens[:1, :8]
    greedy, margins = greedy_steps(model, prompt, new_tokens, compute)
    ppl = None
    if evaluation is not None and len(evaluation):
        ppl = perplexity(model, evaluation, desc="reference ppl", dtype=compute).ppl
    text = sample_text(tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids if tokenizer is not None else None
    added = tokenizer(text).input_ids if tokenizer is not None else None
    pieces = sample_pieces(tokenizer) if tokenizer is not None else None
    return Reference(tokens, logits, param.dtype, param.device, prompt, greedy, evaluation, ppl, bos, text, ids, added, margins, pieces,
                     float_logits)


def reference_for_run(model, tokenizer, segments: dict, check_windows: int) -> Reference:
    """A run's reference: probes from its first two calibration windows (128 tokens), perplexity
    on its first `check_windows` evaluation windows (none when the run cut no evaluation text)."""
    evaluation = segments.get("evaluation")
    windows = evaluation.tokens[:check_windows] if evaluation is not None and check_windows else None
    return take_reference(model, segments["calibration"].tokens[:2, :128], tokenizer, windows,
                          bool(evaluation.bos) if evaluation is not None else False)
