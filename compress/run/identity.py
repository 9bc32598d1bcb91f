"""What a run computes, as one hash: the resolved recipe + the bytes of the model and of the data.

`compress compare` and `compress sweep` read a finished run instead of recomputing it when its
metadata.json carries the same run_id. The hash covers:

* the recipe after --set overrides, every value that differs from its default (so a field added
  to the schema later does not change the id of finished runs), minus what does not change the
  numbers: where the run is written (output_dir), its display name, and torch's thread count;
* the model's files (a local GGUF file, or an HF folder's config, weights and tokenizer files;
  a registered name is hashed through the file it resolves to; a hub id by id and revision);
* every local data file the recipe reads (calibration, validation, evaluation text, zero-shot
  task files); built-in and named sources by name.

Files are hashed by content (SHA-256 at ~1 GB/s: half a second for SmolLM2, ~15 s for a 7B
model), memoised per (path, size, mtime) so a comparison of many recipes on one model reads it
once. A file changed in place gets a new mtime and so a new hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from compress.data.text import BUILTIN_SOURCES, DATASET_SOURCES
from compress.errors import CompressError
from compress.evaluation.zeroshot import DATA_FILES
from compress.model.load import locate
from compress.run.recipe import Recipe

# Fields of the recipe that say where and how fast, not what: excluded from the hash.
NOT_IDENTITY = ("output_dir", "name", "threads")
MODEL_FILES = ("config.json", "*.safetensors", "layout.json", "tokenizer*", "*.model", "*.bin", "*.pt")
CHUNK = 1 << 24


def run_id(recipe: Recipe) -> str:
    """Hex SHA-256 identifying what `recipe` computes (see the module doc)."""
    # values left at their defaults are left out: a field added to the schema later (with a
    # default that keeps the old behaviour) must not change the id of every finished run
    resolved = {k: v for k, v in recipe.model_dump(mode="json", exclude_defaults=True).items() if k not in NOT_IDENTITY}
    identity = {"recipe": resolved, "model": model_fingerprint(recipe), "data": data_fingerprints(recipe)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def finished(output_dir: Path, recipe: Recipe) -> bool:
    """output_dir holds a finished run of exactly this recipe on these files."""
    return recorded_id(output_dir) == run_id(recipe)


def recorded_id(output_dir: Path) -> str | None:
    """The run_id in a finished run's metadata.json; None when there is none (or no run)."""
    meta = Path(output_dir) / "metadata.json"
    if not (meta.is_file() and (Path(output_dir) / "results.json").is_file()):
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


def model_fingerprint(recipe: Recipe) -> dict:
    m = recipe.model
    kind, path = locate(m.source, m.allow_pickle)
    if path is None:  # a hub id: its revision is its identity
        return {"hub": m.source, "revision": m.revision}
    files = [path] if path.is_file() else sorted({f for pattern in MODEL_FILES for f in path.glob(pattern) if f.is_file()})
    return {"kind": kind, "files": {f.name: file_hash(f) for f in files}}


def data_fingerprints(recipe: Recipe) -> dict:
    out = {}
    for role, cfg in recipe.data_roles().items():
        out[role] = source_fingerprint(cfg.source, f"data.{role}.source")
    e = recipe.eval
    for task in e.tasks:
        if task in DATA_FILES:
            path = Path(e.tasks_dir) / DATA_FILES[task]
            out[f"task {task}"] = file_hash(path) if path.is_file() else "missing"  # the run itself says so
        else:  # a standard lm-eval task, read from its own dataset
            out[f"task {task}"] = "lm-eval"
    return out


def source_fingerprint(source: str, where: str) -> str:
    if source in BUILTIN_SOURCES or source in DATASET_SOURCES:
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise CompressError(f"{where}: {path} not found")
    return file_hash(path)


def file_hash(path: Path) -> str:
    stat = path.stat()
    return _hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: the cache key
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
