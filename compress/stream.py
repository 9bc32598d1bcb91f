"""Models bigger than memory: decoder blocks stay on disk and are materialised one at a time.

`model.stream: true` builds the model's skeleton with every parameter on the meta device (buffers
such as rotary frequencies are real: they are computed, not stored), materialises once what is
outside the decoder blocks (embeddings, final norm, head), and gives the model a BlockStore. The
block loop (compress/calibrate.py `sequential`) asks the store for block i before its calibration
pass and hands it back afterwards: a changed block is written to the staging folder as its own
safetensors file, then its parameters go back to meta. Peak memory is one block + the resident
embeddings/head + the calibration activations, whatever the number of blocks.

Versions: a stage k writes its blocks to `<staging>/.blocks/stage<k>/`; a block is read from the
newest version of an earlier stage (or from the source folder), never from the running stage's
own file, so a block half-way through a pass is always recomputed from its input weights.

Resume: after every block of a pass, the store writes a checkpoint (the block's new file first,
then the propagated activations and the index of the next block). A run killed at any point and
started again on the same recipe (same run_id, hence the same staging folder) skips the finished
stages and blocks, and produces the same files as a run that was never interrupted.

Beta search (`beta: auto`): each trial is a streamed pass from the stage's input versions, which
no trial changes (so no copy of the weights is spilled or restored), writing its own block files
beside them, then a streamed validation pass over those; the winner's files become the stage's.
A run killed during a search starts that stage's search again.

Sources: an HF folder of safetensors (memory-mapped, read tensor by tensor) or a GGUF file
(memory-mapped, each tensor dequantised when it is read). Hub ids are not streamed: download first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.tokenizer_files import save_tokenizer

log = logging.getLogger("compress")

STREAMED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # final norm at model.model.norm, plain head
KILL_AFTER = "COMPRESS_KILL_AFTER_BLOCK"  # "<stage>:<block>": SIGKILL after that block's checkpoint (tests)


class WeightSource:
    """Tensor name -> file of an HF folder's safetensors; tensors read one at a time (mmap)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(self.folder.glob("*.safetensors")):
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
        import gguf

        from compress.export.gguf_arch import head_dim

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
        import gguf

        from compress.export.gguf_arch import unpermute_rows

        if name not in self.files:
            raise CompressError(f"model.source: {self.folder} has no tensor for {name}")
        t = self.files[name]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if self.permute and name.endswith(ROPE_ROWS):  # head by head, as the exporter permuted them
            w = unpermute_rows(w, w.shape[0] // self.head_dim)
        return w


class BlockStore:
    """Where each decoder block's current weights are, and the one block in memory."""

    def __init__(self, model, source: WeightSource, staging: Path, dtype: torch.dtype):
        from compress.model import block_prefix, decoder_blocks

        self.model, self.source, self.dtype = model, source, dtype
        self.root = Path(staging) / ".blocks"
        self.prefix = block_prefix(model)
        self.blocks = decoder_blocks(model)
        self.stage = 0  # the running stage: its writes go to stage<k>/
        self.passes = 0  # sequential passes begun in this stage (a checkpoint names its pass)
        self.trial: int | None = None  # a beta-search trial: writes go to stage<k>/trial<t>/, and reads find them
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ versions

    def path(self, stage: int, i: int, trial: int | None = None) -> Path:
        folder = self.root / f"stage{stage}"
        return (folder if trial is None else folder / f"trial{trial}") / f"block{i:05d}.safetensors"

    def newest(self, i: int, before: int | None = None) -> Path | None:
        """The newest file of block i written by a stage before `before` (default: the running one)."""
        before = self.stage if before is None else before
        for k in range(before - 1, -1, -1):
            if self.path(k, i).is_file():
                return self.path(k, i)
        return None

    def final(self, i: int) -> Path | None:
        """The block's weights after every stage so far (None: the source's)."""
        return self.newest(i, before=self.stage + 1)

    def begin_stage(self, k: int) -> None:
        self.stage, self.passes = k, 0
        (self.root / f"stage{k}").mkdir(parents=True, exist_ok=True)
        if self.stage_done(k):
            self.stage = k + 1

    def end_stage(self, k: int, record: dict) -> None:
        """The stage's record, then its done mark; older versions of the blocks it rewrote go."""
        (self.root / f"stage{k}.record.json").write_text(json.dumps(record))
        (self.root / f"stage{k}.done").write_text("done\n")
        for i in range(len(self.blocks)):
            if self.path(k, i).is_file():
                for j in range(k):
                    self.path(j, i).unlink(missing_ok=True)
        self.stage = k + 1  # what follows (evaluation, export, the next stage) reads stage k's blocks

    def stage_done(self, k: int) -> bool:
        return (self.root / f"stage{k}.done").is_file()

    def record(self, k: int) -> dict:
        return json.loads((self.root / f"stage{k}.record.json").read_text())

    # ------------------------------------------------------------ one block in memory

    def _names(self, i: int) -> list[str]:
        return [f"{self.prefix}.{i}.{name}" for name, _ in self.blocks[i].named_parameters(recurse=True)]

    def load(self, i: int, final: bool = False) -> None:
        from accelerate.utils import set_module_tensor_to_device

        staged = self.final(i) if final else self.newest(i)
        if self.trial is not None and self.path(self.stage, i, self.trial).is_file():
            staged = self.path(self.stage, i, self.trial)  # the running trial's own version
        handle = safe_open(staged, "pt") if staged is not None else None
        for name in self._names(i):
            tensor = handle.get_tensor(name) if handle is not None else self.source.get(name)
            set_module_tensor_to_device(self.model, name, "cpu", value=tensor.to(self.dtype))

    def save(self, i: int) -> None:
        """Block i's current weights as the running stage's version (atomic: a kill never leaves
        half a file under the final name)."""
        tensors = {f"{self.prefix}.{i}.{n}": p.detach().contiguous() for n, p in self.blocks[i].named_parameters(recurse=True)}
        path = self.path(self.stage, i, self.trial)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def unload(self, i: int) -> None:
        self.blocks[i].to("meta")

    @contextmanager
    def loaded(self, i: int, final: bool = False):
        """Block i in memory for the body; if the body sets `state["changed"]`, it is saved."""
        self.load(i, final)
        state = {"changed": False}
        try:
            yield state
            if state["changed"]:
                self.save(i)
        finally:
            self.unload(i)

    def each(self, final: bool = True):
        """(i, block) with each block materialised in turn (read only)."""
        for i, block in enumerate(self.blocks):
            with self.loaded(i, final):
                yield i, block

    # ------------------------------------------------------------ beta-search trials

    def begin_trial(self, t: int) -> None:
        """Trial t compresses every block from the stage's input versions (on disk, untouched by
        other trials: no restore needed) and writes its own versions beside them."""
        shutil.rmtree(self.root / f"stage{self.stage}" / f"trial{t}", ignore_errors=True)
        self.trial = t

    def end_trial(self) -> None:
        self.trial = None

    def adopt_trial(self, t: int) -> None:
        """The chosen trial's blocks become the stage's; the other trials' files go."""
        folder = self.root / f"stage{self.stage}"
        for f in (folder / f"trial{t}").glob("block*.safetensors"):
            os.replace(f, folder / f.name)
        for trial in folder.glob("trial*"):
            shutil.rmtree(trial, ignore_errors=True)

    # ------------------------------------------------------------ checkpoints (resume)

    def _ckpt(self) -> Path:
        return self.root / f"stage{self.stage}.pass{self.passes}.pt"

    def begin_pass(self) -> tuple[int, list[torch.Tensor] | None]:
        """(first block to run, propagated activations into it) for the next pass of this stage:
        (0, None) unless a checkpoint of this pass is on disk (a run that was killed)."""
        self.passes += 1
        if self.trial is not None:
            return 0, None  # a search killed half way starts again (its trials are not checkpointed)
        path = self._ckpt()
        if not path.is_file():
            return 0, None
        state = torch.load(path, weights_only=True)
        start = state["next"]
        for i in range(start, len(self.blocks)):  # written after the checkpoint: recomputed
            self.path(self.stage, i).unlink(missing_ok=True)
        log.info("resuming stage %d pass %d at block %d", self.stage, self.passes, start)
        return start, state["hidden"]

    def checkpoint(self, next_block: int, hidden: list[torch.Tensor] | None) -> None:
        if self.trial is not None:
            return
        path = self._ckpt()
        tmp = path.with_suffix(".tmp")
        cpu = None if hidden is None else [h.cpu() for h in hidden]  # a no-op on CPU; GPU activations resume anywhere
        torch.save({"next": next_block, "hidden": cpu}, tmp)
        os.replace(tmp, path)
        # fault injection for the resume tests and benchmark: die as `kill -9` would, right here
        if os.environ.get(KILL_AFTER) == f"{self.stage}:{next_block - 1}":
            os.kill(os.getpid(), signal.SIGKILL)


def store_of(model) -> BlockStore | None:
    return getattr(model, "block_store", None)


def load_streamed(source: str, dtype: torch.dtype, staging: Path):
    """(model, tokenizer, folder) with blocks on meta and a BlockStore attached."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compress.model import block_prefix, check_supported, locate

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
    model.block_store = BlockStore(model, weights, staging, dtype)
    return model, AutoTokenizer.from_pretrained(folder, **gguf_file), path


# ---------------------------------------------------------------- evaluation and export


def save_hf(model, tokenizer, dest: Path) -> dict:
    """The model as sharded safetensors, one shard per block (each block's newest file is copied
    as it is) plus one for the rest: the model is never whole in memory."""
    store = store_of(model)
    dest.mkdir(parents=True, exist_ok=True)
    n = len(store.blocks) + 1
    weight_map, files = {}, []
    rest = {name: p.detach().contiguous() for name, p in model.named_parameters() if not name.startswith(store.prefix + ".")}
    first = f"model-00001-of-{n:05d}.safetensors"
    save_file(rest, str(dest / first), metadata={"format": "pt"})
    weight_map.update({name: first for name in rest})
    files.append(first)
    for i in range(len(store.blocks)):
        name = f"model-{i + 2:05d}-of-{n:05d}.safetensors"
        staged = store.final(i)
        if staged is not None:  # a hard link where it can (the staged copy is deleted after the export): no second copy on disk
            try:
                os.link(staged, dest / name)
            except OSError:
                shutil.copyfile(staged, dest / name)
        else:
            with store.loaded(i):
                save_file({f"{store.prefix}.{i}.{k}": p.detach().contiguous() for k, p in store.blocks[i].named_parameters()},
                          str(dest / name), metadata={"format": "pt"})
        with safe_open(dest / name, "pt") as handle:
            weight_map.update({key: name for key in handle.keys()})
        files.append(name)
    total = sum((dest / f).stat().st_size for f in files)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    model.config.save_pretrained(dest)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    save_tokenizer(tokenizer, dest)
    return {"format": "dense", "files": files, "streamed": True}


def check_hf(model, dest: Path) -> dict:
    """Every block tensor in the export equals the block's final version bit for bit (read one
    block at a time); the model is too big to reload whole in transformers here."""
    store = store_of(model)
    exported = WeightSource(dest)
    checked = 0
    for i, block in store.each(final=True):
        for name, p in block.named_parameters():
            full = f"{store.prefix}.{i}.{name}"
            if not torch.equal(exported.get(full).to(p.dtype), p.detach()):
                raise CompressError(f"export check failed: {full} in {dest} differs from the compressed block")
            checked += 1
    return {"weights": {"tensors": checked, "identical": True},
            "parity": {"checked": False, "reason": "streamed run: the export's tensors are compared with the compressed blocks bit for bit, not reloaded whole"}}
