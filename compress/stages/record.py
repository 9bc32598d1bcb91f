"""What every stage's record holds (results.json's stages[k], report.md's stage sections); each
stage's record adds its own numbers. Records are keyword-built dataclasses of plain values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(kw_only=True)
class StageRecord:
    kind: str
    allocation: dict  # the recipe's allocation section, as resolved
    skipped: list[str] = field(default_factory=list)  # Linears inside blocks the stage left as they were
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        raise NotImplementedError


@dataclass(kw_only=True)
class AllocatedRecord(StageRecord):
    """A stage whose per-block ratio comes from an allocator, ATP's beta searched or given."""

    target: float  # the mean asked for
    beta: float | None = None
    search: list[dict] | None = None  # the beta search's trials
