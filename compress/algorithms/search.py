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

from compress.blocks.store import store_of
from compress.errors import CompressError
from compress.blocks.forward import perplexity

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
    beta, the trials and the winner's notes. How each trial starts from the stage's input weights
    and how the best one is kept is the block store's business (compress/blocks.py: spilled to
    disk for resident blocks, a trial's own block files for streamed ones): zeros_only (magnitude,
    Wanda) lets a resident store keep the best trial as a bit mask; `states` names the module
    attributes it keeps beside the weights.
    """
    if ctx.validation is None:
        raise CompressError(f"{ctx.stage_key}.allocation.beta: 'auto' needs validation data (data.validation)")
    scores: dict[Hashable, float] = {}  # rounding can map several betas to one plan: score it once
    best: dict = {"score": math.inf}
    with store_of(model).trials(modules, zeros_only, states, ctx.scratch_dir) as space:

        def trial(beta: float) -> float:
            key = plan(beta)
            if key not in scores:
                t, trial_notes = len(scores), []
                space.begin(t)
                try:
                    compress(key, trial_notes)
                    scores[key] = perplexity(model, ctx.validation.tokens, desc="validation").ppl
                finally:
                    space.end()
                log.info("  beta=%.5f  validation ppl %.3f", beta, scores[key])
                if scores[key] < best["score"]:
                    space.keep(t)
                    best.update(score=scores[key], key=key, trial=t, notes=trial_notes)
            return scores[key]

        beta, trials_done = golden_section(trial, 0.0, beta_max, trials)
        chosen, notes = plan(beta), []
        if best.get("key") == chosen:
            space.adopt(best["trial"])
            notes = best["notes"]
        else:  # every trial scored inf (diverged): compress once more with the beta returned
            space.adopt(None)
            compress(chosen, notes)
    return beta, [t.as_dict() for t in trials_done], notes
