import math

import pytest
import torch

from compress.algorithms import allocate
from compress.algorithms.search import golden_section
from compress.errors import CompressError


def test_atp_formula_matches_paper():
    L, S, beta = 30, 0.7, 0.004
    ratios = allocate.atp(L, S, beta)
    for i in range(L):
        assert ratios[i].item() == pytest.approx(S - beta * (L - 1) / 2 + i * beta, abs=1e-6)
    assert ratios.mean().item() == pytest.approx(S, abs=1e-6)
    assert torch.all(ratios[1:] > ratios[:-1])  # rises with depth


def test_atp_beta_zero_is_uniform():
    assert torch.equal(allocate.atp(12, 0.5, 0.0), allocate.uniform(12, 0.5))


@pytest.mark.parametrize("L,S", [(30, 0.7), (30, 0.3), (32, 0.5), (2, 0.6)])
def test_atp_legality_bound(L, S):
    bound = 2 * min(S, 1 - S) / (L - 1)
    inside = allocate.atp(L, S, bound * 0.999)
    assert inside.min() >= 0 and inside.max() < 1
    with pytest.raises(CompressError, match=r"beta must be in \[0, "):
        allocate.atp(L, S, bound * 1.01)


def test_atp_error_states_legal_range():
    with pytest.raises(CompressError) as err:
        allocate.atp(30, 0.7, 0.05)
    assert f"{2 * 0.3 / 29:.6g}" in str(err.value)


def test_beta_max_keeps_ratios_below_cap():
    L, S = 30, 0.7
    r = allocate.atp(L, S, allocate.atp_beta_max(L, S))
    assert r.max().item() == pytest.approx(allocate.MAX_RATIO, abs=1e-6)


SIZES = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 5.0])
EQUAL = torch.ones(6)

# (allocator, block sizes it is told about): uniform and atp assume equal blocks
ALLOCATORS = {
    "uniform": (lambda S: allocate.uniform(6, S), EQUAL),
    "atp": (lambda S: allocate.atp(6, S, 0.05 * min(S, 1 - S)), EQUAL),
    "owl": (lambda S: allocate.owl([0.01, 0.05, 0.02, 0.0, 0.03, 0.04], S, 0.08, SIZES), SIZES),
    "alpha": (lambda S: allocate.alpha([3.1, 2.5, 4.0, 5.5, 3.3, 2.9], S, 0.3, SIZES), SIZES),
    "explicit": (lambda S: allocate.explicit([S - 0.02, S + 0.02, S, S, S - 0.01, S + 0.01], 6), EQUAL),
}


@pytest.mark.parametrize("name", ALLOCATORS)
@pytest.mark.parametrize("S", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_weighted_mean_is_exact(name, S):
    make, sizes = ALLOCATORS[name]
    r = make(S)
    assert allocate.weighted_mean(r, sizes) == pytest.approx(S, abs=1e-6)
    assert r.min() >= 0 and r.max() <= allocate.MAX_RATIO


def test_owl_more_outliers_less_pruning():
    r = allocate.owl([0.10, 0.01, 0.05], 0.5, 0.08)
    assert r[0] < r[2] < r[1]
    assert (r.max() - r.min()).item() == pytest.approx(0.16, abs=1e-6)


def test_alpha_higher_alpha_more_pruning():
    r = allocate.alpha([2.0, 6.0, 4.0], 0.5, 0.3)
    assert r[0] < r[2] < r[1]
    assert r.mean().item() == pytest.approx(0.5, abs=1e-6)


def test_fit_mean_clips_and_keeps_mean():
    r = allocate.fit_mean(torch.tensor([0.2, 0.95, 1.3, 0.9]), torch.ones(4), 0.8)
    assert r.max() <= allocate.MAX_RATIO
    assert r.mean().item() == pytest.approx(0.8, abs=1e-6)


def test_explicit_needs_one_ratio_per_block():
    assert allocate.explicit([0.1, 0.2], 2).tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(CompressError, match="3 blocks"):
        allocate.explicit([0.1, 0.2], 3)


def test_hill_alpha_heavier_tail_gives_lower_alpha():
    torch.manual_seed(0)
    gaussian = torch.randn(256, 128)
    heavy = torch.distributions.StudentT(1.5).sample((256, 128))
    assert allocate.hill_alpha(heavy) < allocate.hill_alpha(gaussian)


def test_outlier_share():
    scores = [torch.tensor([1.0] * 99 + [1000.0])]
    assert allocate.outlier_share(scores, 5.0) == pytest.approx(0.01)


def test_quantize_ratios_keeps_total_and_order():
    ratios = allocate.atp(8, 0.5, 0.05)  # 0.325 .. 0.675
    zeros = allocate.quantize_ratios(ratios, 8)
    assert sum(zeros) == 8 * 4  # mean exactly 4 zeros of 8
    assert zeros == sorted(zeros)
    assert all(1 <= 8 - z <= 8 for z in zeros)


# ---------------------------------------------------------------- beta search


def test_search_returns_zero_when_uniform_is_best():
    calls = []

    def f(beta):  # every beta > 0 is worse than uniform
        calls.append(beta)
        return 10.0 + 100 * beta

    best, trials = golden_section(f, 0.0, 0.02, trials=5)
    assert best == 0.0
    assert calls[0] == 0.0 and len(trials) == 5


def test_search_finds_interior_minimum():
    best, trials = golden_section(lambda b: (b - 0.012) ** 2 + 1, 0.0, 0.02, trials=8)
    assert abs(best - 0.012) < 0.002
    assert len(trials) == 8 and trials[0].beta == 0.0


def test_search_treats_nan_as_worst():
    best, trials = golden_section(lambda b: math.nan if b > 0 else 5.0, 0.0, 1.0, trials=3)
    assert best == 0.0 and trials[1].score == math.inf
