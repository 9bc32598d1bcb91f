"""Calibration, validation and evaluation text, cut into token segments.

Sources: a local .txt/.raw/.md file, a local .jsonl file (one document per line, `text_field`),
`python-docs` (the English documentation every CPython carries in pydoc_data.topics: needs no
network and no files), and, with the `datasets` package and a network, `wikitext2` and `c4`.

No text is ever shared between roles. Named datasets give each role its own split (train for
calibration, validation for validation, test for evaluation). A local or built-in source used by
several roles is tokenised once and cut into contiguous, disjoint parts in the order calibration,
validation, evaluation, sized by ROLE_SHARE. The validation part chooses hyperparameters (beta);
the evaluation part is the one reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from compress.config import Config
from compress.errors import CompressError

Role = Literal["calibration", "validation", "evaluation"]
ROLES: tuple[Role, ...] = ("calibration", "validation", "evaluation")
# Share of a shared source each role gets, renormalised over the roles that use it.
ROLE_SHARE = {"calibration": 0.7, "validation": 0.1, "evaluation": 0.2}

BUILTIN_SOURCES = ("python-docs",)
DATASET_SOURCES = ("wikitext2", "c4")
TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text")
C4_DOCUMENTS = 5000  # enough for 128 x 2048 tokens; joining a whole C4 shard would take GBs


class SegmentsConfig(Config):
    """Where one role's text comes from and how it is cut."""

    source: str = "python-docs"
    nsamples: int | None = Field(default=None, gt=0)  # None: every full window (evaluation/validation)
    seqlen: int = Field(default=512, gt=1)
    seed: int = 0
    text_field: str = "text"  # for .jsonl sources


@dataclass
class Segments:
    tokens: torch.Tensor  # (nsamples, seqlen) int64
    role: Role
    source: str
    part: tuple[float, float]  # fraction of the source's tokens this role drew from
    part_tokens: int  # tokens in that part

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
        }


# ---------------------------------------------------------------- reading text


def read_text(source: str, role: Role, text_field: str = "text", base_dir: Path | None = None) -> str:
    """All text of a source, newlines normalised (WikiText copies often carry CRLF)."""
    if source == "python-docs":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
    elif source in DATASET_SOURCES:
        text = _read_dataset(source, role)
    else:
        text = _read_file(resolve_path(source, base_dir), text_field, role)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def resolve_path(source: str, base_dir: Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _read_file(path: Path, text_field: str, role: Role) -> str:
    if not path.is_file():
        raise CompressError(
            f"data.{role}.source: {path} not found (expected a .txt/.jsonl file, "
            f"or one of {', '.join(BUILTIN_SOURCES + DATASET_SOURCES)})"
        )
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path, text_field, role))
    if path.suffix in TEXT_SUFFIXES:
        return path.read_text(encoding="utf-8", errors="replace")
    raise CompressError(f"data.{role}.source: {path}: unknown file type '{path.suffix}' (use .txt or .jsonl)")


def _jsonl_texts(path: Path, text_field: str, role: Role) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CompressError(f"data.{role}.source: {path}:{lineno}: not JSON ({err.msg})") from err
            if not isinstance(record, dict) or text_field not in record:
                raise CompressError(f"data.{role}.source: {path}:{lineno}: no field '{text_field}' (data.{role}.text_field)")
            texts.append(str(record[text_field]))
    return texts


def _read_dataset(name: str, role: Role) -> str:
    try:
        import datasets
    except ImportError as err:
        raise CompressError(f"data.{role}.source: '{name}' needs the datasets package: pip install 'atp-compress[datasets]'") from err
    try:
        if name == "wikitext2":
            split = {"calibration": "train", "validation": "validation", "evaluation": "test"}[role]
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "\n\n".join(rows)
        shard = "en/c4-train.00000-of-01024.json.gz" if role == "calibration" else "en/c4-validation.00000-of-00008.json.gz"
        rows = datasets.load_dataset("allenai/c4", data_files={"x": shard}, split="x")
        return "\n\n".join(rows.select(range(min(C4_DOCUMENTS, len(rows))))["text"])
    except (OSError, ValueError, ConnectionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompressError(f"data.{role}.source: could not load dataset '{name}' (offline?): {first}") from err


# ---------------------------------------------------------------- cutting into segments


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """One long stream of token ids, without special tokens (segments start mid-stream anyway)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
        result[role] = Segments(_cut(part, role, cfg), role, cfg.source, (lo, hi), len(part))
    return result


def _cut(part: torch.Tensor, role: Role, cfg: SegmentsConfig) -> torch.Tensor:
    where = f"data.{role}: source '{cfg.source}' gives this role {len(part)} tokens"
    if role == "calibration":
        if len(part) < cfg.seqlen:
            raise CompressError(f"{where}, fewer than one segment of seqlen {cfg.seqlen}")
        return random_windows(part, cfg.nsamples or 128, cfg.seqlen, cfg.seed)
    available = len(part) // cfg.seqlen
    if available == 0 or (cfg.nsamples is not None and cfg.nsamples > available):
        raise CompressError(
            f"{where}: room for {available} windows of {cfg.seqlen}, asked for {cfg.nsamples or 'at least 1'}; "
            "lower nsamples or seqlen, or give a longer source"
        )
    return consecutive_windows(part, cfg.nsamples, cfg.seqlen)
