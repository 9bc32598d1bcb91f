"""Modules whose shape differs from what the model's config builds, and how a saved folder says so.

The low-rank stage replaces a Linear by two thin ones (LowRankLinear); the structured stage makes
projections narrower, by a different amount in every block. A Hugging Face config holds one width
for all blocks, so neither model can be rebuilt from config.json alone. `describe` lists every
module that differs from the config's skeleton (type, in/out features, rank, bias); exports write
that list as layout.json beside config.json, and `rebuild` gives a freshly built model those
modules before its weights are loaded. The attention code of the supported families reshapes with
-1 heads, so narrower q/k/v/o projections are all a block needs to run with fewer heads.

Weights of such a folder go into model.layout.safetensors, not model.safetensors: transformers
would otherwise load the low-rank keys as "missing" and fill the projections with random numbers.
A streamed model's folder is sharded the same way: model.layout-00001-of-N.safetensors ... with
model.layout.safetensors.index.json (one shard per block: its block file, hard-linked).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from compress.errors import CompressError
from compress.model import tensor_files
from compress.model.anatomy import skeleton
from compress.model.modules import LowRankLinear, rebuild, spec_of
from compress.model.tensor_files import unique_tensors
from compress.model.tokenizer_files import save_tokenizer

LAYOUT_FILE = "layout.json"
WEIGHTS_FILE = "model.layout.safetensors"
SHARD_STEM = "model.layout"  # shards: model.layout-00001-of-N.safetensors, index model.layout.safetensors.index.json
INDEX_FILE = WEIGHTS_FILE + ".index.json"
FORMAT = "atp-layout-v1"


def describe(model: nn.Module) -> dict[str, dict]:
    """{module name: spec} for every module that differs from what model.config builds."""
    reference = dict(skeleton(model.config).named_modules())
    layout: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            layout[name] = spec_of(module)
        elif type(module) is nn.Linear and isinstance(reference.get(name), nn.Linear):
            if spec_of(module) != spec_of(reference[name]):
                layout[name] = spec_of(module)
    return layout


def write(folder: Path, layout: dict[str, dict]) -> None:
    text = json.dumps({"format": FORMAT, "modules": layout}, indent=1) + "\n"
    (folder / LAYOUT_FILE).write_text(text, encoding="utf-8")


def read(folder: Path) -> dict[str, dict]:
    """The folder's layout ({} when it has none)."""
    path = folder / LAYOUT_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CompressError(f"{path}: not readable JSON ({err})") from None
    if data.get("format") != FORMAT or not isinstance(data.get("modules"), dict):
        raise CompressError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return data["modules"]


def is_layout_folder(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file()


def weight_files(folder: Path) -> list[Path]:
    """The folder's weights files: model.layout.safetensors, or the shards its index names."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return [folder / WEIGHTS_FILE]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise CompressError(f"{index}: not a safetensors index ({err})") from None
    return [folder / name for name in sorted(set(weight_map.values()))]


def save(model, tokenizer, folder: Path, layout: dict[str, dict]) -> None:
    """Dense weights of a restructured model: model.layout.safetensors + layout.json + config."""
    tensors, _ = unique_tensors(model)
    # safetensors' save_file orders the metadata as a hash map does: the same model gave different bytes
    tensor_files.save({k: t.detach().cpu() for k, t in tensors.items()}, folder / WEIGHTS_FILE, {"format": "pt", "atp_compress": FORMAT})
    write(folder, layout)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)


def from_config(folder: Path, dtype: torch.dtype):
    """The folder's model built from config.json and layout.json, weights not yet loaded."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    rebuild(model, read(folder))
    return model


def load_state(model, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Load a full state dict (tied copies may be absent) and re-tie; a mismatch names the folder."""
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {name for name, _ in model.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CompressError(f"{folder}: the weights do not fit the model's config and layout ({str(err).splitlines()[0]})") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CompressError(f"{folder}: the weights do not fit the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()


def load(folder: Path, dtype: torch.dtype | None = None):
    """The model of a folder written by `save`, bit-identical to the one saved."""
    state = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    stored = next(iter(state.values())).dtype
    model = from_config(folder, stored)
    load_state(model, state, folder)
    if dtype is not None and dtype != stored:
        model = model.to(dtype)
    return model.eval()
