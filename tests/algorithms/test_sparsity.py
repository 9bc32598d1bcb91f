import pytest
import torch

from compress.algorithms.accumulators import Hessian, InputNorms
from compress.algorithms.obs import sparsegpt_prune
from compress.algorithms.sparsity import is_nm, matrix_mask, nm_mask, row_mask, wanda_score
from compress.errors import CompressError


def test_wanda_score_is_abs_weight_times_input_norm():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norm2 = torch.tensor([4.0, 9.0])
    assert torch.equal(wanda_score(W, norm2), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_row_mask_prunes_same_count_in_every_row(sparsity):
    score = torch.rand(8, 16)
    mask = row_mask(score, sparsity)
    assert mask.sum(dim=1).tolist() == [round(sparsity * 16)] * 8
    # the removed scores are the smallest of their row
    for row, m in zip(score, mask):
        if m.any() and (~m).any():
            assert row[m].max() <= row[~m].min()


def test_matrix_mask_count():
    mask = matrix_mask(torch.rand(8, 16), 0.3)
    assert mask.sum().item() == round(0.3 * 128)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_valid_on_every_row(n, m):
    W = torch.randn(8, 16)
    mask = nm_mask(W.abs(), n, m)
    W[mask] = 0
    assert is_nm(W, n, m)
    groups = (W.reshape(8, 16 // m, m) != 0).sum(dim=2)
    assert torch.all(groups == n)


def test_input_norms_and_hessian_match_direct_formulas():
    X = torch.randn(3, 10, 6)  # 3 segments, 10 tokens, 6 inputs
    norms, hess = InputNorms(6), Hessian(6)
    for x in X:
        norms.add(x.unsqueeze(0))
        hess.add(x.unsqueeze(0))
    flat = X.reshape(-1, 6)
    assert torch.allclose(norms.norm2, (flat**2).mean(0), atol=1e-6)
    assert torch.allclose(hess.H, 2 * flat.t() @ flat / flat.shape[0], atol=1e-5)
    assert torch.equal(hess.H, hess.H.t())  # only the upper block triangle is accumulated


def test_hessian_takes_bfloat16_and_strided_inputs():
    X = torch.randn(2, 7, 12)
    direct, strided = Hessian(6), Hessian(6)
    for x in X:
        half = x[:, ::2]  # every other column: a non-contiguous view
        direct.add(half.contiguous().unsqueeze(0))
        strided.add(half.unsqueeze(0))
    assert torch.allclose(strided.H, direct.H, atol=1e-6)
    bf16 = Hessian(12)
    bf16.add(X.bfloat16())
    exact = X.bfloat16().float().reshape(-1, 12)
    assert torch.allclose(bf16.H, 2 * exact.t() @ exact / 14, atol=1e-5)


def _layer_problem(rows=16, cols=64, tokens=512, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(rows, cols)
    # correlated inputs whose columns differ in scale at random, as real activations do
    mixing = torch.randn(cols, cols) * 0.3 + torch.eye(cols)
    X = (torch.randn(tokens, cols) @ mixing) * torch.exp(torch.randn(cols))
    H = 2 * X.t() @ X / tokens
    return W, X, H


def _error(W, W_new, X):
    return ((X @ W.t() - X @ W_new.t()) ** 2).mean().item()


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction(nm, seed):
    W, X, H = _layer_problem(seed=seed)
    pruned, _, _ = sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=32)
    magnitude, wanda = W.clone(), W.clone()
    if nm is None:
        magnitude[row_mask(W.abs(), 0.5)] = 0
        wanda[row_mask(wanda_score(W, (X**2).mean(0)), 0.5)] = 0
    else:
        magnitude[nm_mask(W.abs(), *nm)] = 0
        wanda[nm_mask(wanda_score(W, (X**2).mean(0)), *nm)] = 0
        assert is_nm(pruned, *nm)
    assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=1 / 64)
    e_sgpt, e_mag, e_wanda = _error(W, pruned, X), _error(W, magnitude, X), _error(W, wanda, X)
    assert e_sgpt < e_wanda < e_mag


def test_sparsegpt_handles_dead_inputs():
    W, X, H = _layer_problem(cols=32)
    H[3, :] = 0
    H[:, 3] = 0
    pruned, damp, _ = sparsegpt_prune(W, H, 0.5, blocksize=16)
    assert torch.isfinite(pruned).all() and pruned[:, 3].eq(0).all() and damp == 0.01


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_needs_columns_in_whole_groups(method):
    W, X, H = _layer_problem(cols=60)  # 60 inputs: 7 groups of 8 and 4 left over
    with pytest.raises(CompressError, match="divisible by 8, got 60"):
        if method == "sparsegpt":
            sparsegpt_prune(W, H, 0.5, nm=(4, 8), blocksize=32)
        else:
            nm_mask(W.abs(), 4, 8)
