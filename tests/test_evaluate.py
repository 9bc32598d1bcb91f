import pytest
import math

import torch

from compress.evaluate import perplexity
from conftest import tiny_model


def test_perplexity_equals_independent_computation():
    model = tiny_model("llama")
    tokens = torch.randint(0, 256, (3, 20))
    result = perplexity(model, tokens, batch_size=2)
    # independent: token by token, log_softmax, no batching, no cross_entropy
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in tokens:
            logp = torch.log_softmax(model(row.unsqueeze(0)).logits[0].double(), dim=-1)
            for t in range(1, len(row)):
                nll -= logp[t - 1, row[t]].item()
                count += 1
    assert result.tokens == count == 3 * 19
    assert (result.windows, result.seqlen) == (3, 20)
    assert result.nll == pytest.approx(nll / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_batch_size_does_not_change_perplexity():
    model = tiny_model("gpt2")
    tokens = torch.randint(0, 256, (4, 16))
    assert abs(perplexity(model, tokens, 1).nll - perplexity(model, tokens, 4).nll) < 1e-5
