"""A pass's checkpoints: stage<k>.pass<p>.pt holds the next block to run, the activations into it
and what the pass collected so far, so that a killed pass resumes there. Taken at most every
CHECKPOINT_SECONDS (each holds one block's input activations, hundreds of MB for large
calibration sets), so resuming repeats at most that much work; KILL_AFTER makes a run die right
after one (the resume tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

KILL_AFTER = "COMPRESS_KILL_AFTER_BLOCK"  # "<stage>:<block>": SIGKILL after that block's checkpoint (tests)
CHECKPOINT_SECONDS = float(os.environ.get("COMPRESS_CHECKPOINT_SECONDS", 60))


class PassCheckpoints:
    def __init__(self, root: Path):
        self.root = root
        self.last = time.monotonic()

    def path(self, stage: int, passes: int) -> Path:
        return self.root / f"stage{stage}.pass{passes}.pt"

    def load(self, stage: int, passes: int) -> dict | None:
        """The checkpoint of that pass ({"next", "hidden", "collected"}), None where there is none."""
        self.last = time.monotonic()
        path = self.path(stage, passes)
        return torch.load(path, weights_only=True) if path.is_file() else None

    def due(self, stage: int, block: int) -> tuple[bool, bool]:
        """(take one now, die after it): at most every CHECKPOINT_SECONDS, or where KILL_AFTER says."""
        kill = os.environ.get(KILL_AFTER) == f"{stage}:{block}"
        return kill or time.monotonic() - self.last >= CHECKPOINT_SECONDS, kill

    def save(self, stage: int, passes: int, next_block: int, hidden: list[torch.Tensor] | None, collected: dict | None, kill: bool) -> None:
        path = self.path(stage, passes)
        tmp = path.with_suffix(".tmp")
        cpu = None if hidden is None else [h.cpu() for h in hidden]  # a no-op on CPU; GPU activations resume anywhere
        torch.save({"next": next_block, "hidden": cpu, "collected": collected}, tmp)
        os.replace(tmp, path)
        self.last = time.monotonic()
        if kill:  # fault injection: die as `kill -9` would, right here
            os.kill(os.getpid(), signal.SIGKILL)

    def clear(self, stage: int) -> None:
        for f in self.root.glob(f"stage{stage}.pass*.pt"):
            f.unlink()
