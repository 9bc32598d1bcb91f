"""Choosing ATP's beta with a few full trials, scored on held-out validation text.

The reference script tried beta = 0.002, 0.004, ... and kept the lowest *test* perplexity. Here
beta = 0 (uniform) is always the first trial, so the chosen schedule is never worse than uniform
on the validation split, and the rest of the budget goes to a golden-section search over the legal
range (validation perplexity against beta is close to unimodal: it falls while early blocks are
spared, then rises once the last blocks are pruned too hard).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass

from torch import nn

from compress.errors import CompressError
from compress.evaluate import perplexity
from compress.spill import WeightFile, ZeroMask, scratch_folder

log = logging.getLogger("compress")

INV_PHI = (math.sqrt(5) - 1) / 2  # 0.618...


@dataclass
class Trial:
    beta: float
    score: float  # validation perplexity (lower is better)
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def golden_section(f: Callable[[float], float], lo: float, hi: float, trials: int) -> tuple[float, list[Trial]]:
    """Minimise f over [lo, hi] with at most `trials` calls, f(lo) first.

    Returns the best point seen (ties go to the smaller beta, i.e. closer to uniform) and every trial.
    """
    log: list[Trial] = []

    def score(x: float) -> float:
        start = time.perf_counter()
        y = f(x)
        y = y if math.isfinite(y) else math.inf
        log.append(Trial(beta=x, score=y, seconds=time.perf_counter() - start))
        return y

    score(lo)
    a, b = lo, hi
    if trials >= 2 and hi > lo:
        x1 = b - INV_PHI * (b - a)
        f1 = score(x1)
        if trials >= 3:
            x2 = a + INV_PHI * (b - a)
            f2 = score(x2)
            while len(log) < trials:
                if f1 <= f2:  # the minimum lies in [a, x2]
                    b, x2, f2 = x2, x1, f1
                    x1 = b - INV_PHI * (b - a)
                    f1 = score(x1)
                else:  # in [x1, b]
                    a, x1, f1 = x1, x2, f2
                    x2 = a + INV_PHI * (b - a)
                    f2 = score(x2)
    best = min(log, key=lambda t: (t.score, t.beta))
    return best.beta, log


def search_beta(
    model,
    ctx,
    modules: dict[str, nn.Module],
    beta_max: float,
    trials: int,
    plan: Callable[[float], Hashable],
    compress: Callable[[Hashable, list[str]], None],
    zeros_only: bool,
    states: tuple[str, ...] = ("quant_state",),
) -> tuple[float, list[dict], list[str]]:
    """Golden-section search of ATP's beta for any stage: each trial compresses the whole model
    with plan(beta) (compress(plan, notes)) and scores it on the validation windows.

    Leaves the model compressed with the chosen beta, never compressing the winner twice; returns
    beta, the trials and the winner's notes. No whole copy of the weights stays in memory (see
    compress/spill.py): the weights every trial starts from are spilled to disk, and the best
    trial is kept as a bit mask where the stage only zeroes weights (zeros_only: magnitude,
    Wanda), or spilled to disk otherwise, with the module attributes named in `states` (the
    quantisation grid; the low-rank stage's factors) held in memory.
    """
    if ctx.validation is None:
        raise CompressError(f"{ctx.stage_key}.allocation.beta: 'auto' needs validation data (data.validation)")
    store = getattr(model, "block_store", None)
    if store is not None:
        return streamed_search(model, ctx, store, beta_max, trials, plan, compress)
    scores: dict[Hashable, float] = {}  # rounding can map several betas to one plan: score it once
    best: dict = {"score": math.inf}
    with scratch_folder(ctx.scratch_dir) as folder:
        start = WeightFile(folder / "start.bin", modules)
        start.save()
        best_weights = WeightFile(folder / "best.bin", modules)

        def trial(beta: float) -> float:
            key = plan(beta)
            if key not in scores:
                if scores:
                    start.load()
                trial_notes: list[str] = []
                compress(key, trial_notes)
                scores[key] = perplexity(model, ctx.validation.tokens, desc="validation").ppl
                log.info("  beta=%.5f  validation ppl %.3f", beta, scores[key])
                if scores[key] < best["score"]:
                    if zeros_only:
                        best["mask"] = ZeroMask(modules)
                    else:
                        best_weights.save()
                        best["states"] = {name: {a: getattr(m, a, None) for a in states} for name, m in modules.items()}
                    best.update(score=scores[key], key=key, notes=trial_notes)
            return scores[key]

        beta, trials_done = golden_section(trial, 0.0, beta_max, trials)
        chosen, notes = plan(beta), []
        if best.get("key") == chosen:
            if zeros_only:
                start.load()
                best["mask"].apply()
            else:
                best_weights.load()
                for name, kept in best["states"].items():
                    for attr, state in kept.items():
                        setattr(modules[name], attr, state)
            notes = best["notes"]
        else:  # every trial scored inf (diverged): compress once more with the beta returned
            start.load()
            compress(chosen, notes)
    return beta, [t.as_dict() for t in trials_done], notes


def streamed_search(model, ctx, store, beta_max: float, trials: int, plan, compress) -> tuple[float, list[dict], list[str]]:
    """search_beta for a streamed model (compress/stream.py): every trial reads the stage's input
    blocks from disk and writes its own; the winner's files are adopted."""
    scores: dict[Hashable, float] = {}
    best: dict = {"score": math.inf}

    def trial(beta: float) -> float:
        key = plan(beta)
        if key not in scores:
            t, trial_notes = len(scores), []
            store.begin_trial(t)
            try:
                compress(key, trial_notes)
                scores[key] = perplexity(model, ctx.validation.tokens, desc="validation").ppl
            finally:
                store.end_trial()
            log.info("  beta=%.5f  validation ppl %.3f", beta, scores[key])
            if scores[key] < best["score"]:
                best.update(score=scores[key], key=key, trial=t, notes=trial_notes)
        return scores[key]

    beta, trials_done = golden_section(trial, 0.0, beta_max, trials)
    chosen, notes = plan(beta), []
    if best.get("key") == chosen:
        store.adopt_trial(best["trial"])
        notes = best["notes"]
    else:  # every trial scored inf (diverged): compress once more with the beta returned
        store.adopt_trial(-1)  # drops every trial's files
        compress(chosen, notes)
    return beta, [t.as_dict() for t in trials_done], notes
