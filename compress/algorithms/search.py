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
from collections.abc import Callable
from dataclasses import asdict, dataclass

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


