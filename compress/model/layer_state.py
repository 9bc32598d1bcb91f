"""What a quantised Linear carries besides its weight, as named tensors and a line of JSON, so
that a block file on disk (compress/blocks/store.py) brings a block back with it: the integer grid
(`quant_state`: QuantState), the llama.cpp block format (`quant_state`: GgufState) or the
bitsandbytes format (`bnb_format`). The exporters pack these; without them a resumed or streamed
run could not write its GPTQ / GGUF grid files.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from compress.algorithms import ggml_formats
from compress.algorithms.ggml_formats import GgufState
from compress.algorithms.quant import Grid, QuantState

KEY = "layer_states"  # the safetensors metadata entry: {module name: description}


def block_states(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) describing every module's state; names are prefixed by the
    module's full name and `.quant_state.` (never a parameter name)."""
    tensors, described = {}, {}
    for name, module in modules.items():
        state, prefix = getattr(module, "quant_state", None), f"{name}.quant_state"
        if isinstance(state, QuantState):
            g = state.grid
            described[name] = {"grid": [g.bits, g.group_size, g.sym]}
            tensors.update({f"{prefix}.scales": state.scales, f"{prefix}.zeros": state.zeros, f"{prefix}.g_idx": state.g_idx})
        elif isinstance(state, GgufState):
            described[name] = {"format": state.fmt.name, **({"file_type": state.file_type} if state.file_type else {})}
            tensors.update(ggml_formats.state_tensors(prefix, state))
        elif getattr(module, "bnb_format", None) is not None:
            described[name] = {"bnb": module.bnb_format}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return tensors, ({KEY: json.dumps(described)} if described else {})


def restore_states(modules: dict[str, nn.Module], metadata: dict | None, keys, read) -> None:
    """Give each module the state block_states described; keys: the stored tensors' names,
    read(name) one of them."""
    for name, desc in json.loads((metadata or {}).get(KEY, "{}")).items():
        module, prefix = modules[name], f"{name}.quant_state"
        if "grid" in desc:
            bits, group_size, sym = desc["grid"]
            module.quant_state = QuantState(Grid(bits, group_size, sym), read(f"{prefix}.scales"), read(f"{prefix}.zeros"), read(f"{prefix}.g_idx"))
        elif "format" in desc:
            fields = {f: read(f"{prefix}.{f}") for f in ggml_formats.STATE_FIELDS if f"{prefix}.{f}" in keys}
            module.quant_state = GgufState(ggml_formats.FORMATS[desc["format"]], **fields, file_type=desc.get("file_type"))
        else:
            module.bnb_format = desc["bnb"]

