"""Run a recipe: load the model -> cut the data -> dense eval -> stages in order -> eval -> export
-> report. Everything is written into a temporary folder beside output_dir, which replaces
output_dir only once complete: a run that fails leaves no half-written output and never touches an
earlier run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from compress import runinfo
from compress.context import StageContext
from compress.data import build_segments
from compress.errors import CompressError
from compress.evaluate import perplexity
from compress.export import hf
from compress.model import DTYPES, decoder_blocks, load_model, model_type
from compress.recipe import Recipe
from compress.report import write_report
from compress.stages import STAGES
from compress.zeroshot import zero_shot

log = logging.getLogger("compress")


@dataclass
class RunResult:
    output_dir: Path
    results: dict
    metadata: dict


def output_dir_for(recipe: Recipe, recipe_path: Path) -> Path:
    return Path(recipe.output_dir) if recipe.output_dir else Path("runs") / recipe_path.stem


@contextmanager
def staging_dir(final: Path):
    """A temporary folder next to `final`; removed if the body fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def run(recipe: Recipe, recipe_path: Path, overrides: list[str] = (), overwrite: bool = False) -> RunResult:
    final = output_dir_for(recipe, recipe_path)
    if final.exists() and not overwrite:
        raise CompressError(f"output_dir {final} already exists; pass --overwrite to replace it once the new run completes")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    timer = Timer()
    name = recipe.name or recipe_path.stem

    with staging_dir(final) as tmp:
        with timer("load_model"):
            m = recipe.model
            loaded = load_model(m.source, m.dtype, m.allow_pickle, m.trust_remote_code, m.revision, m.device)
        model = loaded.model
        log.info("loaded %s (%s, %d blocks)", loaded.resolved, model_type(model), len(decoder_blocks(model)))

        with timer("data"):
            d = recipe.data
            configs = {"calibration": d.calibration, "validation": d.validation, "evaluation": d.evaluation}
            if not recipe.eval.perplexity:
                configs.pop("evaluation")
            segments = build_segments(configs, loaded.tokenizer)

        ppl: dict[str, dict | None] = {"dense": None, "compressed": None}
        if recipe.eval.perplexity and recipe.eval.dense:
            with timer("eval_dense"):
                ppl["dense"] = perplexity(model, segments["evaluation"].tokens, recipe.eval.batch_size, "dense ppl").as_dict()
            log.info("dense perplexity %.3f", ppl["dense"]["ppl"])
        tasks: dict[str, dict | None] = {"dense": None, "compressed": None}
        e = recipe.eval
        if e.tasks and e.dense:
            with timer("tasks_dense"):
                tasks["dense"] = zero_shot(model, loaded.tokenizer, e.tasks, Path(e.tasks_dir), e.limit, e.tasks_batch_size)
            log.info("dense zero-shot mean accuracy %.4f", tasks["dense"]["mean_acc"])

        ctx = StageContext(segments["calibration"], segments.get("validation"), DTYPES[recipe.calibration_dtype])
        records = []
        for k, stage in enumerate(recipe.stages):
            ctx.stage_key = f"stages[{k}]"
            _, apply = STAGES[stage.kind]
            with timer(f"stage{k}_{stage.kind}"):
                model, record = apply(model, ctx, stage)
            records.append(record.as_dict())
            log.info("stage %d (%s) done: achieved %.4f in %.1f s", k, stage.kind, record.achieved, record.seconds)

        if recipe.eval.perplexity and recipe.stages:
            with timer("eval_compressed"):
                ppl["compressed"] = perplexity(model, segments["evaluation"].tokens, recipe.eval.batch_size, "compressed ppl").as_dict()
            log.info("compressed perplexity %.3f", ppl["compressed"]["ppl"])
        if e.tasks and recipe.stages:
            with timer("tasks_compressed"):
                tasks["compressed"] = zero_shot(model, loaded.tokenizer, e.tasks, Path(e.tasks_dir), e.limit, e.tasks_batch_size)
            log.info("compressed zero-shot mean accuracy %.4f", tasks["compressed"]["mean_acc"])

        export = {}
        if recipe.export.hf:
            with timer("export_hf"):
                export["files"] = hf.save_hf(model, loaded.tokenizer, tmp)
                if recipe.export.check:
                    probe = segments["calibration"].tokens[:2, :128]
                    export["parity"] = hf.check_parity(model, tmp, probe)
                    if not export["parity"]["identical"]:
                        raise CompressError(f"export check failed: reloaded logits differ by {export['parity']['max_abs_logit_diff']:g}")

        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        results = {
            "name": name,
            "model": {
                "source": loaded.source,
                "resolved": loaded.resolved,
                "kind": loaded.kind,
                "model_type": model_type(model),
                "blocks": len(decoder_blocks(model)),
                "params": params,
            },
            "data": {role: seg.describe() for role, seg in segments.items()},
            "perplexity": ppl,
            "zero_shot": tasks,
            "zero_shot_limit": e.limit,
            "stages": records,
            "size": {
                "params": params,
                "nonzero": nonzero,
                "safetensors_mb": round(sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 2**20, 2),
            },
            "export": export,
            "seconds": timer.seconds,
        }
        write_report(tmp, results)
        metadata = {
            "name": name,
            "recipe_file": str(recipe_path),
            "overrides": list(overrides),
            "recipe": recipe.model_dump(mode="json"),
            "recipe_sha256": recipe.sha256(),
            "seed": recipe.seed,
            "versions": runinfo.versions(),
            "git": runinfo.git_commit(),
            "machine": runinfo.machine(),
            "layer_achieved": {k: r["layer_achieved"] for k, r in enumerate(records)},
            "timings": timer.seconds,
            "peak_rss_mb": round(runinfo.peak_rss_mb(), 1),
            "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for filename, content in (("results.json", results), ("metadata.json", metadata)):
            (tmp / filename).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        publish(tmp, final)
    return RunResult(final, results, metadata)
