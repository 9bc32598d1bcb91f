import math

import pytest
import torch

from compress.blocks.forward import perplexity

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


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_bos_windows_perplexity_equals_token_by_token_with_bos(arch, bos_tokenizer):
    """With a BOS-adding tokenizer every window is BOS + text; perplexity scores the text tokens
    only, and equals a token-by-token computation that prepends BOS to each window's text."""
    from compress.data.windows import SegmentsConfig, build_segments

    model = tiny_model(arch)
    seg = build_segments({"evaluation": SegmentsConfig(source="python-docs", nsamples=3, seqlen=24)}, bos_tokenizer)["evaluation"]
    assert seg.bos and (seg.tokens[:, 0] == bos_tokenizer.bos_token_id).all()
    result = perplexity(model, seg.tokens)
    bos = torch.tensor([bos_tokenizer.bos_token_id])
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in seg.tokens[:, 1:]:  # the 23 text tokens of each window
            for t in range(len(text)):  # predict text[t] from BOS + text[:t]
                prefix = torch.cat([bos, text[:t]]).unsqueeze(0)
                logp = torch.log_softmax(model(prefix).logits[0, -1].double(), dim=-1)
                nll -= logp[text[t]].item()
                count += 1
    assert result.tokens == count == 3 * 23
    assert result.nll == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_blockwise_perplexity_equals_the_full_forward_gemma_2_s_logit_softcap_included(arch):
    """The block-by-block pass (streamed models, float32 checks) applies the head as the model's
    forward does: Gemma 2 caps its logits (final_logit_softcapping), which a wide head shows."""
    from conftest import model_from_config

    model = model_from_config(arch, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(400)  # logits far past the cap of 30
    tokens = torch.randint(0, 256, (3, 20))
    full, blockwise = perplexity(model, tokens), perplexity(model, tokens, dtype=torch.float32)
    assert blockwise.nll == pytest.approx(full.nll, rel=1e-5)
