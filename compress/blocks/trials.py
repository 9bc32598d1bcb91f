"""The beta search's trial spaces: every trial starts from the stage's input weights, the best
one is kept, and the model ends with it (compress/stages/allocation.py runs the trials).

    SpilledTrials   resident blocks: the starting weights spilled to disk and read back in place
    FileTrials      streamed blocks: each trial writes its own block files beside the stage's
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from compress.blocks.files import remove, states_path
from compress.blocks.snapshots import WeightFile, ZeroMask

if TYPE_CHECKING:
    from compress.blocks.store import BlockStore, StreamedBlocks


class SpilledTrials:
    """Resident blocks: the weights every trial starts from are spilled to disk (compress/blocks/snapshots.py)
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
        self.store.begin_trial(t)

    def end(self) -> None:
        self.store.end_trial()

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
        self.store.begin_trial(t)

    def end(self) -> None:
        self.store.end_trial()

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
