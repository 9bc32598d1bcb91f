"""Where the decoder blocks' weights are during a run, behind one interface, so that neither the
engine nor a stage asks whether the model is streamed.

    ResidentBlocks   every block stays in memory (model.stream: false)
    StreamedBlocks   blocks on the meta device, each read from disk for its turn (model.stream: true)

What the callers use:
    store.loaded(i) -> state   block i in memory for the body; setting state["changed"] keeps the change
    store.each()               (i, block) for every block in turn, read only
    begin_stage / end_stage / stage_done / record   the engine's stage loop (finished stages are skipped)
    begin_pass / checkpoint    the block loop (compress/calibrate.py): where a killed pass resumes
    trials(...)                the beta search's trials (compress/search.py)
    resident                   whether the whole model can run one plain forward pass

Both keep the same files in <staging>/.blocks, so that every run resumes after a SIGKILL:
    stage<k>/block<i>.safetensors   block i's weights as stage k left it, under the model's
                                    parameter names: an HF shard, which the HF and GGUF exports of
                                    a streamed model hard-link instead of copying
    stage<k>/block<i>.states.safetensors   its Linears' quantisation states (compress/layer_state.py)
                                    and, in its metadata, the block's counts for the size table and
                                    its layout (every projection's shape: low-rank, narrowed);
                                    written before the weights, so a weights file never stands
                                    without its states
    stage<k>.pass<p>.pt             a pass's checkpoint: the next block and its input activations
    stage<k>.record.json, .done     a finished stage
A block is read from the newest version of an earlier stage (or from the source), never from the
running stage's own file, so a block half-way through a pass is always recomputed from its input.
A streamed store writes a block as soon as a pass changed it (it is about to leave memory); a
resident one writes its changed blocks when it checkpoints, and at the end of a stage. Checkpoints
are taken at most every CHECKPOINT_SECONDS (each holds one block's input activations, which for
large calibration sets is hundreds of MB), so resuming repeats at most that much work.

Stages that change the blocks' layout (structured, low-rank) turn each block into its final form
with a `finish` function once the block's outputs are propagated, in the pass (sequential calls
it), so that a block's file holds its final modules and their layout; a resident store's
beta-search trials are the exception: a trial restores the weights of the modules it began with,
so the blocks are finished after the search (store.finish). A block read from a file takes the
file's layout first (reshape): a streamed skeleton's modules on meta, at each load and for every
block at the stage boundaries; a resident model's when a resumed run reads its finished blocks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from compress.algorithms.quant import stored_bits
from compress.blocks.spill import WeightFile, ZeroMask, scratch_folder
from compress.model import layer_state, tensor_files
from compress.model.anatomy import block_linears, block_prefix, decoder_blocks
from compress.model.modules import LowRankLinear, rebuild, spec_of

log = logging.getLogger("compress")

KILL_AFTER = "COMPRESS_KILL_AFTER_BLOCK"  # "<stage>:<block>": SIGKILL after that block's checkpoint (tests)
CHECKPOINT_SECONDS = float(os.environ.get("COMPRESS_CHECKPOINT_SECONDS", 60))


def states_path(path: Path) -> Path:
    """The layer-states file beside a block's weights file."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".states.safetensors")


def remove(path: Path) -> None:
    """A block version: its states first, so that a weights file never stands without them."""
    states_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


COUNTS = "block_counts"  # a block file's metadata entry: block_counts() of the block it holds


def written(path: Path | None, entry: str):
    """An entry of a block file's states metadata (COUNTS, LAYOUT), None where it has none."""
    if path is None or not states_path(path).is_file():
        return None
    with safe_open(states_path(path), "pt") as handle:
        value = (handle.metadata() or {}).get(entry)
    return None if value is None else json.loads(value)


def block_counts(block) -> dict:
    """What the run's size table counts in a block: its nonzero parameters, and its Linears'
    weights, exact zeros and stored bits (compress/quant.py: stored_bits)."""
    modules = list(block_linears(block).values())
    return {
        "nonzero": sum(int(torch.count_nonzero(p)) for p in block.parameters()),  # (p != 0).sum() would copy to int64
        "weights": sum(m.weight.numel() for m in modules),
        "zeros": sum(m.weight.numel() - int(torch.count_nonzero(m.weight)) for m in modules),
        "bits": sum(stored_bits(m) for m in modules),
    }


LAYOUT = "block_layout"  # a states file's metadata entry: block_specs() of the block it holds


def block_specs(block) -> dict[str, dict]:
    """{module name in the block: compress.layout spec} of its projections: every Linear, or
    LowRankLinear as one (not the Linears inside it)."""

    specs, inside = {}, ()
    for name, module in block.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LowRankLinear):
            specs[name], inside = spec_of(module), name + "."
        elif isinstance(module, nn.Linear):
            specs[name] = spec_of(module)
    return specs


class BlockStore:
    """The versions, checkpoints and stage records both kinds of store keep on disk."""

    resident = True

    def __init__(self, model, staging: Path | None):
        # weakly: the model is freed before the exports are reloaded, and the engine still holds its store
        self._model = weakref.ref(model)
        self.root = None if staging is None else Path(staging) / ".blocks"  # None: nothing kept on disk (library use)
        self.prefix = block_prefix(model)
        self.count = len(decoder_blocks(model))
        self.stage = 0  # the running stage: its writes go to stage<k>/
        self.passes = 0  # sequential passes begun in this stage (a checkpoint names its pass)
        self.trial: int | None = None  # a beta-search trial runs: nothing is checkpointed
        self.last_checkpoint = time.monotonic()
        self.source_specs = [block_specs(b) for b in self.blocks]  # the layout of the source's blocks (config.json's)
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    @property
    def model(self):
        return self._model()

    @property
    def blocks(self):
        return decoder_blocks(self.model)

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

    def write(self, i: int, path: Path) -> None:
        """Block i's layer states and counts (states_path), then its weights, to `path`, each file
        atomically (a kill never leaves half a file under the final name)."""
        block = self.blocks[i]
        tensors = {f"{self.prefix}.{i}.{n}": p for n, p in block.named_parameters()}
        modules = {f"{self.prefix}.{i}.{n}": m for n, m in block.named_modules() if n}
        states, metadata = layer_state.block_states(modules)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor_files.save(states, states_path(path), {"format": "pt", COUNTS: json.dumps(block_counts(block)),
                                                      LAYOUT: json.dumps(block_specs(block)), **metadata})
        tensor_files.save(tensors, path, {"format": "pt"})

    def read(self, i: int, path: Path) -> None:
        """Block i's weights and layer states from `path`."""
        with safe_open(path, "pt") as handle:
            for name in self.names(i):
                self.put(name, handle.get_tensor(name))
        if states_path(path).is_file():
            modules = {f"{self.prefix}.{i}.{n}": m for n, m in self.blocks[i].named_modules() if n}
            with safe_open(states_path(path), "pt") as handle:
                layer_state.restore_states(modules, handle.metadata(), set(handle.keys()), handle.get_tensor)

    def counts(self, i: int) -> dict:
        """block_counts() of block i as every stage so far left it; a streamed block that has a
        file is not read for it: the file beside it says (counted when it was written)."""
        path = self.final(i) if self.root is not None and not self.resident else None
        counted = written(path, COUNTS)
        if counted is not None:
            return counted
        with self.loaded(i, final=True):
            return block_counts(self.blocks[i])

    def names(self, i: int) -> list[str]:
        return [f"{self.prefix}.{i}.{name}" for name, _ in self.blocks[i].named_parameters()]

    def reshape(self, i: int, path: Path | None) -> None:
        """Block i's modules rebuilt (uninitialised) where they differ from the layout of the block
        file `path` (None: the source's), so that its tensors fit them."""
        target = written(path, LAYOUT) or self.source_specs[i]
        current = block_specs(self.blocks[i])
        rebuild(self.blocks[i], {name: spec for name, spec in target.items() if current.get(name) != spec})

    # ------------------------------------------------------------ stages

    def begin_stage(self, k: int) -> None:
        self.stage, self.passes = k, 0
        if self.stage_done(k):
            self.stage = k + 1
            return
        if self.root is not None:
            (self.root / f"stage{k}").mkdir(parents=True, exist_ok=True)

    def end_stage(self, k: int, record: dict) -> None:
        """The stage's record, then its done mark; older versions of the blocks it rewrote go."""
        if self.root is None:
            self.stage = k + 1
            return
        (self.root / f"stage{k}.record.json").write_text(json.dumps(record))
        (self.root / f"stage{k}.done").write_text("done\n")
        for i in range(self.count):
            if self.path(k, i).is_file():
                for j in range(k):
                    remove(self.path(j, i))
        for f in self.root.glob(f"stage{k}.pass*.pt"):
            f.unlink()
        self.stage = k + 1  # what follows (evaluation, export, the next stage) reads stage k's blocks

    def stage_done(self, k: int) -> bool:
        return self.root is not None and (self.root / f"stage{k}.done").is_file()

    def record(self, k: int) -> dict:
        return json.loads((self.root / f"stage{k}.record.json").read_text())

    def settle(self) -> None:
        """After the stage loop: the blocks as the last stage left them (resident: read back
        what finished stages of a resumed run wrote)."""

    def close(self) -> None:
        """The run is finished: its block versions and checkpoints go (the exports hold the result)."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ one block in memory

    @contextmanager
    def loaded(self, i: int, final: bool = False):
        """Block i in memory for the body; if the body sets `state["changed"]`, it is kept."""
        self.load(i, final)
        state = {"changed": False}
        try:
            yield state
            if state["changed"]:
                self.changed(i)
        finally:
            self.unload(i)

    def each(self, final: bool = True):
        """(i, block) with each block materialised in turn (read only). final: as every stage so
        far left it; False: as the running stage received it (what a stage reads before it
        compresses)."""
        for i, block in enumerate(self.blocks):
            with self.loaded(i, final):
                yield i, block

    # ------------------------------------------------------------ checkpoints (resume)

    def _ckpt(self) -> Path:
        return self.root / f"stage{self.stage}.pass{self.passes}.pt"

    def begin_pass(self, collected: dict | None = None) -> tuple[int, list[torch.Tensor] | None]:
        """(first block to run, propagated activations into it) for the next pass of this stage:
        (0, None) unless a checkpoint of this pass is on disk (a run that was killed); then
        `collected` gets what the pass had gathered up to it."""
        self.passes += 1
        self.last_checkpoint = time.monotonic()
        if self.trial is not None or self.root is None:
            return 0, None  # a search killed half way starts again (its trials are not checkpointed)
        path = self._ckpt()
        if not path.is_file():
            return 0, None
        state = torch.load(path, weights_only=True)
        start = state["next"]
        if collected is not None:
            collected.update(state.get("collected") or {})
        for i in range(start, len(self.blocks)):  # written after the checkpoint: recomputed
            remove(self.path(self.stage, i))
        self.resumed(start)
        log.info("resuming stage %d pass %d at block %d (checkpoint %s)", self.stage, self.passes, start, path.name)
        return start, state["hidden"]

    def checkpoint(self, next_block: int, hidden: list[torch.Tensor] | None, collected: dict | None = None) -> None:
        """After a block of a pass: every CHECKPOINT_SECONDS, the changed blocks and the
        activations into the next one."""
        if self.trial is not None or self.root is None:
            return
        kill = os.environ.get(KILL_AFTER) == f"{self.stage}:{next_block - 1}"
        if not kill and time.monotonic() - self.last_checkpoint < CHECKPOINT_SECONDS:
            return
        self.flush()
        path = self._ckpt()
        tmp = path.with_suffix(".tmp")
        cpu = None if hidden is None else [h.cpu() for h in hidden]  # a no-op on CPU; GPU activations resume anywhere
        torch.save({"next": next_block, "hidden": cpu, "collected": collected}, tmp)
        os.replace(tmp, path)
        self.last_checkpoint = time.monotonic()
        if kill:  # fault injection for the resume tests and benchmarks: die as `kill -9` would, right here
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------ what the two kinds do differently

    def load(self, i: int, final: bool) -> None: ...

    def unload(self, i: int) -> None: ...

    def changed(self, i: int) -> None: ...

    def flush(self) -> None:
        """Changed blocks not yet on disk are written (before a checkpoint names them done)."""

    def resumed(self, start: int) -> None:
        """A pass resumes at block `start`: the blocks before it are the running stage's files."""

    def put(self, name: str, tensor: torch.Tensor) -> None: ...

    def finish(self, i: int, block, fn) -> None:
        """Block i (changed by the running pass, its outputs propagated) into its final form:
        fn(i, block) makes it (low-rank modules, narrowed projections), before the block is written."""
        with torch.inference_mode(False), torch.no_grad():  # new modules: plain tensors, as after the pass
            fn(i, block)

    def trials(self, modules: dict, zeros_only: bool, states: tuple[str, ...], scratch: Path | None):
        """A context manager giving the beta search's trial space (SpilledTrials or FileTrials),
        its temporary files removed on exit."""
        raise NotImplementedError


class ResidentBlocks(BlockStore):
    """Every block in memory, as loaded; files only for resuming."""

    resident = True

    def __init__(self, model, staging: Path | None):
        super().__init__(model, staging)
        self.synced: list[Path | None] = [None] * self.count  # the file each block's weights equal (None: the source)
        self.dirty: set[int] = set()  # changed by the running stage, not yet on disk
        self.written: set[int] = set()  # written by the running stage
        self.deferred: dict[int, object] = {}  # trial -> its finish fn, run on every block if the trial is kept

    def finish(self, i: int, block, fn) -> None:
        """During a beta-search trial, later: the trial's spill restores the modules it began with,
        so the kept trial's blocks are finished when it is adopted (SpilledTrials.adopt)."""
        if self.trial is not None:
            self.deferred[self.trial] = fn
        else:
            super().finish(i, block, fn)

    def finish_deferred(self, trial: int | None) -> None:
        fn = self.deferred.pop(trial, None)
        self.deferred.clear()
        if fn is not None:  # fn leaves a block the pass did not change as it is
            for i, block in enumerate(self.blocks):
                super().finish(i, block, fn)

    def sync(self, before: int, blocks=None) -> None:
        """Each block's weights as the newest file of a stage before `before` holds them."""
        for i in range(self.count) if blocks is None else blocks:
            path = self.newest(i, before)
            if path is not None and path != self.synced[i]:
                self.reshape(i, path)
                self.read(i, path)
                self.synced[i] = path

    def put(self, name: str, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.model.get_parameter(name).copy_(tensor)

    def begin_stage(self, k: int) -> None:
        super().begin_stage(k)
        self.dirty.clear()
        self.written.clear()
        if self.stage == k:  # not finished before: it starts from its input versions
            self.sync(before=k)

    def resumed(self, start: int) -> None:
        self.sync(before=self.stage + 1, blocks=range(start))

    def changed(self, i: int) -> None:
        if self.trial is None:
            self.dirty.add(i)

    def flush(self) -> None:
        if self.root is None:
            self.dirty.clear()
            return
        for i in sorted(self.dirty):
            self.write(i, self.path(self.stage, i))
            self.synced[i] = self.path(self.stage, i)
            self.written.add(i)
        self.dirty.clear()

    def end_stage(self, k: int, record: dict) -> None:
        """Every block the stage may have changed outside a pass (a search's winner, a stage
        without one) is written as the stage's version before the done mark."""
        self.dirty |= set(range(self.count)) - self.written
        self.flush()
        super().end_stage(k, record)

    def settle(self) -> None:
        self.sync(before=self.stage)

    @contextmanager
    def trials(self, modules, zeros_only, states, scratch):
        with scratch_folder(scratch) as folder:
            yield SpilledTrials(self, modules, zeros_only, states, folder)


class StreamedBlocks(BlockStore):
    """Blocks on the meta device, one in memory at a time, read from the newest file or the
    source (compress/stream.py's WeightSource / GgufWeightSource)."""

    resident = False

    def __init__(self, model, source, staging: Path, dtype: torch.dtype):
        super().__init__(model, staging)
        self.source, self.dtype = source, dtype

    def put(self, name: str, tensor: torch.Tensor) -> None:
        set_module_tensor_to_device(self.model, name, "cpu", value=tensor.to(self.dtype))

    def load(self, i: int, final: bool = False) -> None:
        staged = self.final(i) if final else self.newest(i)
        if self.trial is not None and self.path(self.stage, i, self.trial).is_file():
            staged = self.path(self.stage, i, self.trial)  # the running trial's own version
        self.reshape(i, staged)
        if staged is not None:
            self.read(i, staged)
        else:
            for name in self.names(i):
                self.put(name, self.source.get(name))

    def reshape_all(self, final: bool) -> None:
        """Every block's modules as the newest files of the stages before the running one
        (final: and of the running one) lay them out."""
        for i in range(self.count):
            self.reshape(i, self.final(i) if final else self.newest(i))

    def begin_stage(self, k: int) -> None:
        super().begin_stage(k)
        self.reshape_all(final=False)  # what the stage selects its layers from: its input's layout

    def settle(self) -> None:
        self.reshape_all(final=True)

    def changed(self, i: int) -> None:
        self.write(i, self.path(self.stage, i, self.trial))  # it is about to leave memory

    def offload_index(self) -> dict:
        """accelerate's offload index ({tensor name: its safetensors file, name, dtype}) of every
        block as the stages left it: their files; a block still the source's is written once to
        <staging>/.blocks/source/ (the source may be a GGUF file, or in another dtype)."""
        index = {}
        for i in range(self.count):
            path = self.final(i)
            if path is None:
                path = self.root / "source" / f"block{i:05d}.safetensors"
                if not path.is_file():
                    with self.loaded(i):
                        self.write(i, path)
            for name in self.names(i):
                index[name] = {"safetensors_file": str(path), "weight_name": name, "dtype": str(self.dtype).removeprefix("torch.")}
        return index

    def unload(self, i: int) -> None:
        self.blocks[i].to("meta")
        for module in self.blocks[i].modules():  # the layer states are in the block's file
            for attr in ("quant_state", "bnb_format", "low_rank_factors"):
                if hasattr(module, attr):
                    delattr(module, attr)

    @contextmanager
    def trials(self, modules, zeros_only, states, scratch):
        yield FileTrials(self)


# ---------------------------------------------------------------- beta-search trials


class SpilledTrials:
    """Resident blocks: the weights every trial starts from are spilled to disk (compress/spill.py)
    and read back in place before each trial; the best trial is kept as a bit mask where the stage
    only zeroes weights, or spilled too, with the module attributes named in `states` (the
    quantisation grid; the low-rank stage's factors) held in memory."""

    def __init__(self, store: BlockStore, modules: dict, zeros_only: bool, states: tuple[str, ...], folder: Path):
        self.store, self.modules, self.zeros_only, self.states = store, modules, zeros_only, states
        self.start = WeightFile(folder / "start.bin", modules)
        self.start.save()
        self.best_weights = WeightFile(folder / "best.bin", modules)
        self.best: dict = {}
        self.ran = 0

    def begin(self, t: int) -> None:
        if self.ran:
            self.start.load()
        self.ran += 1
        self.store.trial = t

    def end(self) -> None:
        self.store.trial = None

    def keep(self, t: int) -> None:
        """Trial t (just run) is the best so far."""
        if self.zeros_only:
            self.best["mask"] = ZeroMask(self.modules)
        else:
            self.best_weights.save()
            self.best["states"] = {name: {a: getattr(m, a, None) for a in self.states} for name, m in self.modules.items()}

    def adopt(self, t: int | None) -> None:
        """The model ends with kept trial t's weights; None: with the weights the search began from."""
        if t is None or self.zeros_only:
            self.start.load()
            if t is not None:
                self.best["mask"].apply()
        else:
            self.best_weights.load()
            for name, kept in self.best["states"].items():
                for attr, state in kept.items():
                    setattr(self.modules[name], attr, state)
        self.store.finish_deferred(t)  # the kept trial's blocks, written at the stage's end


class FileTrials:
    """Streamed blocks: each trial reads the stage's input blocks from disk (no trial changes
    them, so nothing is spilled or restored) and writes its own files beside them; the winner's
    files become the stage's."""

    def __init__(self, store: StreamedBlocks):
        self.store = store

    def begin(self, t: int) -> None:
        shutil.rmtree(self.store.root / f"stage{self.store.stage}" / f"trial{t}", ignore_errors=True)
        self.store.trial = t

    def end(self) -> None:
        self.store.trial = None

    def keep(self, t: int) -> None:
        pass  # its files are on disk

    def adopt(self, t: int | None) -> None:
        folder = self.store.root / f"stage{self.store.stage}"
        if t is not None:
            for f in (folder / f"trial{t}").glob("block?????.safetensors"):
                remove(folder / f.name)
                if states_path(f).is_file():
                    os.replace(states_path(f), states_path(folder / f.name))
                os.replace(f, folder / f.name)
        for trial in folder.glob("trial*"):
            shutil.rmtree(trial, ignore_errors=True)
        self.store.reshape_all(final=True)  # every trial's blocks were finished in its pass: the skeleton takes the kept files' layout


def store_of(model) -> BlockStore:
    """The model's block store (the engine gives every model one; a bare model, in library use
    and tests, gets a resident store that keeps nothing on disk)."""
    store = getattr(model, "block_store", None)
    if store is None:
        store = model.block_store = ResidentBlocks(model, None)
    return store
