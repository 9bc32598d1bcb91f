"""What the engine hands every stage besides the model and the stage's own config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.blocks.runner import BlockInputs, capture_inputs
from compress.data.windows import Segments
from compress.errors import CompressError


@dataclass
class StageContext:
    calibration: Segments | None
    validation: Segments | None  # for choosing hyperparameters; never the reported split
    calibration_dtype: torch.dtype | None = None  # dtype of the block-wise forward passes; None: the model's
    stage_key: str = "stages"  # recipe key path of the running stage, for error messages
    scratch_dir: Path | None = None  # where stages may spill large temporary state; None: the system temp
    _inputs: BlockInputs | None = field(default=None, repr=False)
    _subset: "Subset | None" = field(default=None, repr=False)

    def block_inputs(self, model: nn.Module) -> BlockInputs:
        """Block-0 inputs of the calibration segments, captured once and reused by every trial and
        stage (they depend only on the embeddings, which no stage changes); inside calibrating_on(k),
        k of them spread evenly over the calibration text."""
        if self.calibration is None:
            raise CompressError(f"{self.stage_key}: this stage needs calibration data (data.calibration)")
        if self._inputs is None:
            self._inputs = capture_inputs(model, self.calibration.tokens, self.calibration_dtype)
        subset, n = self._subset, len(self._inputs.hidden)
        if subset is None or subset.windows is None or subset.windows >= n:
            return self._inputs
        subset.used = True
        keep = torch.linspace(0, n - 1, subset.windows).round().long().tolist()
        return BlockInputs([self._inputs.hidden[k] for k in keep], self._inputs.extras)

    @contextmanager
    def calibrating_on(self, windows: int | None) -> Iterator["Subset"]:
        """Stages calibrate on `windows` of the calibration windows while the context lasts (None:
        on all); the Subset says whether any stage did calibrate on fewer."""
        self._subset = Subset(windows)
        try:
            yield self._subset
        finally:
            self._subset = None


@dataclass
class Subset:
    windows: int | None  # None: all
    used: bool = False  # a stage took block inputs while fewer windows than all were asked for
