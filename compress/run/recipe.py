"""The recipe: YAML in, one frozen, validated Recipe out; nothing below the engine sees YAML.

Every mistake becomes one CompressError line naming the file, the line, the key path and what
was expected, e.g.  recipes/x.yaml:9: stages[0].sparsity: Input should be less than 1 (got 1.5)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from compress.config import Config
from compress.data.windows import SegmentsConfig
from compress.errors import CompressError
from compress.evaluation.zeroshot import DATA_FILES
from compress.export import EXPORTERS
from compress.export.gguf import GgufExport
from compress.export.hf import HfExport
from compress.export.onnx import OnnxExport
from compress.stages import STAGES

Stage = Annotated[Union[tuple(config for config, _ in STAGES.values())], Field(discriminator="kind")]


class ModelSection(Config):
    source: str = "smollm2-135m"  # registered name, HF folder, .gguf file, or hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "cuda", "cuda:1", "auto": weights stay in CPU RAM, each block visits the GPU for its turn;
    # whole-model evaluation spread by accelerate (auto: over every GPU); compress/blocks/devices.py
    device: str = "cpu"
    allow_pickle: bool = False  # allow .bin/.pt checkpoints (unpickling can run code)
    trust_remote_code: bool = False
    revision: str | None = None
    # decoder blocks stay on disk and are materialised one at a time (compress/blocks/sources.py): for
    # models bigger than memory; an interrupted run resumes from its last finished block
    stream: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
            raise ValueError("device must be cpu, cuda, cuda:N or auto")
        return value


class DataSection(Config):
    """validation and evaluation default to the calibration source: each role then reads its own
    disjoint part of it (see compress/data/windows.py)."""

    calibration: SegmentsConfig = SegmentsConfig(nsamples=128, seqlen=512)
    validation: SegmentsConfig
    evaluation: SegmentsConfig

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_calibration(cls, raw):
        if not isinstance(raw, dict):
            return raw
        calibration = raw.get("calibration") or {}
        base = {k: calibration[k] for k in ("source", "seqlen", "text_field", "bos") if isinstance(calibration, dict) and k in calibration}
        raw = dict(raw)
        raw.setdefault("validation", {**base, "nsamples": 16})
        raw.setdefault("evaluation", dict(base))
        return raw


ARTEFACTS = ("model", "hf", "gguf", "onnx")


class EvalSection(Config):
    perplexity: bool = True
    dense: bool = True  # also measure the model before compression, for the comparison
    batch_size: int = Field(default=1, gt=0)
    # zero-shot accuracy through lm-eval (the `eval` extra): the six local tasks (piqa, arc_easy,
    # arc_challenge, openbookqa, winogrande, hellaswag) read tasks_dir; other lm-eval task names
    # read lm-eval's own datasets (a network is needed)
    tasks: list[str] = []
    tasks_dir: str | None = None  # folder with piqa.jsonl, arc-easy.jsonl, ..., hellaswag-val.txt
    limit: int | None = Field(default=None, gt=0)  # first N items of each task; None: all
    tasks_batch_size: int = Field(default=16, gt=0)
    # What the compressed numbers are measured on: the in-memory model, and/or exported artefacts
    # reloaded in their own runtime (hf folder, every gguf file or gguf:<type>, onnx)
    artefacts: list[str] = ["model"]
    speed: bool = False  # tokens/s (prefill 128/512, decode 128) of each artefact in `on`
    speed_repeats: int = Field(default=3, gt=0)

    @model_validator(mode="after")
    def _tasks_need_files(self):
        local = [t for t in self.tasks if t in DATA_FILES]
        if local and self.tasks_dir is None:
            raise ValueError(f"tasks_dir is required with the local tasks {local} (the folder holding the task files)")
        return self

    @field_validator("artefacts")
    @classmethod
    def _artefacts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(ARTEFACTS)} (or gguf:<type>)")
        for item in value:
            if item.split(":", 1)[0] not in ARTEFACTS or (":" in item and not item.startswith("gguf:")):
                raise ValueError(f"unknown artefact {item!r}; expected {', '.join(ARTEFACTS)} or gguf:<type>")
        if len(set(value)) != len(value):
            raise ValueError("an artefact is named twice")
        return value


class ExportSection(Config):
    """One key per exporter in compress.export.EXPORTERS: true (its defaults), false / absent
    (none), or its own settings."""

    hf: HfExport | None = HfExport()  # safetensors + config + tokenizer at the top of output_dir
    gguf: GgufExport | None = None  # output_dir/gguf/: llama.cpp files, one per type
    onnx: OnnxExport | None = None  # output_dir/onnx/: ONNX Runtime graphs
    check: bool = True  # reload every export in its runtime and compare with the model
    check_windows: int = Field(default=4, ge=0)  # evaluation windows scored in each runtime (perplexity)

    @field_validator("hf", "gguf", "onnx", mode="before")
    @classmethod
    def _switch(cls, value):
        if value is True:
            return {}
        if value is False or value is None:
            return None
        if not isinstance(value, (dict, Config)):
            raise ValueError(f"expected true, false or the exporter's settings (a mapping), got {value!r}")
        return value

    def selected(self) -> list[tuple[str, Config]]:
        """(exporter name, settings) of every export asked for, in the table's order."""
        return [(name, getattr(self, name)) for name in EXPORTERS if getattr(self, name) is not None]


class Recipe(Config):
    name: str | None = None
    seed: int = 0
    threads: int | None = Field(default=None, gt=0)  # torch threads; None: torch's default
    # dtype of the block-by-block calibration passes (statistics still accumulate in float32 and
    # weights change in model.dtype); bfloat16 is ~3x faster on CPUs with native bf16 matmuls
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    stages: list[Stage] = []
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    output_dir: str | None = None  # default: runs/<recipe file name>

    @model_validator(mode="after")
    def _evaluated_artefacts_are_exported(self):
        for item in self.eval.artefacts:
            kind, _, gguf_type = item.partition(":")
            if kind == "model":
                continue
            if getattr(self.export, kind) is None:
                raise ValueError(f"eval.artefacts: {item!r} is evaluated after export, but export.{kind} is off")
            if gguf_type and gguf_type not in self.export.gguf.types:
                raise ValueError(f"eval.artefacts: {item!r}: export.gguf.types is {self.export.gguf.types}, without {gguf_type}")
        return self

    @model_validator(mode="after")
    def _grid_files_have_grids(self):
        """A GGUF `grid` file writes the quantize stage's llama.cpp block formats; without a stage
        that makes them it would fail after all the compression (or write nothing of its own)."""
        if self.export.gguf is None or "grid" not in self.export.gguf.types:
            return self
        makers = [stage for stage in self.stages if stage.kind == "quantize" or getattr(stage, "quantize", None) is not None]
        if not any((stage.quantize if stage.kind == "prune" else stage).writes_block_formats() for stage in makers):
            raise ValueError("export.gguf.types: grid writes the llama.cpp block formats a quantize stage put the weights on, and no "
                             "stage does (add a quantize stage with grid: q4_0 / q4_k / ..., or GPTQ / RTN 4 or 8 bits, "
                             "group_size 32, sym); or name a type such as q4_0")
        return self

    @model_validator(mode="after")
    def _streamed_runs(self):
        """What a streamed run can do: prune, quantize (gptq / rtn, integer grids or llama.cpp's
        block formats), lowrank and structured stages with every allocation, perplexity and
        zero-shot tasks, the HF folder (dense, GPTQ when quantised, layout when restructured) and
        GGUF files."""
        if not self.model.stream:
            return self
        for k, stage in enumerate(self.stages):
            if stage.kind == "recover":
                raise ValueError(f"stages[{k}]: model.stream does not run recover: LoRA trains every block at once against the "
                                 "model's loss (backpropagation through the whole model); run it on a machine that holds the model")
            if stage.kind == "quantize" and stage.method == "bnb":
                raise ValueError(f"stages[{k}].method: bnb is not streamed (its checkpoint is written by transformers from the whole "
                                 "model): use gptq or rtn")
        if any(item.partition(":")[0] in ("hf", "onnx") for item in self.eval.artefacts) or self.eval.speed:
            raise ValueError("eval.artefacts / eval.speed: a streamed run measures the model block by block, and GGUF files in "
                             "llama.cpp; the HF folder is not reloaded whole")
        if self.export.onnx is not None:
            raise ValueError("export.onnx: a streamed model is not exported to ONNX (torch.onnx.export traces the whole model in memory); "
                             "export the HF folder and convert it on a machine that holds the model")
        if self.export.hf is not None and self.export.hf.format != "dense":
            raise ValueError("export.hf.format: a streamed run writes the dense (or, quantised, GPTQ) HF folder; sparse packs the whole model")
        return self

    def data_roles(self) -> dict:
        """The roles a run cuts text for (evaluation only when perplexity is measured). Roles
        that share a source split it among themselves, so the same roles give the same windows."""
        roles = {"calibration": self.data.calibration, "validation": self.data.validation}
        if self.eval.perplexity:
            roles["evaluation"] = self.data.evaluation
        return roles

    def quantises(self) -> bool:
        """Some stage puts weights on a quantisation grid (its checkpoint packs them)."""
        return any(stage.kind == "quantize" or getattr(stage, "quantize", None) is not None for stage in self.stages)

    def narrows(self) -> dict | None:
        """What the structured stages do to the blocks' widths: per_block (widths differ between
        blocks: any allocation but uniform) and out_biases (bias compensation adds o_proj /
        down_proj biases); None without a structured stage."""
        stages = [s for s in self.stages if s.kind == "structured"]
        if not stages:
            return None
        return {"per_block": any(s.allocation.kind != "uniform" for s in stages),
                "out_biases": any(s.bias_compensation for s in stages)}

    def sha256(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise CompressError(f"recipe {path} is a folder; give a recipe .yaml file")
    if not path.is_file():
        raise CompressError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CompressError(f"{path}: not a text (UTF-8) file: byte {err.object[err.start]:#04x} at offset {err.start}") from None
    except OSError as err:
        raise CompressError(f"recipe {path}: cannot read: {err.strerror or err}") from None
    if not text.strip():
        raise CompressError(f"{path}: the recipe is empty; write {{}} to run every default")
    raw = read_yaml(text, path)
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: a recipe is a mapping of sections (model, data, stages, ...), got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise CompressError(describe_error(first, raw, text, path, len(err.errors()))) from err


def read_yaml(text: str, path: Path):
    """yaml.safe_load, but a mapping that gives one key twice is an error (safe_load keeps the
    last value silently). The text is composed once, checked, then constructed from the same
    nodes with the SafeLoader's constructor: no code runs, and anchors are walked once each."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            duplicate = first_duplicate_key(node)
            if duplicate is not None:
                keys, line, first_line = duplicate
                raise CompressError(f"{path}:{line}: {format_path(keys)}: the key is given twice (first on line {first_line}); "
                                    "keep one")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CompressError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from err


MERGE_TAG = "tag:yaml.org,2002:merge"


def first_duplicate_key(root: yaml.Node) -> tuple[list, int, int] | None:
    """(key path, line, line of its first occurrence) of the first key (in the text) that a mapping
    gives twice, or None. Keys brought in by a merge (<<: *anchor) may be given again: that is how
    YAML overrides them. A node reached twice through an alias is checked once."""
    seen, todo, found = set(), [(root, [])], []
    while todo:
        node, keys = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    todo.append((value_node, keys))
                    continue
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in lines:
                    found.append(([*keys, key_node.value], line, lines[key]))
                lines.setdefault(key, line)
                todo.append((value_node, [*keys, key_node.value]))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, [*keys, i]) for i, item in enumerate(node.value))
    return min(found, key=lambda f: f[1], default=None)


def apply_override(raw: dict, item: str) -> None:
    """--set a.b.0.c=value: the value is read as YAML (numbers, booleans, lists), lists indexed by number."""
    if "=" not in item:
        raise CompressError(f"--set {item}: expected key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CompressError(f"--set {key}: {where}: no list item {part} (the list has {len(node)})")
            index = int(part)
            if last:
                node[index] = yaml.safe_load(value)
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(value)
            else:
                node = node.setdefault(part, {})
        else:
            raise CompressError(f"--set {key}: {where}: cannot set a key inside a {type(node).__name__}")


def describe_error(error: dict, raw, text: str, path: Path, count: int) -> str:
    keys = yaml_path(error["loc"], raw)
    message = error["msg"].removeprefix("Value error, ")
    named = re.match(r"([A-Za-z_]\w*(?:\.\w+|\[\d+\])*): ", message) if not keys else None
    if named:  # a check across sections (the Recipe's own validators) names the key it is about
        keys = parse_path(named.group(1))
        message = message[named.end():]
    dotted = format_path(keys)
    line = line_of(text, keys)
    where = f"{path}:{line}" if line else str(path)
    if error["type"] not in ("missing", "extra_forbidden", "union_tag_invalid") and "input" in error:
        given = error["input"]
        if not isinstance(given, (dict, list)) and "got " not in message:  # never name the value twice
            message += f" (got {given!r})"
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return f"{where}: {dotted or '(top level)'}: {message}{more}"


def yaml_path(loc: tuple, raw) -> list:
    """pydantic's error location minus the union tags it inserts, i.e. the path in the YAML."""
    keys, node = [], raw
    for item in loc:
        if isinstance(node, dict) and item in node:
            keys.append(item)
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            keys.append(item)
            node = node[item]
        elif isinstance(node, dict) and isinstance(item, str) and item == node.get("kind"):
            continue  # a discriminated union's tag
        else:
            keys.append(item)  # a missing key: still part of the path
            node = None
    return keys


def parse_path(dotted: str) -> list:
    """format_path's inverse: "stages[0].allocation" -> ["stages", 0, "allocation"]."""
    return [int(part[1:-1]) if part.startswith("[") else part for part in re.findall(r"\[\d+\]|[^.\[\]]+", dotted)]


def format_path(keys: list) -> str:
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def line_of(text: str, keys: list) -> int | None:
    """1-based line of the deepest key of the path that exists in the YAML text."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for k in keys:
        if isinstance(node, yaml.MappingNode):
            match = next(((kn, vn) for kn, vn in node.value if kn.value == str(k)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            node = node.value[k]
            line = node.start_mark.line + 1
        else:
            break
    return line
