"""`compress compare`'s rows: run folders are read as they are; a recipe is looked up by its
run_id (compress/run/identity.py) in its output_dir and run only when no finished run of exactly
that recipe, model file and data is there. The table itself is compress/reports/compare.py's."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from compress.errors import CompressError
from compress.reports.compare import Entry
from compress.run import engine, identity
from compress.run.recipe import load_recipe
from compress.run.staging import output_dir_for

log = logging.getLogger("compress")


def entries_from_args(items: list[str], run_missing: bool = True, overwrite: bool = False) -> list[Entry]:
    """Run folders are read; recipes are read from their output_dir when finished, else run
    (in this process, one after another) unless run_missing is False."""
    entries = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            if not (path / "results.json").is_file():
                raise CompressError(f"{path}: not a finished run (no results.json); give a run's output_dir or a recipe .yaml")
            entries.append(Entry(path.name, path))
        elif path.suffix in (".yaml", ".yml") or path.is_file():
            entries.append(entry_for_recipe(path, run_missing))
        else:
            raise CompressError(f"{path}: no such run folder or recipe file")
    return entries


def entry_for_recipe(path: Path, run_missing: bool) -> Entry:
    recipe = load_recipe(path)
    out = output_dir_for(recipe, path)
    name = recipe.name or path.stem
    command = f"compress run {shlex.quote(str(path))}"
    if identity.finished(out, recipe):
        log.info("%s: finished run in %s (same run_id): read, not rerun", path, out)
        return Entry(name, out, command)
    if not run_missing:
        raise CompressError(f"{path}: no finished run of this recipe in {out}; run it, or drop --no-run")
    log.info("%s: running (no finished run of this recipe in %s)", path, out)
    engine.run(recipe, path, overwrite=True)
    return Entry(name, out, command)
