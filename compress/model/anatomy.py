"""A model's anatomy, the same questions for every supported family: where its decoder blocks
are, which Linear layers they hold and how to read and write their weights, which layers a
stage's targets / ignore select, its context length and head size. One row per model_type in
BLOCK_PATHS; a block's Linears are found by type."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from compress.errors import CompressError

# model_type -> attribute path of the decoder blocks (an nn.ModuleList).
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


def model_type(model: PreTrainedModel) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def check_supported(model: PreTrainedModel) -> None:
    if model_type(model) not in BLOCK_PATHS:
        raise CompressError(
            f"unsupported architecture '{model_type(model)}' ({type(model).__name__}); "
            f"supported: {', '.join(sorted(BLOCK_PATHS))}"
        )


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    check_supported(model)
    blocks = model.get_submodule(BLOCK_PATHS[model_type(model)])
    assert isinstance(blocks, nn.ModuleList), f"{BLOCK_PATHS[model_type(model)]} is not a ModuleList"
    return blocks


def block_prefix(model: PreTrainedModel) -> str:
    return BLOCK_PATHS[model_type(model)]


def outside_blocks(model) -> dict[str, torch.Tensor]:
    """The model's tensors outside its decoder blocks (embeddings, final norm, head); a tensor
    held twice (a head tied to the embeddings) is kept under its first name only, as
    save_pretrained keeps it."""
    out, seen, prefix = {}, set(), block_prefix(model) + "."
    for name, t in model.state_dict().items():
        if name.startswith(prefix) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers of one block by name relative to the block, in registration order."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view. GPT-2's Conv1D stores (in, out), hence the transpose."""
    W = module.weight.data
    return W.t() if isinstance(module, Conv1D) else W


def weight_count(modules) -> int:
    """Weights of these Linear layers (biases not counted): what allocations weigh blocks by and
    the size table counts."""
    return sum(get_weight(m).numel() for m in modules)


def block_weight_counts(layers: list[dict[str, nn.Module]]) -> torch.Tensor:
    """Weights per block of the selected Linears (float): what size-weighted allocations weigh by."""
    return torch.tensor([float(weight_count(block.values())) for block in layers])


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an (out, in) matrix back in the module's own layout and dtype."""
    target = get_weight(module)
    assert target.shape == W.shape, f"shape {tuple(W.shape)} != {tuple(target.shape)}"
    target.copy_(W.to(target.dtype))


def in_features(module: nn.Module) -> int:
    return get_weight(module).shape[1]


def skeleton(config, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model built from its config on the meta device: every name and shape, no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_supported(model)
    return model


def context_length(config) -> int | None:
    """Longest sequence the model was built for (max_position_embeddings; GPT-2's n_positions)."""
    config = getattr(config, "text_config", None) or config  # multimodal wrappers (gemma3)
    return getattr(config, "max_position_embeddings", None)


def select_linears(
    model: nn.Module, targets: list[str], ignore: list[str], stage_key: str
) -> tuple[list[dict[str, nn.Module]], list[str]]:
    """Per block, the Linears whose full name matches a `targets` regex and no `ignore` regex;
    and the names left out. Selecting nothing at all is an error naming the stage."""
    prefix = block_prefix(model)
    chosen, skipped = [], []
    for i, block in enumerate(decoder_blocks(model)):
        layers = {}
        for rel, module in block_linears(block).items():
            name = f"{prefix}.{i}.{rel}"
            if any(re.search(t, name) for t in targets) and not any(re.search(x, name) for x in ignore):
                layers[name] = module
            else:
                skipped.append(name)
        chosen.append(layers)
    if not any(chosen):
        example = skipped[0] if skipped else f"{prefix}.0.<linear>"
        raise CompressError(f"{stage_key}.targets/ignore select no Linear layer (names look like '{example}')")
    return chosen, skipped


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
