"""Where a run is written: a staging folder beside output_dir, named by the run's id, which
replaces output_dir only once the run is complete (an earlier run there is removed only after the
new one is in place), and which a killed run resumes from (compress/blocks/store.py keeps its
checkpoints there)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError
from compress.run.recipe import Recipe

log = logging.getLogger("compress")


def output_dir_for(recipe: Recipe, recipe_path: Path) -> Path:
    return Path(recipe.output_dir) if recipe.output_dir else Path("runs") / recipe_path.stem


def check_output_dir(final: Path, overwrite: bool | None) -> None:
    """output_dir must be a folder we can create (or replace, with overwrite) beside its parent.
    overwrite None: only the place is checked (validate)."""
    if final.exists() and not final.is_dir():
        raise CompressError(f"output_dir: {final} is a file, not a folder")
    if final.exists() and overwrite is False:
        raise CompressError(f"output_dir {final} already exists; pass --overwrite to replace it once the new run completes")
    parent = final.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CompressError(f"output_dir: {final} cannot be created: {parent} is a file")
    try:  # the one sure test of writability (root passes os.access everywhere)
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=parent))
    except OSError as err:
        raise CompressError(f"output_dir: {final} cannot be created: {parent} is not writable ({err.strerror or err})") from None


@contextmanager
def staging_dir(final: Path, run_id: str, restart: bool = False):
    """A folder next to `final`, named by the run's id, where the run is written. If the run
    fails or is killed after finishing a stage or a checkpoint (compress/blocks/store.py), the folder
    stays, and the same recipe run again continues from there (restart: start over); otherwise
    it is removed."""
    tmp = final.parent / f".{final.name}.resume-{run_id[:16]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if restart or not has_progress(tmp):  # nothing to resume from: start clean
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("resuming from the checkpoints in %s", tmp)
        tmp.mkdir(exist_ok=True)
    except OSError as err:
        raise CompressError(f"output_dir: cannot create a folder beside {final}: {err.strerror or err}") from err
    try:
        yield tmp
    except BaseException:
        if has_progress(tmp):
            log.warning("the run's checkpoints stay in %s: run the same recipe again to resume (--restart to start over)", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def has_progress(staging: Path) -> bool:
    """A finished stage or a pass checkpoint is in the staging folder."""
    blocks = staging / ".blocks"
    return blocks.is_dir() and any(p.suffix in (".done", ".pt") for p in blocks.iterdir())


def publish(tmp: Path, final: Path) -> None:
    """Move the finished run into place; an earlier run is removed only after the new one is in."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
