"""Calibration, validation and evaluation text cut into token windows.

No text is ever shared between roles. Named datasets give each role its own split (train for
calibration, validation for validation, test for evaluation). A local or built-in source used by
several roles is tokenised once and cut into contiguous, disjoint parts in the order calibration,
validation, evaluation, sized by ROLE_SHARE. The validation part chooses hyperparameters (beta);
the evaluation part is the one reported. Where the text comes from: compress/data/text.py.

BOS: models trained with BOS at position 0 (Gemma above all) score far worse on windows that start
mid-stream without it. With `bos` on (by default when the tokenizer adds BOS itself), every window
is BOS + (seqlen - 1) text tokens; the BOS position is never a prediction target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from compress.config import Config
from compress.data.text import DATASET_SOURCES, ROLES, Role, read_text
from compress.errors import CompressError

# Share of a shared source each role gets, renormalised over the roles that use it.
ROLE_SHARE = {"calibration": 0.7, "validation": 0.1, "evaluation": 0.2}

# Text is tokenised in pieces of about this many characters: a fast tokenizer's whole-text
# encoding holds ~600 bytes per token (offsets, alignments), 800 MB for the 6 MB Brown corpus.
CHUNK_CHARS = 1 << 16


class SegmentsConfig(Config):
    """Where one role's text comes from and how it is cut."""

    source: str = "python-docs"
    nsamples: int | None = Field(default=None, gt=0)  # None: every full window (evaluation/validation)
    seqlen: int = Field(default=512, gt=1)
    seed: int = 0
    text_field: str = "text"  # for .jsonl sources
    bos: bool | Literal["auto"] = "auto"  # BOS first in every window; auto: when the tokenizer adds it


@dataclass
class Segments:
    tokens: torch.Tensor  # (nsamples, seqlen) int64
    role: Role
    source: str
    part: tuple[float, float]  # fraction of the source's tokens this role drew from
    part_tokens: int  # tokens in that part
    bos: bool = False  # every window starts with the BOS token

    @property
    def nsamples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seqlen(self) -> int:
        return self.tokens.shape[1]

    def describe(self) -> dict:
        return {
            "role": self.role,
            "source": self.source,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "part": list(self.part),
            "part_tokens": self.part_tokens,
            "bos": self.bos,
        }



# ---------------------------------------------------------------- cutting into segments


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """One long stream of token ids, without special tokens (windows start mid-stream anyway).

    Long text is encoded piece by piece, cut after a newline that a non-space character follows;
    where the tokenizer treats such a cut differently from the whole text (SentencePiece's
    dummy prefix, say) it is encoded whole, so the stream is always the whole text's.
    """
    if len(text) <= CHUNK_CHARS or not _cuts_are_neutral(tokenizer):
        return torch.tensor(_ids(text, tokenizer), dtype=torch.long)
    return torch.tensor([i for piece in _pieces(text) for i in _ids(piece, tokenizer)], dtype=torch.long)


def _ids(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _pieces(text: str) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        cut = _next_cut(text, start + CHUNK_CHARS)
        pieces.append(text[start:cut])
        start = cut
    return pieces


def _next_cut(text: str, at: int) -> int:
    """First position >= at right after a newline where a piece may end; or the end of the text.

    A whitespace run is never cut except right before its last space when a letter follows
    (" \n Robert": cut before " Robert", which is a pre-token of its own); otherwise a piece
    ending in whitespace would be pre-tokenised differently from the same text mid-stream.
    """
    while at < len(text):
        newline = text.find("\n", max(at - 1, 1))
        if newline < 0 or newline + 2 >= len(text):
            return len(text)
        after = text[newline + 1 : newline + 3]
        word_next = not after[0].isspace() and not text[newline - 1].isspace()
        space_word_next = after[0] == " " and after[1].isalpha()
        if word_next or space_word_next:
            return newline + 1
        at = newline + 2
    return len(text)


CUT_PROBES = (
    "The cat sat.\nA dog ran.",
    "x = 1\n\nprint(x)\nx = 2",
    "one two\n3 four",
    "word \nWord\nword",
    "é\nü ok",
    "= Title = \n The end\n  Two spaces",
    "word\n The\n 2 x",
)


def _cuts_are_neutral(tokenizer) -> bool:
    """Whether encoding the pieces of a text equals encoding it whole, on a few probe texts."""
    for probe in CUT_PROBES:
        cut = _next_cut(probe, 1)
        if _ids(probe, tokenizer) != _ids(probe[:cut], tokenizer) + _ids(probe[cut:], tokenizer):
            return False
    return True


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first by default, i.e. what tokenizer("x") does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("x")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def resolve_bos(cfg: "SegmentsConfig", role: Role, tokenizer) -> bool:
    if cfg.bos == "auto":
        return adds_bos(tokenizer)
    if cfg.bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise CompressError(f"data.{role}.bos: true, but the tokenizer has no BOS token; use auto or false")
    return cfg.bos


def role_parts(configs: dict[Role, SegmentsConfig]) -> dict[Role, tuple[float, float]]:
    """The fraction of its source each role reads; roles sharing a local source get disjoint parts."""
    parts: dict[Role, tuple[float, float]] = {}
    by_source: dict[tuple[str, str], list[Role]] = {}
    for role in ROLES:
        if role in configs:
            cfg = configs[role]
            if cfg.source in DATASET_SOURCES:
                parts[role] = (0.0, 1.0)  # each role reads its own split
            else:
                by_source.setdefault((cfg.source, cfg.text_field), []).append(role)
    for roles in by_source.values():
        total = sum(ROLE_SHARE[r] for r in roles)
        start = 0.0
        for role in roles:
            end = 1.0 if role == roles[-1] else round(start + ROLE_SHARE[role] / total, 6)
            parts[role] = (start, end)
            start = end
    return parts


def random_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at seeded random offsets (as Wanda/SparseGPT sample C4)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def consecutive_windows(stream: torch.Tensor, nsamples: int | None, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream; None takes every full window."""
    available = len(stream) // seqlen
    n = available if nsamples is None else nsamples
    return stream[: n * seqlen].view(n, seqlen)


def build_segments(
    configs: dict[Role, SegmentsConfig], tokenizer, base_dir: Path | None = None
) -> dict[Role, Segments]:
    """Token segments for every configured role: calibration at random offsets, the others in order."""
    parts = role_parts(configs)
    streams: dict[tuple[str, str, str], torch.Tensor] = {}
    result: dict[Role, Segments] = {}
    for role, cfg in configs.items():
        split = role if cfg.source in DATASET_SOURCES else ""
        key = (cfg.source, cfg.text_field, split)
        if key not in streams:
            streams[key] = tokenize(read_text(cfg.source, role, cfg.text_field, base_dir), tokenizer)
        stream = streams[key]
        lo, hi = parts[role]
        part = stream[int(lo * len(stream)) : int(hi * len(stream))]
        bos = resolve_bos(cfg, role, tokenizer)
        windows = _cut(part, role, cfg, cfg.seqlen - bos)
        if bos:
            windows = torch.cat([torch.full((len(windows), 1), tokenizer.bos_token_id), windows], dim=1)
        result[role] = Segments(windows, role, cfg.source, (lo, hi), len(part), bos)
    return result


def _cut(part: torch.Tensor, role: Role, cfg: SegmentsConfig, length: int) -> torch.Tensor:
    """Windows of `length` text tokens (seqlen, or seqlen - 1 when BOS goes first)."""
    where = f"data.{role}: source '{cfg.source}' gives this role {len(part)} tokens"
    if role == "calibration":
        if len(part) < length:
            raise CompressError(f"{where}, fewer than one segment of seqlen {cfg.seqlen}")
        distinct = len(part) - length + 1  # windows start at random offsets: this many differ
        if (cfg.nsamples or 128) > distinct:
            raise CompressError(f"data.calibration.nsamples: {cfg.nsamples} windows of seqlen {cfg.seqlen} asked for, but source "
                                f"'{cfg.source}' gives calibration {len(part)} tokens: only {distinct} different windows; "
                                "lower nsamples or seqlen, or give a longer source")
        return random_windows(part, cfg.nsamples or 128, length, cfg.seed)
    available = len(part) // length
    if available == 0 or (cfg.nsamples is not None and cfg.nsamples > available):
        raise CompressError(
            f"{where}: room for {available} windows of {cfg.seqlen}, asked for {cfg.nsamples or 'at least 1'}; "
            "lower nsamples or seqlen, or give a longer source"
        )
    return consecutive_windows(part, cfg.nsamples, length)
