"""ATP's beta for any stage: the allocation's fixed one, or one chosen by search, each trial
compressing the whole model with the schedule of one beta (calibrated on a few windows) and scored
on the validation windows (compress/algorithms/search.py chooses the betas; the block store gives
each trial the stage's input weights)."""

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


@dataclass
class Compressed:
    """What one compression of the whole model left besides its weights."""

    notes: list[str] = field(default_factory=list)
    collected: dict = field(default_factory=dict)  # the stage's own counts; a trial never overwrites another's


def search_beta(model, ctx, modules: dict[str, nn.Module], beta_max: float, allocation: AtpAllocation,
                plan: Callable[[float], Hashable], compress: Callable[[Hashable, list[str], dict], None],
                zeros_only: bool, states: tuple[str, ...] = ("quant_state",)) -> tuple[float, list[dict], Compressed]:
    """Golden-section search of ATP's beta for any stage: each trial compresses the whole model
    with plan(beta) (compress(plan, notes, collected)), calibrated on allocation.trial_samples of
    the calibration windows, and is scored on the validation windows.

    Leaves the model compressed with the chosen beta: the chosen schedule compressed once more on
    every calibration window where the trials took fewer, else the best trial kept as it is (never
    compressed twice). Returns beta, the trials and what the kept compression left. How each trial
    starts from the stage's input weights and how the best one is kept is the block store's
    business (compress/blocks/trials.py): zeros_only (magnitude, Wanda) lets a resident store keep
    the best trial as a bit mask; `states` names the module attributes it keeps beside the weights.
    """
    if ctx.validation is None:
        raise CompressError(f"{ctx.stage_key}.allocation.beta: 'auto' needs validation data (data.validation)")
    windows = None if allocation.trial_samples == "all" else allocation.trial_samples
    scores: dict[Hashable, float] = {}  # rounding can map several betas to one plan: score it once
    used: dict[Hashable, int | None] = {}  # calibration windows each plan's trial took (None: all, or no data)
    best: dict = {"score": math.inf}
    with store_of(model).trials(modules, zeros_only, states, ctx.scratch_dir) as space:

        def trial(beta: float) -> float:
            key = plan(beta)
            if key not in scores:
                t, run = len(scores), Compressed()
                space.begin(t)
                try:
                    with ctx.calibrating_on(windows) as subset:
                        compress(key, run.notes, run.collected)
                    used[key] = subset.windows if subset.used else None
                    scores[key] = perplexity(model, ctx.validation.tokens, desc="validation").ppl
                finally:
                    space.end()
                log.info("  beta=%.5f  validation ppl %.3f%s", beta, scores[key], f" (calibrated on {used[key]} windows)" if used[key] else "")
                if scores[key] < best["score"]:
                    if used[key] is None:  # a trial on fewer windows is compressed again: nothing to keep
                        space.keep(t)
                    best.update(score=scores[key], key=key, trial=t, run=run)
            return scores[key]

        beta, trials_done = golden_section(trial, 0.0, beta_max, allocation.trials)
        chosen = plan(beta)
        if best.get("key") == chosen and used[chosen] is None:
            space.adopt(best["trial"])
            run = best["run"]
        else:  # calibrated on fewer windows (or every trial diverged): the chosen schedule on all of them
            space.adopt(None)
            run = Compressed()
            compress(chosen, run.notes, run.collected)
    return beta, [t.as_dict() | {"calibration_windows": used.get(plan(t.beta))} for t in trials_done], run


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
    once per trial (collected: a dict of the trial's own) and leaves the model compressed with the
    chosen beta; otherwise nothing is compressed here (collected None): the stage compresses once
    with its schedule."""
    if not isinstance(allocation, AtpAllocation):
        return Beta(None)
    if allocation.beta != "auto":
        return Beta(allocation.beta)
    beta, trials, kept = search_beta(model, ctx, modules, beta_max(), allocation, plan, compress, zeros_only, states)
    log.info("chosen beta %.5f from %d trials", beta, len(trials))
    return Beta(beta, trials, kept.notes, kept.collected)
