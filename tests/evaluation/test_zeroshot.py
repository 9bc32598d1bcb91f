"""compress.zeroshot on a tiny random Llama and a tiny BPE tokenizer built offline.

The log-likelihoods lm-eval reports are checked against a direct computation (log_softmax of the
continuation tokens, with lm-eval's tokenisation rule written out here independently), and the
accuracies against a count by hand from those log-likelihoods.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'atp-compress[eval]')")

from zeroshot_items import CORPUS, HELLASWAG, HELLASWAG_QUERIES, ITEMS, write_data  # noqa: E402

from compress.evaluation.zeroshot import TASKS, DataError, hellaswag_preprocess, load_docs, run_lm_eval, zero_shot  # noqa: E402

from conftest import ROOT  # noqa: E402

REAL_DATA = ROOT.parent / "shared" / "data" / "zeroshot"

# A few items of each format; the non-ASCII option makes char and byte lengths differ.
@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_data(tmp_path)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 3, trainer=trainer)
    # No pad token on purpose: lm-eval would add one, and must do it on a copy.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # spread the random logits, so options differ clearly
    )
    return LlamaForCausalLM(config).float().eval()


# ---------------------------------------------------------------------------------------------
# The reference computation
# ---------------------------------------------------------------------------------------------


def expected_requests(task: str) -> list[tuple[list[tuple[str, str]], int, list[str]]]:
    """Per item: the (context, continuation) pairs lm-eval should score, the gold index, and the
    strings whose length acc_norm divides by."""
    if task == "hellaswag":
        return [
            ([(query, " " + hellaswag_preprocess(e)) for e in endings], gold, [hellaswag_preprocess(e) for e in endings])
            for query, (_, gold, endings) in zip(HELLASWAG_QUERIES, HELLASWAG)
        ]
    out = []
    for question, options, gold in ITEMS[task]:
        if task == "winogrande":
            prefix, suffix = question.split("_")
            contexts = [prefix + o for o in options]
            out.append(([(c, " " + suffix.strip()) for c in contexts], gold, contexts))
        else:
            prompt = question if task == "openbookqa" else f"Question: {question}\nAnswer:"
            out.append(([(prompt, " " + o) for o in options], gold, options))
    return out


def manual_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log_softmax over the continuation's tokens, tokenised as lm-eval does: trailing
    context spaces move to the continuation; the pair is encoded whole and the continuation's
    tokens are those after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def lm_eval_loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per doc (in file order), the log-likelihood lm-eval computed for each option."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(resp[0][0]) for resp in s["resps"]] for s in samples]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_missing_file_names_file_and_format(tmp_path: Path, model, tokenizer):
    with pytest.raises(DataError, match=r"piqa\.jsonl not found; expected .*centerpiece.*correct_options_idx"):
        zero_shot(model, tokenizer, ["piqa"], tmp_path)
    with pytest.raises(DataError, match=r"hellaswag-val\.txt not found; expected 6 lines per item"):
        load_docs("hellaswag", tmp_path)


def test_malformed_files_are_rejected(tmp_path: Path):
    (tmp_path / "arc-easy.jsonl").write_text('{"centerpiece": "q", "options": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"arc-easy\.jsonl:1: bad item"):
        load_docs("arc_easy", tmp_path)
    (tmp_path / "winogrande.jsonl").write_text('{"centerpiece": "no blank", "options": ["a", "b"], "correct_options_idx": [0]}\n')
    with pytest.raises(DataError, match="no \"_\" blank"):
        load_docs("winogrande", tmp_path)
    (tmp_path / "hellaswag-val.txt").write_text("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(DataError, match="gold index '7'"):
        load_docs("hellaswag", tmp_path)


def test_docs_follow_lm_eval_preprocessing(data_dir: Path):
    from lm_eval.tasks.hellaswag.utils import preprocess as lm_eval_preprocess

    docs = load_docs("hellaswag", data_dir)
    assert [d["query"] for d in docs] == HELLASWAG_QUERIES
    assert docs[1]["choices"][1] == "Visit a site like to learn more."
    for text in [ctx for ctx, _, _ in HELLASWAG] + [" A [title] B  [x] c "]:
        assert hellaswag_preprocess(text) == lm_eval_preprocess(text)
    wino = load_docs("winogrande", data_dir)[0]
    assert wino["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria"]
    assert wino["target"] == "always got the easier cases."
    assert [d["gold"] for d in load_docs("arc_easy", data_dir, limit=2)] == [1, 0]


def test_loglikelihoods_and_accuracy_match_manual_computation(data_dir: Path, model, tokenizer):
    docs = {task: load_docs(task, data_dir) for task in TASKS}
    results = run_lm_eval(model, tokenizer, docs, batch_size=4)
    summary = zero_shot(model, tokenizer, TASKS, data_dir, batch_size=4)
    for task in TASKS:
        got = lm_eval_loglikelihoods(results, task)
        requests = expected_requests(task)
        assert len(got) == len(requests)
        hits, norm_hits = 0, 0
        for lls, (pairs, gold, choices) in zip(got, requests):
            want = [manual_loglikelihood(model, tokenizer, c, x) for c, x in pairs]
            assert lls == pytest.approx(want, abs=1e-4), task
            hits += argmax(want) == gold
            norm_hits += argmax([ll / len(s) for ll, s in zip(want, choices)]) == gold
        scores = summary["tasks"][task]
        assert scores["n"] == len(requests)
        assert scores["acc"] == pytest.approx(hits / len(requests)), task
        if task == "winogrande":
            assert scores["acc_norm"] is None
        else:
            assert scores["acc_norm"] == pytest.approx(norm_hits / len(requests)), task
    accs = [summary["tasks"][t]["acc"] for t in TASKS]
    assert summary["mean_acc"] == pytest.approx(sum(accs) / len(accs))
    assert summary["seconds"] > 0


def test_batched_equals_unbatched(data_dir: Path, model, tokenizer):
    docs = {task: load_docs(task, data_dir) for task in ("piqa", "arc_easy", "winogrande", "hellaswag")}
    one = run_lm_eval(model, tokenizer, docs, batch_size=1)
    many = run_lm_eval(model, tokenizer, docs, batch_size=16)
    for task in docs:
        for a, b in zip(lm_eval_loglikelihoods(one, task), lm_eval_loglikelihoods(many, task)):
            assert a == pytest.approx(b, abs=1e-4)


def test_limit_and_side_effects(data_dir: Path, model, tokenizer):
    model.train()
    result = zero_shot(model, tokenizer, ["arc_easy"], data_dir, limit=2)
    assert result["tasks"]["arc_easy"]["n"] == 2
    assert model.training, "the caller's training flag is restored"
    assert tokenizer.pad_token is None, "the caller's tokenizer is left alone"
    model.eval()  # task names lm-eval cannot load: tests/evaluation/test_runtimes.py (indexing lm-eval's registry costs ~15 s)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real zero-shot data not found at {REAL_DATA}")
def test_real_files(model, tokenizer):
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "winogrande": 1267,
             "hellaswag": 10042}
    for task, size in sizes.items():
        assert len(load_docs(task, REAL_DATA)) == size
    assert load_docs("hellaswag", REAL_DATA, limit=1)[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    result = zero_shot(model, tokenizer, TASKS, REAL_DATA, limit=2)
    assert {t: r["n"] for t, r in result["tasks"].items()} == dict.fromkeys(TASKS, 2)


@pytest.mark.parametrize("bos_first", [True, False])
def test_requests_start_with_bos_when_the_tokenizer_adds_it(data_dir: Path, bos_first):
    """lm-eval's HFLM encodes with the tokenizer's default template: a Gemma-style tokenizer that
    adds BOS gets BOS first in every scored sequence; one that does not gets none."""
    from conftest import build_tokenizer, tiny_model

    tok = build_tokenizer(bos=bos_first)
    model = tiny_model("gemma3_text")
    firsts = []
    def record(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        firsts.extend(ids[:, 0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = zero_shot(model, tok, ["piqa", "winogrande"], data_dir, batch_size=2)
    finally:
        handle.remove()
    assert result["bos"] is bos_first and firsts
    if bos_first:
        assert set(firsts) == {tok.bos_token_id}
    else:
        assert tok.bos_token_id is None
