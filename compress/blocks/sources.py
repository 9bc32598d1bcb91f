"""Models bigger than memory: decoder blocks stay on disk and are materialised one at a time.

`model.stream: true` builds the model's skeleton with every parameter on the meta device (buffers
such as rotary frequencies are real: they are computed, not stored), materialises once what is
outside the decoder blocks (embeddings, final norm, head), and gives the model a BlockStore. The
block loop (compress/blocks/runner.py `sequential`) asks the store for block i before its calibration
pass and hands it back afterwards: a changed block is written to the staging folder as its own
safetensors file, then its parameters go back to meta. Peak memory is one block + the resident
embeddings/head + the calibration activations, whatever the number of blocks.

The store (compress/blocks/store.py StreamedBlocks) keeps each stage's version of a block as its own
file, checkpoints passes so that a killed run resumes, and runs the beta search's trials as
streamed passes writing their own files: the block loop, the stages and the engine use it as they
use a resident model's store.

Sources: an HF folder of safetensors (memory-mapped, read tensor by tensor) or a GGUF file
(memory-mapped, each tensor dequantised when it is read). Hub ids are not streamed: download first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from compress.algorithms.ggml_formats import GRIDS_FILE
from compress.blocks.store import StreamedBlocks
from compress.errors import CompressError
from compress.model import layout
from compress.model.anatomy import block_prefix, check_supported, head_dim
from compress.model.gguf_file import unpermute_rows
from compress.model.load import locate
from compress.model.modules import rebuild

log = logging.getLogger("compress")

STREAMED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # final norm at model.model.norm, plain head


class WeightSource:
    """Tensor name -> file of an HF folder's safetensors (or of a compress.layout folder's);
    tensors read one at a time (mmap)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = next((f for f in (self.folder / "model.safetensors.index.json", self.folder / layout.INDEX_FILE) if f.is_file()), None)
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                if f.name == GRIDS_FILE:  # block-format parameters beside the weights, not weights
                    continue
                with safe_open(f, "pt") as handle:
                    self.files.update({name: f for name in handle.keys()})
        if not self.files:
            raise CompressError(f"model.source: {self.folder} holds no safetensors weights to stream")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CompressError(f"model.source: {self.folder} has no tensor {name}")
        with safe_open(self.files[name], "pt") as handle:
            return handle.get_tensor(name)


# HF model_type -> (llama.cpp architecture, q/k rows interleaved for llama's rope): the GGUF files
# a streamed run reads tensor by tensor, undoing what llama.cpp's converter did to them (whole-file
# loads go through transformers, which knows every family).
GGUF_READ = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
ROPE_ROWS = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")


class GgufWeightSource:
    """HF tensor name -> a GGUF file's tensor, dequantised one at a time from the memory-mapped file
    (with gguf's own dequantisers, as transformers does when it loads the whole file), q/k rows
    put back from llama.cpp's interleaved rope order into Hugging Face's."""

    def __init__(self, path: Path, model):

        self.folder = Path(path)
        config = model.config
        if config.model_type not in GGUF_READ:
            raise CompressError(f"model.stream: streaming a GGUF file reads {', '.join(GGUF_READ)} models; {path} is {config.model_type}")
        arch, self.permute = GGUF_READ[config.model_type]
        self.head_dim = head_dim(config)
        reader = gguf.GGUFReader(path)  # memory-mapped: nothing is read until a tensor's data is touched
        tensors = {t.name: t for t in reader.tensors}
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
        self.files = {}  # hf name -> the file's tensor (named like WeightSource's map)
        for hf_name, _ in model.named_parameters(remove_duplicate=False):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name in tensors:
                self.files[hf_name] = tensors[gguf_name]

    def get(self, name: str) -> torch.Tensor:

        if name not in self.files:
            raise CompressError(f"model.source: {self.folder} has no tensor for {name}")
        t = self.files[name]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if self.permute and name.endswith(ROPE_ROWS):  # head by head, as the exporter permuted them
            w = unpermute_rows(w, w.shape[0] // self.head_dim)
        return w


def load_streamed(source: str, dtype: torch.dtype, staging: Path):
    """(model, tokenizer, folder) with blocks on meta and a BlockStore attached."""

    kind, path = locate(source)
    if kind == "hub":
        raise CompressError(f"model.stream: streams a local HF folder of safetensors or a GGUF file; {source} is a hub id. "
                            "Download it to a folder first")
    gguf_file = {"gguf_file": path.name} if kind != "folder" else {}  # a GGUF file, or the registered default model's
    folder = path.parent if gguf_file else path
    config = AutoConfig.from_pretrained(folder, **gguf_file)
    if config.model_type not in STREAMED_FAMILIES:
        raise CompressError(f"model.stream: {config.model_type} is not streamed yet (streamed: {', '.join(STREAMED_FAMILIES)})")
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not gguf_file and layout.is_layout_folder(folder):  # a restructured model (an earlier run's export)
        rebuild(model, layout.read(folder))
    if not gguf_file:
        model.generation_config = generation_config(folder)
    check_supported(model)
    model.eval()
    weights = GgufWeightSource(path, model) if gguf_file else WeightSource(path)
    prefix = block_prefix(model) + "."
    tied = set()
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is model.get_output_embeddings().weight}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix) or (name in tied and name not in weights.files):
            continue
        set_module_tensor_to_device(model, name, "cpu", value=weights.get(name).to(dtype))
    if tied:
        model.tie_weights()
    model.block_store = StreamedBlocks(model, weights, staging, dtype)
    return model, AutoTokenizer.from_pretrained(folder, **gguf_file), path


def generation_config(folder: Path):
    """The folder's generation config as from_pretrained reads it (its file, else config.json's
    generation fields), so that a streamed run's export writes the in-memory run's file: the one
    from_config builds also lists output_attentions / output_hidden_states."""
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)
