"""Where a role's text comes from: a local .txt/.raw/.md file, a local .jsonl file (one document
per line, `text_field`), `python-docs` (the English documentation every CPython carries in
pydoc_data.topics: needs no network and no files), and, with the `datasets` package and a
network, `wikitext2` and `c4`."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics
from typing import Literal

from compress.errors import CompressError

Role = Literal["calibration", "validation", "evaluation"]


ROLES: tuple[Role, ...] = ("calibration", "validation", "evaluation")


BUILTIN_SOURCES = ("python-docs",)


DATASET_SOURCES = ("wikitext2", "c4")


TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text")


C4_DOCUMENTS = 5000  # enough for 128 x 2048 tokens; joining a whole C4 shard would take GBs


def read_text(source: str, role: Role, text_field: str = "text", base_dir: Path | None = None) -> str:
    """All text of a source, newlines normalised (WikiText copies often carry CRLF)."""
    if source == "python-docs":
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


def check_file_source(path: Path, role: Role) -> None:
    """A local source must be an existing .txt/.jsonl (or .raw/.md/.text) file."""
    if path.is_dir():
        raise CompressError(f"data.{role}.source: {path} is a folder; expected a .txt/.jsonl file")
    if not path.is_file():
        raise CompressError(
            f"data.{role}.source: {path} not found (expected a .txt/.jsonl file, "
            f"or one of {', '.join(BUILTIN_SOURCES + DATASET_SOURCES)})"
        )
    if path.suffix != ".jsonl" and path.suffix not in TEXT_SUFFIXES:
        raise CompressError(f"data.{role}.source: {path}: unknown file type '{path.suffix}' (use .txt or .jsonl)")


def _read_file(path: Path, text_field: str, role: Role) -> str:
    check_file_source(path, role)
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path, text_field, role))
    return path.read_text(encoding="utf-8", errors="replace")  # a stray byte must not stop a run


def _jsonl_texts(path: Path, text_field: str, role: Role) -> list[str]:
    texts = []
    with path.open(encoding="utf-8", errors="replace") as f:
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
