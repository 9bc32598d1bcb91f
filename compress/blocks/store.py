"""Where the decoder blocks' weights are during a run, behind one interface, so that neither the
engine nor a stage asks whether the model is streamed.

    ResidentBlocks   every block stays in memory (model.stream: false)
    StreamedBlocks   blocks on the meta device, each read from disk for its turn (model.stream: true)

What the callers use:
    store.loaded(i) -> state   block i in memory for the body; setting state["changed"] keeps the change
    store.each()               (i, block) for every block in turn, read only
    begin_stage / end_stage / stage_done / record   the engine's stage loop (finished stages are skipped)
    begin_pass / checkpoint    the block loop (compress/blocks/runner.py): where a killed pass resumes
    finish(i, block, fn)       a block into its final form (the block loop hands every block over)
    trials(...)                the beta search's trial space (compress/blocks/trials.py)
    resident                   whether the whole model can run one plain forward pass

Both keep the same files in <staging>/.blocks, so that every run resumes after a SIGKILL, each
kind in a small class of its own: the block versions (compress/blocks/files.py: stage<k>/block<i>
.safetensors and its states), the stage journal (journal.py: stage<k>.record.json, .done) and the
pass checkpoints (checkpoints.py: stage<k>.pass<p>.pt). A block is read from the newest version of
an earlier stage (or from the source), never from the running stage's own file, so a block
half-way through a pass is always recomputed from its input. A streamed store writes a block as
soon as a pass changed it (it is about to leave memory); a resident one writes its changed blocks
when it checkpoints, and at the end of a stage.

Stages that change the blocks' layout (structured, low-rank) give the block loop a `finish`
function; the loop hands every block to store.finish once its outputs are propagated, so that a
block's file holds its final modules and their layout. A resident store's beta-search trials
restore the weights of the modules they began with, so there finish waits: the kept trial's
blocks are finished when the search adopts it. A block read from a file takes the file's layout
first (reshape): a streamed skeleton's modules on meta, at each load and for every block at the
stage boundaries; a resident model's when a resumed run reads its finished blocks.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device

from compress.blocks.checkpoints import PassCheckpoints
from compress.blocks.files import COUNTS, LAYOUT, BlockFiles, block_counts, block_specs, remove, written
from compress.blocks.journal import StageJournal
from compress.blocks.snapshots import scratch_folder
from compress.blocks.trials import FileTrials, SpilledTrials
from compress.model.anatomy import block_prefix, decoder_blocks
from compress.model.modules import rebuild

log = logging.getLogger("compress")

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
        self.source_specs = [block_specs(b) for b in self.blocks]  # the layout of the source's blocks (config.json's)
        self.files = BlockFiles(self.root, self.prefix)
        self.journal = StageJournal(self.root)
        self.checkpoints = None if self.root is None else PassCheckpoints(self.root)
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
        return self.files.path(stage, i, trial)

    def newest(self, i: int, before: int | None = None) -> Path | None:
        """The newest file of block i written by a stage before `before` (default: the running one)."""
        return self.files.newest(i, self.stage if before is None else before)

    def final(self, i: int) -> Path | None:
        """The block's weights after every stage so far (None: the source's)."""
        return self.newest(i, before=self.stage + 1)

    def write(self, i: int, path: Path) -> None:
        """Block i (its states, counts and layout, then its weights) to `path`, each file atomically."""
        self.files.write(i, self.blocks[i], path)

    def read(self, i: int, path: Path) -> None:
        """Block i's weights and layer states from `path`."""
        self.files.read(i, self.blocks[i], path, self.put)

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
        if self.journal.done(k):
            self.stage = k + 1
            return
        if self.root is not None:
            (self.root / f"stage{k}").mkdir(parents=True, exist_ok=True)

    def end_stage(self, k: int, record: dict) -> None:
        """The stage's record, then its done mark; older versions of the blocks it rewrote go."""
        if self.root is None:
            self.stage = k + 1
            return
        self.journal.close(k, record)
        for i in range(self.count):
            if self.path(k, i).is_file():
                for j in range(k):
                    remove(self.path(j, i))
        self.checkpoints.clear(k)
        self.stage = k + 1  # what follows (evaluation, export, the next stage) reads stage k's blocks

    def stage_done(self, k: int) -> bool:
        return self.journal.done(k)

    def record(self, k: int) -> dict:
        return self.journal.record(k)

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

    def begin_pass(self, collected: dict | None = None) -> tuple[int, list[torch.Tensor] | None]:
        """(first block to run, propagated activations into it) for the next pass of this stage:
        (0, None) unless a checkpoint of this pass is on disk (a run that was killed); then
        `collected` gets what the pass had gathered up to it."""
        self.passes += 1
        if self.trial is not None or self.root is None:
            return 0, None  # a search killed half way starts again (its trials are not checkpointed)
        state = self.checkpoints.load(self.stage, self.passes)
        if state is None:
            return 0, None
        start = state["next"]
        if collected is not None:
            collected.update(state.get("collected") or {})
        for i in range(start, len(self.blocks)):  # written after the checkpoint: recomputed
            remove(self.path(self.stage, i))
        self.resumed(start)
        log.info("resuming stage %d pass %d at block %d (checkpoint %s)", self.stage, self.passes, start,
                 self.checkpoints.path(self.stage, self.passes).name)
        return start, state["hidden"]

    def checkpoint(self, next_block: int, hidden: list[torch.Tensor] | None, collected: dict | None = None) -> None:
        """After a block of a pass: every CHECKPOINT_SECONDS, the changed blocks and the
        activations into the next one."""
        if self.trial is not None or self.root is None:
            return
        due, kill = self.checkpoints.due(self.stage, next_block - 1)
        if due:
            self.flush()
            self.checkpoints.save(self.stage, self.passes, next_block, hidden, collected, kill)

    # ------------------------------------------------------------ beta-search trials

    def begin_trial(self, t: int) -> None:
        """Trial t of a beta search runs: nothing is checkpointed; a streamed block goes to the trial's own file."""
        self.trial = t

    def end_trial(self) -> None:
        self.trial = None

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
    source (compress/blocks/sources.py's WeightSource / GgufWeightSource)."""

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


def store_of(model) -> BlockStore:
    """The model's block store (the engine gives every model one; a bare model, in library use
    and tests, gets a resident store that keeps nothing on disk)."""
    store = getattr(model, "block_store", None)
    if store is None:
        store = model.block_store = ResidentBlocks(model, None)
    return store
