"""ATP's beta for any stage: the allocation's fixed one, or one chosen by search, each trial
compressing the whole model with the schedule of one beta and scored on the validation windows
(compress/algorithms/search.py chooses the betas; the block store gives each trial the stage's
input weights)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from torch import nn

from compress.algorithms.allocate import AtpAllocation
from compress.algorithms.search import golden_section
from compress.blocks.forward import perplexity
from compress.blocks.store import store_of
from compress.errors import CompressError

log = logging.getLogger("compress")


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
    and how the best one is kept is the block store's business (compress/blocks/store.py: spilled to
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


@dataclass
class Beta:
    beta: float | None  # None: the allocation is not ATP's
    search: list[dict] | None = None  # the trials, when beta was searched
    notes: list[str] = field(default_factory=list)  # the kept trial's
    collected: dict | None = None  # what the kept trial's pass collected; None: nothing compressed yet


def resolve_beta(model, ctx, allocation, modules: dict[str, nn.Module], beta_max: Callable[[], float], plan: Callable[[float], Hashable],
                 compress: Callable[[Hashable, list[str], dict], None], zeros_only: bool,
                 states: tuple[str, ...] = ("quant_state",)) -> Beta:
    """The stage's beta. With `beta: auto` the search runs compress(plan(beta), notes, collected)
    once per trial (collected: a dict of the trial's own, so that a later trial never overwrites
    what the kept one counted) and leaves the model compressed with the chosen beta; otherwise
    nothing is compressed here (collected None): the stage compresses once with its schedule."""
    if not isinstance(allocation, AtpAllocation):
        return Beta(None)
    if allocation.beta != "auto":
        return Beta(allocation.beta)
    kept: dict[Hashable, dict] = {}
    beta, trials, notes = search_beta(model, ctx, modules, beta_max(), allocation.trials, plan=plan,
                                      compress=lambda key, trial_notes: compress(key, trial_notes, kept.setdefault(key, {})),
                                      zeros_only=zeros_only, states=states)
    log.info("chosen beta %.5f from %d trials", beta, len(trials))
    return Beta(beta, trials, notes, kept.get(plan(beta), {}))
