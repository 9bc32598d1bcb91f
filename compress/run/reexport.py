"""`compress export RUN_DIR --to hf|gguf|onnx`: export a finished run without recompressing it.

The model is read back from the run's Hugging Face export (dense, sparse, or GPTQ with its grids
restored, so a GPTQ g32 model still goes to Q4_0 without requantising), the data windows are cut
again from the run's recipe, and the new export is written beside the run's other files, checked,
and recorded in results.json (report.md rewritten). Nothing is replaced until it is complete.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from compress.data.windows import build_segments
from compress.errors import CompressError
from compress.export import EXPORTERS
from compress.export import hf as hf_export
from compress.export.hf import gptq
from compress.export.reference import reference_for_run
from compress.model.load import DTYPES, LoadedModel, load_model
from compress.reports.report import write_report
from compress.run.recipe import Recipe


def read_run(run_dir: Path) -> tuple[dict, Recipe]:
    """results.json and the resolved recipe of a finished run."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        metadata = json.loads((run_dir / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CompressError(f"{run_dir}: not a finished run (results.json and metadata.json are read): {err}") from None
    return results, Recipe.model_validate(metadata["recipe"])


def load_run_model(run_dir: Path, results: dict, recipe: Recipe) -> LoadedModel:
    hf = results.get("export", {}).get("hf")
    if hf is None:
        raise CompressError(f"{run_dir}: the run kept no Hugging Face export (export.hf: false) to export from; run it again with export.hf on")
    kind, dtype = hf["kind"], recipe.model.dtype
    if kind in ("dense", "sparse", "layout", "gptq"):
        # layout: low-rank / structured shapes from layout.json
        loaded = load_gptq_run(run_dir, DTYPES[dtype]) if kind == "gptq" else load_model(str(run_dir), dtype)
        hf_export.load_block_grids(loaded.model, run_dir)  # llama.cpp block formats, when the run made them
        return loaded
    raise CompressError(f"{run_dir}: exporting a {kind} run is not supported (bitsandbytes weights live in its own layers); add the export to the recipe instead")


def load_gptq_run(run_dir: Path, dtype: torch.dtype) -> LoadedModel:
    """A dense model holding the decoded GPTQ weights, each quantised Linear with its grid."""
    config = AutoConfig.from_pretrained(run_dir)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for path in sorted(run_dir.glob("*.safetensors")):
        if path.name == hf_export.GRIDS_FILE:
            continue
        with safe_open(path, framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))})
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    gptq.load_states(model, run_dir)
    model.eval().requires_grad_(False)
    return LoadedModel(model, AutoTokenizer.from_pretrained(run_dir), str(run_dir), str(run_dir), "folder")


def exporter_config(to: str, types: list[str], fmt: str | None):
    if to not in EXPORTERS:
        raise CompressError(f"--to: expected one of {', '.join(EXPORTERS)}, got {to!r}")
    settings = {"hf": {"format": fmt or "sparse"}, "gguf": {"types": types or ["f16"]}, "onnx": {}}[to]
    if types and to != "gguf":
        raise CompressError("--type applies to --to gguf only")
    if fmt and to != "hf":
        raise CompressError("--format applies to --to hf only")
    try:
        return EXPORTERS[to].config.model_validate(settings)
    except ValidationError as err:
        first = err.errors()[0]
        where = "--type" if to == "gguf" else "--format"
        raise CompressError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def destination(run_dir: Path, to: str, cfg) -> Path:
    if to == "hf":  # the run's own HF export stays where it is
        return run_dir / f"hf-{cfg.format}"
    return run_dir / EXPORTERS[to].subdir


def export_run(run_dir: Path, to: str, types: list[str], fmt: str | None = None, check: bool = True, overwrite: bool = False) -> dict:
    cfg = exporter_config(to, types, fmt)
    if not run_dir.is_dir():
        raise CompressError(f"{run_dir}: no such run folder")
    results, recipe = read_run(run_dir)
    final = destination(run_dir, to, cfg)
    if final.exists() and not overwrite:
        raise CompressError(f"{final} already exists; pass --overwrite to replace it once the new export is complete")
    exporter = EXPORTERS[to]
    loaded = load_run_model(run_dir, results, recipe)
    # the run's own roles: a source shared between roles is split among them, so fewer roles would
    # cut other windows than the run used
    segments = build_segments(recipe.data_roles(), loaded.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=run_dir))
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=run_dir))
    try:
        info = exporter.save(loaded.model, loaded.tokenizer, tmp, cfg, scratch)
        if check:
            if exporter.verify is not None:
                info.update(exporter.verify(loaded.model, tmp, info, cfg))
            ref = reference_for_run(loaded.model, loaded.tokenizer, segments, recipe.export.check_windows)
            loaded.model = None
            gc.collect()
            info.update(exporter.check(tmp, info, ref, cfg))
        (tmp / "export.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    key = to if to != "hf" else f"hf-{cfg.format}"
    results["export"][key] = info
    record(run_dir, results)
    return info


def record(run_dir: Path, results: dict) -> None:
    """results.json and report.md with the new export, each replaced in one rename."""
    staged = run_dir / ".results.json.partial"
    staged.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, run_dir / "results.json")
    write_report(run_dir, results)
