"""`compress validate`: everything that can be checked without loading weights.

Beyond the schema (recipe.py): the model and data files exist, and allocations that depend on the
number of blocks (explicit lists, a fixed ATP beta) fit the model, read from its config alone.
"""

from __future__ import annotations

from compress import allocate
from compress.data import BUILTIN_SOURCES, DATASET_SOURCES, resolve_path
from compress.errors import CompressError
from compress.model import REGISTERED, looks_like_path, count_blocks
from compress.recipe import Recipe


def check_recipe(recipe: Recipe) -> list[str]:
    """Raise CompressError on the first problem; return notes worth showing."""
    notes = []
    source = recipe.model.source
    if source not in REGISTERED and not resolve_path(source, None).exists():
        if looks_like_path(source):
            raise CompressError(f"model.source: {source} does not exist")
        notes.append(f"model.source: '{source}' is not local; it will be fetched from the hub (needs a network)")
    for role in ("calibration", "validation", "evaluation"):
        data = getattr(recipe.data, role)
        if data.source in DATASET_SOURCES:
            notes.append(f"data.{role}.source: '{data.source}' is downloaded with the datasets package (needs a network)")
        elif data.source not in BUILTIN_SOURCES and not resolve_path(data.source, None).is_file():
            raise CompressError(f"data.{role}.source: {data.source} not found")
    if recipe.eval.tasks:
        from compress.zeroshot import DATA_FILES

        for task in recipe.eval.tasks:
            path = resolve_path(recipe.eval.tasks_dir, None) / DATA_FILES[task]
            if not path.is_file():
                raise CompressError(f"eval.tasks_dir: {path} not found (needed by task {task})")
    blocks = count_blocks(source) if source in REGISTERED or resolve_path(source, None).exists() else None
    if blocks is None:
        return notes
    for k, stage in enumerate(recipe.stages):
        alloc = getattr(stage, "allocation", None)
        where = f"stages[{k}].allocation"
        if isinstance(alloc, allocate.ExplicitAllocation) and len(alloc.ratios) != blocks:
            raise CompressError(f"{where}.ratios: {len(alloc.ratios)} entries, the model has {blocks} blocks")
        if isinstance(alloc, allocate.AtpAllocation) and alloc.beta != "auto":
            try:
                allocate.atp(blocks, stage.target, alloc.beta)
            except CompressError as err:
                raise CompressError(f"{where}.beta: {err}") from None
    notes.append(f"model: {blocks} decoder blocks")
    return notes
