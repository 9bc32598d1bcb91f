"""Run a recipe: load the model -> cut the data -> dense eval -> stages in order -> eval -> export
-> report. Everything is written into a temporary folder beside output_dir, which replaces
output_dir only once complete: a run that fails leaves no half-written output and never touches an
earlier run.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from compress.blocks import devices, sources
from compress.blocks.forward import perplexity
from compress.blocks.runner import buffer_bytes
from compress.blocks.store import ResidentBlocks, store_of
from compress.data.windows import build_segments
from compress.errors import CompressError
from compress.evaluation import speed
from compress.evaluation.runtimes import open_runtime, runtime_perplexity
from compress.evaluation.zeroshot import check_task_names, zero_shot
from compress.export import EXPORTERS, preflight
from compress.export.reference import reference_for_run
from compress.model.anatomy import context_length, decoder_blocks, model_type
from compress.model.load import DTYPES, LoadedModel, load_model
from compress.reports.report import write_report
from compress.run import environment, identity
from compress.run.recipe import Recipe
from compress.run.staging import check_output_dir, output_dir_for, publish, staging_dir
from compress.stages import STAGES
from compress.stages.context import StageContext

log = logging.getLogger("compress")


@dataclass
class RunResult:
    output_dir: Path
    results: dict
    metadata: dict


@contextmanager
def cancelled_on_error(pending):
    """A background check (the GGUF converter's verdict) is stopped if the run fails before it is read."""
    try:
        yield
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise


class Phases:
    """Seconds and peak resident memory per phase of a run, so a report can say where the peak
    memory was reached (the peak only ever grows: the phase that raised it holds it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # process peak at the end of each phase

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            self.peak_rss_mb[name] = round(environment.peak_rss_mb(), 1)

    def memory(self) -> dict:
        peak, phase, before = 0.0, "start", 0.0
        for name, mb in self.peak_rss_mb.items():  # in the order the phases ended
            if mb > before:
                peak, phase = mb, name
            before = max(before, mb)
        gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
        return {"peak_rss_mb": peak, "peak_phase": phase, "peak_rss_mb_after": dict(self.peak_rss_mb), "peak_gpu_mb": gpu}


def weight_counts(model) -> tuple[int, dict]:
    """Nonzero parameters of the whole model, and the Linear layers inside decoder blocks: how many
    weights, the share that is exactly zero, and the bits per weight their checkpoint format stores
    (scales and zero points included). A streamed block is not read again for this: its file
    carries its counts (compress/blocks/store.py: block_counts)."""
    store = store_of(model)
    in_blocks = {id(p) for p in decoder_blocks(model).parameters()}
    # meta: a streamed block, counted below
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters() if id(p) not in in_blocks and p.device.type != "meta")
    weights = zeros = bits = 0
    for i in range(store.count):
        counted = store.counts(i)
        nonzero += counted["nonzero"]
        weights += counted["weights"]
        zeros += counted["zeros"]
        bits += counted["bits"]
    return nonzero, {
        "block_linear_weights": weights,
        "block_linear_sparsity": zeros / weights,
        "block_linear_bits_per_weight": bits / weights,
    }


def export_all(recipe: Recipe, loaded, tmp: Path, scratch: Path, segments: dict, phases) -> dict:
    """Save every export the recipe names while the model is in memory (each verifies its bytes;
    a streamed model's blocks are read in turn), take the reference outputs, free the model, then
    reload each export in its own runtime. Any mismatch fails the run. Returns {exporter name: info}."""
    selected = recipe.export.selected()
    model, exports = loaded.model, {}
    for name, cfg in selected:
        exporter = EXPORTERS[name]
        dest = tmp / exporter.subdir  # "" for the top of the run folder
        with phases(f"export_{name}"):
            exports[name] = exporter.save(model, loaded.tokenizer, dest, cfg, scratch / name)
            if recipe.export.check and exporter.verify is not None:
                exports[name].update(exporter.verify(model, dest, exports[name], cfg))
    if not (selected and recipe.export.check):
        return exports
    with phases("export_reference"):
        ref = reference_for_run(model, loaded.tokenizer, segments, recipe.export.check_windows)
    # The checks reload each export into a second model: the in-memory one must be gone first.
    loaded.model = model = None
    gc.collect()
    for name, cfg in selected:
        exporter = EXPORTERS[name]
        with phases(f"check_{name}"):
            exports[name].update(exporter.check(tmp / exporter.subdir, exports[name], ref, cfg))
    return exports


def export_sizes(folder: Path, exports: dict) -> dict:
    """MB on disk of each export: the HF folder's weights, each GGUF file, the ONNX folder."""
    sizes = {}
    if "hf" in exports:
        sizes["hf"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20, 2)
    for kind, entry in exports.get("gguf", {}).get("files", {}).items():
        sizes[f"gguf {kind}"] = entry["mb"]
    if "onnx" in exports:
        sizes["onnx"] = round(sum(f.stat().st_size for f in (folder / EXPORTERS["onnx"].subdir).rglob("*") if f.is_file() and "onnx" in f.name) / 2**20, 2)
    return sizes


def tasks_dir(e) -> Path | None:
    return Path(e.tasks_dir) if e.tasks_dir else None


def speed_tokens(segments: dict) -> list[int]:
    """Real text for the speed measurement: the evaluation windows (or calibration ones) in a row."""
    seg = segments.get("evaluation") or segments["calibration"]
    return seg.tokens.flatten()[: max(speed.PREFILL) + speed.PROMPT + 1].tolist()


def artefacts(recipe: Recipe, folder: Path, exports: dict) -> list[tuple[str, str, Path]]:
    """(label, kind, path) of every exported artefact eval.artefacts names, in its order."""
    out = []
    for item in recipe.eval.artefacts:
        kind, _, gguf_type = item.partition(":")
        if kind == "hf":
            out.append(("hf", "hf", folder))
        elif kind == "onnx":
            out.append(("onnx", "onnx", folder / EXPORTERS["onnx"].subdir))
        elif kind == "gguf":
            for typ, entry in exports["gguf"]["files"].items():
                if gguf_type in ("", typ):
                    out.append((f"gguf {typ}", "gguf", folder / EXPORTERS["gguf"].subdir / entry["file"]))
    return out


def evaluate_artefact(recipe: Recipe, label: str, kind: str, path: Path, folder: Path, segments: dict, bos) -> dict:
    """Perplexity, zero-shot accuracy and speed of one exported file, in its own runtime (the
    numbers a user of that file gets)."""
    e = recipe.eval
    entry: dict = {"artefact": kind, "path": str(path.relative_to(folder)) or "."}
    runtime = open_runtime(kind, path, label)
    try:
        if e.perplexity:
            entry["perplexity"] = runtime_perplexity(runtime, segments["evaluation"].tokens).as_dict()
            log.info("%s perplexity %.3f", label, entry["perplexity"]["ppl"])
        if e.tasks:
            entry["zero_shot"] = zero_shot(None, None, e.tasks, tasks_dir(e), e.limit, e.tasks_batch_size, bos,
                                           lm=runtime.lm(e.tasks_batch_size, bos))
            log.info("%s zero-shot mean accuracy %.4f", label, entry["zero_shot"]["mean_acc"])
        if e.speed:
            entry["speed"] = speed.runtime_rates(runtime, speed_tokens(segments), e.speed_repeats)
    finally:
        runtime.close()
    return entry


def check_context(configs: dict, config, dtype: torch.dtype | None = None) -> None:
    """Windows longer than the model's context would run past its position embeddings, and
    calibration buffers larger than the machine's memory would swap for hours. configs: {role:
    SegmentsConfig}; config: the model's config; dtype: the calibration passes' (None: not checked)."""
    longest = context_length(config)
    for role, data in configs.items():
        if longest is not None and data.seqlen > longest:
            raise CompressError(f"data.{role}.seqlen: {data.seqlen} is beyond the model's context length ({longest} tokens)")
    cal = configs.get("calibration")
    hidden = getattr(getattr(config, "text_config", None) or config, "hidden_size", None)
    available = environment.memory_bytes()
    if dtype is None or cal is None or hidden is None or available is None:
        return
    need = buffer_bytes(cal.nsamples or 128, cal.seqlen, hidden, dtype)
    if need > available:
        raise CompressError(f"data.calibration: {cal.nsamples or 128} windows of {cal.seqlen} tokens need {need / 2**30:.1f} GiB for one block's "
                            f"inputs and outputs (hidden size {hidden}), more than the {available / 2**30:.1f} GiB this machine has free; "
                            "lower nsamples or seqlen")


def run(recipe: Recipe, recipe_path: Path, overrides: list[str] = (), overwrite: bool = False, restart: bool = False) -> RunResult:
    final = output_dir_for(recipe, recipe_path)
    check_output_dir(final, overwrite)
    with torch_threads(recipe.threads):
        return _run(recipe, recipe_path, final, list(overrides), restart)


@contextmanager
def torch_threads(threads: int | None):
    """torch's thread count for the run, restored afterwards (it is process-wide)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Measures:
    """Perplexity and zero-shot accuracy of the in-memory model, dense and compressed, as a run
    measures them (eval.perplexity, eval.tasks), and the phases that took them."""

    def __init__(self, recipe: Recipe, tokenizer, segments: dict, phases: Phases):
        self.e, self.tokenizer, self.segments, self.phases = recipe.eval, tokenizer, segments, phases
        self.ppl: dict[str, dict | None] = {"dense": None, "compressed": None}
        self.tasks: dict[str, dict | None] = {"dense": None, "compressed": None}
        self.bos = segments["evaluation"].bos if self.e.perplexity else None

    def measure(self, model, which: str) -> None:
        e = self.e
        if e.perplexity:
            with self.phases(f"eval_{which}"):
                self.ppl[which] = perplexity(model, self.segments["evaluation"].tokens, e.batch_size, f"{which} ppl").as_dict()
            log.info("%s perplexity %.3f", which, self.ppl[which]["ppl"])
        if e.tasks:
            with self.phases(f"tasks_{which}"), devices.dispatched(model):
                self.tasks[which] = zero_shot(model, self.tokenizer, e.tasks, tasks_dir(e), e.limit, e.tasks_batch_size, self.bos)
            log.info("%s zero-shot mean accuracy %.4f", which, self.tasks[which]["mean_acc"])


def load_for_run(recipe: Recipe, tmp: Path, phases: Phases) -> LoadedModel:
    """The recipe's model, streamed or in memory, with its devices and a block store that keeps
    what a resumed run needs in the staging folder."""
    m = recipe.model
    with phases("load_model"):
        if m.stream:  # blocks stay on disk (compress/blocks/sources.py)
            model, tokenizer, path = sources.load_streamed(m.source, DTYPES[m.dtype], tmp)
            loaded = LoadedModel(model, tokenizer, m.source, str(path), "folder")
        else:
            loaded = load_model(m.source, m.dtype, m.allow_pickle, m.trust_remote_code, m.revision)
    devices.attach(loaded.model, m.device)  # the weights stay in CPU RAM; blocks visit the GPU (compress/blocks/devices.py)
    if getattr(loaded.model, "block_store", None) is None:  # in memory: the store keeps what a resumed run needs
        loaded.model.block_store = ResidentBlocks(loaded.model, tmp)
    log.info("loaded %s (%s, %d blocks)", loaded.resolved, model_type(loaded.model), len(decoder_blocks(loaded.model)))
    return loaded


def prepare_data(recipe: Recipe, loaded: LoadedModel, phases: Phases) -> tuple[dict, Measures]:
    """The windows of every role, and the dense measurement, while the GGUF converter's verdict
    runs beside them (waited for before the first stage)."""
    e, model = recipe.eval, loaded.model
    pending = preflight(recipe.export, model, loaded.tokenizer, recipe.quantises(), recipe.narrows())
    with cancelled_on_error(pending):
        with phases("data"):
            configs = recipe.data_roles()
            check_context(configs, model.config, DTYPES[recipe.calibration_dtype])
            segments = build_segments(configs, loaded.tokenizer)
        measures = Measures(recipe, loaded.tokenizer, segments, phases)
        # With no stages the dense model is the result: it is measured once, as dense.
        # (a run without stages measures the in-memory model only when eval.artefacts names it)
        if (e.dense if recipe.stages else "model" in e.artefacts):
            measures.measure(model, "dense")
    if pending is not None:
        with phases("export_preflight"):
            pending.result()
    return segments, measures


def run_stages(recipe: Recipe, model, segments: dict, scratch: Path, phases: Phases):
    """Every stage in order, each skipped when an earlier run of this recipe finished it; returns
    the model and the stages' records."""
    store = store_of(model)
    ctx = StageContext(segments["calibration"], segments.get("validation"), DTYPES[recipe.calibration_dtype], scratch_dir=scratch)
    records = []
    for k, stage in enumerate(recipe.stages):
        ctx.stage_key = f"stages[{k}]"
        _, apply = STAGES[stage.kind]
        store.begin_stage(k)
        if store.stage_done(k):  # finished before the run was killed
            records.append(store.record(k))
            log.info("stage %d (%s) finished in an earlier run: resumed after it", k, stage.kind)
            continue
        with phases(f"stage{k}_{stage.kind}"):
            model, record = apply(model, ctx, stage)
        records.append(record.as_dict())
        store.end_stage(k, records[-1])
        log.info("stage %d (%s) done: %s in %.1f s", k, stage.kind, record.summary(), record.seconds)
    store.settle()  # a resumed run's blocks as its finished stages left them
    return model, records


def model_evaluation(recipe: Recipe, model, measures: Measures, segments: dict, phases: Phases) -> dict:
    """results.json's evaluations["model"] (the compressed model in memory, or the dense one of a
    run without stages) when eval.artefacts names it."""
    e = recipe.eval
    if "model" not in e.artefacts:
        return {}
    if recipe.stages:
        measures.measure(model, "compressed")
    which = "compressed" if recipe.stages else "dense"
    entry = {"artefact": "model", "path": None, "perplexity": measures.ppl[which], "zero_shot": measures.tasks[which]}
    if e.speed:
        with phases("speed_model"), devices.dispatched(model):
            entry["speed"] = speed.torch_rates(model, speed_tokens(segments), e.speed_repeats)
    return {"model": entry}


def model_counts(model) -> dict:
    """What results.json's size table counts in the compressed model, taken before it is freed."""
    nonzero, linears = weight_counts(model)
    return {"params": sum(p.numel() for p in model.parameters()), "nonzero": nonzero, "linears": linears,
            "dense_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}  # the model as plain tensors


def model_size(counts: dict, params_dense: int, tmp: Path, export: dict) -> dict:
    return {"params": counts["params"], "params_dense": params_dense, "nonzero": counts["nonzero"],
            "safetensors_mb": round(sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 2**20, 2),
            "files_mb": export_sizes(tmp, export), "dense_mb": round(counts["dense_mb"], 2), **counts["linears"]}


def run_metadata(recipe: Recipe, recipe_path: Path, overrides: list[str], run_id: str, records: list, phases: Phases,
                 name: str, started: str) -> dict:
    return {
        "name": name,
        "recipe_file": str(recipe_path),
        "overrides": list(overrides),
        "recipe": recipe.model_dump(mode="json"),
        "recipe_sha256": recipe.sha256(),
        "run_id": run_id,
        "seed": recipe.seed,
        "versions": environment.versions(),
        "git": environment.git_commit(),
        "machine": environment.machine(),
        "layer_achieved": {k: r["layer_achieved"] for k, r in enumerate(records) if "layer_achieved" in r},
        "layer_bits": {k: r["layer_bits"] for k, r in enumerate(records) if "layer_bits" in r},
        "timings": phases.seconds,
        "peak_rss_mb": round(environment.peak_rss_mb(), 1),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _run(recipe: Recipe, recipe_path: Path, final: Path, overrides: list[str], restart: bool = False) -> RunResult:
    torch.manual_seed(recipe.seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    phases, name = Phases(), recipe.name or recipe_path.stem
    run_id = identity.run_id(recipe)  # before anything is read: the files as they were when the run began
    devices.check(recipe.model.device)  # one line, before minutes of loading
    check_task_names(recipe.eval.tasks)  # an unknown lm-eval task fails here, not after compressing
    with staging_dir(final, run_id, restart) as tmp:
        loaded = load_for_run(recipe, tmp, phases)
        model, store = loaded.model, store_of(loaded.model)
        params_dense = sum(p.numel() for p in model.parameters())  # structured / low-rank stages change it
        model_info = {"source": loaded.source, "resolved": loaded.resolved, "kind": loaded.kind, "model_type": model_type(model),
                      "blocks": len(decoder_blocks(model)), "params": params_dense}
        segments, measures = prepare_data(recipe, loaded, phases)
        scratch = tmp / ".scratch"  # spilled snapshots (beta search); never published
        model, records = run_stages(recipe, model, segments, scratch, phases)
        evaluations = model_evaluation(recipe, model, measures, segments, phases)
        counts = model_counts(model)
        loaded.model, model = model, None  # export_all frees it before reloading the exports
        export = export_all(recipe, loaded, tmp, scratch, segments, phases)
        shutil.rmtree(scratch, ignore_errors=True)
        store.close()  # block versions and checkpoints: the export holds the result
        loaded.model = None  # the artefacts are evaluated from their files, one at a time
        gc.collect()
        for label, kind, path in artefacts(recipe, tmp, export):
            with phases(f"eval_{label.replace(' ', '_')}"):
                evaluations[label] = evaluate_artefact(recipe, label, kind, path, tmp, segments, measures.bos)
        results = {"name": name, "model": model_info, "data": {role: seg.describe() for role, seg in segments.items()},
                   "perplexity": measures.ppl, "zero_shot": measures.tasks, "zero_shot_limit": recipe.eval.limit,
                   "evaluations": evaluations, "stages": records, "size": model_size(counts, params_dense, tmp, export), "export": export,
                   "seconds": phases.seconds, "memory": phases.memory()}
        write_report(tmp, results)
        metadata = run_metadata(recipe, recipe_path, overrides, run_id, records, phases, name, started)
        for filename, content in (("results.json", results), ("metadata.json", metadata)):
            (tmp / filename).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        publish(tmp, final)
    return RunResult(final, results, metadata)
