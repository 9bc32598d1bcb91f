"""The stage journal of a staging folder: a finished stage leaves its record (stage<k>.record.json)
and then its done mark (stage<k>.done), so a resumed run skips it and reports what it recorded."""

from __future__ import annotations

import json
from pathlib import Path


class StageJournal:
    def __init__(self, root: Path | None):
        self.root = root  # None: nothing kept on disk (library use)

    def done(self, k: int) -> bool:
        return self.root is not None and (self.root / f"stage{k}.done").is_file()

    def record(self, k: int) -> dict:
        return json.loads((self.root / f"stage{k}.record.json").read_text())

    def close(self, k: int, record: dict) -> None:
        """The stage's record, then its done mark."""
        (self.root / f"stage{k}.record.json").write_text(json.dumps(record))
        (self.root / f"stage{k}.done").write_text("done\n")
