"""`compress validate`: everything that can be checked without loading weights.

Beyond the schema (recipe.py): the model, data and task files exist and have the right kind, the
output folder can be written, and everything that depends on the model is checked on a skeleton
built from its config on the meta device (no weights, no memory): the architecture is supported,
each stage's targets/ignore select some Linear layer, windows fit the context length, and
each stage's own checks of the selected layers (check_layers: explicit lists and fixed ATP betas
against the block count, N:M divisibility, ...); and
the text is cut with the model's tokenizer, so a source too short for its windows fails here too.
"""

from __future__ import annotations

from pathlib import Path

from compress.blocks import devices
from compress.data.text import BUILTIN_SOURCES, DATASET_SOURCES, check_file_source, resolve_path
from compress.data.windows import build_segments
from compress.errors import CompressError
from compress.evaluation.zeroshot import DATA_FILES, check_task_names
from compress.export import preflight
from compress.export.hf.gptq import check_packable
from compress.model.anatomy import context_length, decoder_blocks, select_linears, skeleton
from compress.model.load import DTYPES, read_config, read_tokenizer
from compress.run.engine import cancelled_on_error, check_context
from compress.run.recipe import Recipe
from compress.run.staging import check_output_dir, output_dir_for


def check_recipe(recipe: Recipe, recipe_path: Path) -> list[str]:
    """Raise CompressError on the first problem; return notes worth showing."""
    notes = []
    m = recipe.model
    devices.check(m.device)
    config = read_config(m.source, m.trust_remote_code, m.allow_pickle)  # raises on a bad local path
    if config is None:
        notes.append(f"model.source: '{m.source}' is not local; it will be fetched from the hub (needs a network)")
    roles = recipe.data_roles()
    for role, data in roles.items():
        if data.source in DATASET_SOURCES:
            notes.append(f"data.{role}.source: '{data.source}' is downloaded with the datasets package (needs a network)")
        elif data.source not in BUILTIN_SOURCES:
            check_file_source(resolve_path(data.source, None), role)
    if recipe.eval.tasks:
        local = [task for task in recipe.eval.tasks if task in DATA_FILES]
        folder = resolve_path(recipe.eval.tasks_dir, None) if local else None
        if folder is not None and not folder.is_dir():
            raise CompressError(f"eval.tasks_dir: {folder} is not a folder")
        for task in local:
            if not (folder / DATA_FILES[task]).is_file():
                raise CompressError(f"eval.tasks_dir: {folder / DATA_FILES[task]} not found (needed by task {task})")
        others = [task for task in recipe.eval.tasks if task not in DATA_FILES]
        check_task_names(others)
        if others:
            notes.append(f"eval.tasks: {', '.join(others)} are not local tasks: lm-eval reads them from its own datasets (needs a network)")
    final = output_dir_for(recipe, recipe_path)
    check_output_dir(final, overwrite=None)
    if final.exists():
        notes.append(f"output_dir: {final} exists; `compress run` needs --overwrite to replace it")
    if config is None:
        return notes

    model = skeleton(config, m.trust_remote_code)
    blocks = len(decoder_blocks(model))
    check_context(roles, config, DTYPES[recipe.calibration_dtype])
    # Cutting the text needs only the tokenizer: too few windows, or bos on a tokenizer without
    # one, fail here rather than after the model has loaded.
    tokenizer = read_tokenizer(m.source, m.trust_remote_code, m.allow_pickle)
    build_segments(roles, tokenizer)
    # quick export checks raise here; the GGUF converter's verdict comes back while the stages are checked
    pending = preflight(recipe.export, model, tokenizer, recipe.quantises(), recipe.narrows())
    with cancelled_on_error(pending):
        check_stages(recipe, model)
    pending.result()
    notes.append(f"model: {type(model).__name__}, {blocks} decoder blocks, context {context_length(config)} tokens")
    return notes


def check_stages(recipe: Recipe, model) -> None:
    """Each stage's layer selection and its own checks of the selected layers, on the skeleton."""
    quantised_at = None
    for k, stage in enumerate(recipe.stages):
        if stage.kind == "recover" and quantised_at is not None:
            raise CompressError(f"stages[{k}]: recover after the quantize stage stages[{quantised_at}] would train weights off "
                                "their grid: put recover before quantize")
        if stage.kind == "quantize" or getattr(stage, "quantize", None) is not None:
            quantised_at = k if quantised_at is None else quantised_at
        layers, _ = select_linears(model, stage.targets, stage.ignore, f"stages[{k}]")
        stage.check_layers(layers, f"stages[{k}]")  # allocation lengths, fixed betas, shapes
        on_grid = getattr(stage, "method", None) in ("gptq", "rtn") or getattr(stage, "quantize", None) is not None
        if on_grid and recipe.export.hf:  # exported as a GPTQ checkpoint
            check_packable({name: m for block in layers for name, m in block.items()})

