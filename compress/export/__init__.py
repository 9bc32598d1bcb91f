"""Exporters: write a compressed model in a format a runtime loads, then prove it loads the same.

A plain table like STAGES: name (the key under `export:` in a recipe) -> Exporter. The engine
saves every export the recipe names while the model is in memory (`save`, then `verify`: the
written bytes decode to the model's weights), takes the reference outputs, frees the model, and
then reloads each export in its own runtime (`check`). Installed as compress.export (see
pyproject.toml). Exporters never import stages.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from compress.errors import CompressError
from compress.export import gguf, hf, onnx


@dataclass(frozen=True)
class Exporter:
    config: type  # the recipe section's Config subclass
    save: Callable  # save(model, tokenizer, dest, cfg, scratch) -> info (dict with "format", "notes")
    verify: Callable | None  # verify(model, dest, info, cfg) -> dict; raises CompressError on a mismatch
    check: Callable  # check(dest, info, reference, cfg) -> dict; raises CompressError on a mismatch
    subdir: str  # where in the run folder it writes ("" for the top)


def _exporters() -> dict[str, Exporter]:
    return {
        "hf": Exporter(hf.HfExport, hf.save, hf.verify, hf.check, ""),
        "gguf": Exporter(gguf.GgufExport, gguf.save, gguf.verify, gguf.check, "gguf"),
        "onnx": Exporter(onnx.OnnxExport, onnx.save, onnx.verify, onnx.check, "onnx"),
    }


EXPORTERS = _exporters()


def preflight(section, model, tokenizer, quantised: bool, narrows: dict | None = None):
    """What would fail at export time, checked before any compression: by validate (on a
    skeleton) and by run (on the loaded model). section: the recipe's ExportSection; quantised and
    narrows: what the recipe's stages will do (Recipe.quantises, Recipe.narrows). Quick checks
    raise here; the GGUF converter's verdict comes back in the background: the returned
    gguf.Pending's result() waits for it and raises what is wrong (cancel() if the run stops first)."""

    if section.hf is not None and section.hf.format == "sparse" and quantised:
        raise CompressError("export.hf.format: sparse stores unquantised tensors, and this recipe quantises (its GPTQ/bitsandbytes checkpoint packs the weights already): use format: dense")
    if section.onnx is not None:
        missing = [p for p in ("onnx", "onnxscript") if importlib.util.find_spec(p) is None]
        if missing:
            raise CompressError(f"export.onnx: needs {' and '.join(missing)}: pip install 'atp-compress[onnx]'")
    if section.gguf is not None:
        return gguf.preflight(model, tokenizer, section.gguf, restructured=narrows)
    return gguf.Pending(lambda: None)
