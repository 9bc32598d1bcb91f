import json

import pytest
import torch

from compress.data.text import read_text
from compress.data.windows import SegmentsConfig, build_segments, consecutive_windows, random_windows, role_parts
from compress.errors import CompressError

from conftest import SHARED_DATA, needs_shared_data


def test_default_source_needs_nothing(tokenizer):
    text = read_text("python-docs", "calibration")
    assert len(text) > 100_000 and "\r" not in text


def test_roles_sharing_a_source_get_disjoint_ordered_parts(tokenizer):
    configs = {
        "calibration": SegmentsConfig(source="python-docs", nsamples=16, seqlen=64, seed=1),
        "validation": SegmentsConfig(source="python-docs", nsamples=4, seqlen=64),
        "evaluation": SegmentsConfig(source="python-docs", nsamples=8, seqlen=64),
    }
    parts = role_parts(configs)
    assert parts == {"calibration": (0.0, 0.7), "validation": (0.7, 0.8), "evaluation": (0.8, 1.0)}
    segs = build_segments(configs, tokenizer)
    assert segs["calibration"].tokens.shape == (16, 64)
    assert segs["validation"].tokens.shape == (4, 64) and segs["evaluation"].tokens.shape == (8, 64)
    # no window of one role appears in another: compare the token streams they were cut from
    stream = torch.tensor(tokenizer(read_text("python-docs", "calibration"), add_special_tokens=False)["input_ids"])
    n = len(stream)
    cal_end, val_end = int(0.7 * n), int(0.8 * n)
    assert torch.equal(segs["validation"].tokens[0], stream[cal_end : cal_end + 64])
    assert torch.equal(segs["evaluation"].tokens[0], stream[val_end : val_end + 64])
    for row in segs["calibration"].tokens:  # every calibration window lies inside the first part
        starts = (stream[:cal_end].unfold(0, 64, 1) == row).all(dim=1)
        assert starts.any()


def test_separate_sources_are_read_whole(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta\r\n" * 300)
    (tmp_path / "b.txt").write_text("one two three four five\n" * 300)
    configs = {
        "calibration": SegmentsConfig(source=str(tmp_path / "a.txt"), nsamples=4, seqlen=32),
        "evaluation": SegmentsConfig(source=str(tmp_path / "b.txt"), seqlen=32),
    }
    assert role_parts(configs) == {"calibration": (0.0, 1.0), "evaluation": (0.0, 1.0)}
    segs = build_segments(configs, tokenizer)
    assert segs["evaluation"].nsamples == segs["evaluation"].part_tokens // 32  # every full window


def test_jsonl_source(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document number {i} " * 20}) for i in range(50)))
    text = read_text(str(path), "calibration", text_field="body")
    assert text.startswith("document number 0") and text.count("\n\n") == 49
    with pytest.raises(CompressError, match=r"docs.jsonl:1: no field 'text'"):
        read_text(str(path), "calibration")


def test_calibration_windows_are_seeded():
    stream = torch.arange(1000)
    a, b, c = (random_windows(stream, 5, 16, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 15, dtype=torch.long))  # contiguous windows


def test_consecutive_windows_do_not_overlap():
    w = consecutive_windows(torch.arange(100), None, 30)
    assert w.shape == (3, 30) and w[1, 0] == 30 and w[2, -1] == 89


@pytest.mark.parametrize(
    "configs,expected",
    [
        ({"calibration": SegmentsConfig(source="missing.txt")}, r"data\.calibration\.source: missing\.txt not found"),
        ({"evaluation": SegmentsConfig(source="python-docs", nsamples=10_000, seqlen=512)}, r"data\.evaluation: .*room for \d+ windows of 512, asked for 10000"),
        ({"calibration": SegmentsConfig(source="python-docs", seqlen=10**8)}, r"fewer than one segment"),
    ],
)
def test_data_errors(configs, expected, tokenizer):
    with pytest.raises(CompressError, match=expected):
        build_segments(configs, tokenizer)


def test_unknown_file_type(tmp_path, tokenizer):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CompressError, match=r"unknown file type '\.csv'"):
        read_text(str(tmp_path / "x.csv"), "evaluation")


def test_named_dataset_without_datasets_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CompressError, match=r"'c4' needs the datasets package"):
        read_text("c4", "calibration")


@needs_shared_data
def test_wikitext_copy_has_crlf_normalised():
    text = read_text(str(SHARED_DATA / "wikitext2-test.raw"), "evaluation")
    assert "\r" not in text and " = Robert Boulter = " in text


# ---------------------------------------------------------------- tokenising in pieces


def test_pieces_give_the_whole_texts_tokens(tokenizer, monkeypatch):
    """Long text is encoded piece by piece (memory), yet the stream equals the whole text's."""
    import compress.data.windows as data

    text = read_text("python-docs", "calibration")[:200_000] + "\n= Heading = \n The end\nword\n  two\n"
    whole = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(data, "CHUNK_CHARS", 2000)
    assert len(data._pieces(text)) > 50
    assert torch.equal(data.tokenize(text, tokenizer), whole)


def test_tokenizer_whose_pieces_differ_is_encoded_whole(monkeypatch):
    """SentencePiece-style tokenizers add a prefix space to every call: cuts would add tokens, so
    the text is encoded whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import compress.data.windows as data

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    spm.train_from_iterator([read_text("python-docs", "calibration")[:50_000]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>")
    assert not data._cuts_are_neutral(tok)
    text = "first line\nsecond line\n" * 500
    monkeypatch.setattr(data, "CHUNK_CHARS", 100)
    assert data.tokenize(text, tok).tolist() == tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- BOS first in every window


def test_bos_auto_follows_the_tokenizer(tokenizer, bos_tokenizer):
    configs = {
        "calibration": SegmentsConfig(source="python-docs", nsamples=4, seqlen=32),
        "evaluation": SegmentsConfig(source="python-docs", nsamples=3, seqlen=32),
    }
    with_bos = build_segments(configs, bos_tokenizer)
    for seg in with_bos.values():
        assert seg.bos and seg.tokens.shape[1] == 32
        assert (seg.tokens[:, 0] == bos_tokenizer.bos_token_id).all()
        assert (seg.tokens[:, 1:] != bos_tokenizer.bos_token_id).all()  # only at position 0
        assert seg.describe()["bos"] is True
    # evaluation windows are consecutive: BOS + the next 31 text tokens each
    off = build_segments({role: cfg.model_copy(update={"bos": False}) for role, cfg in configs.items()}, bos_tokenizer)
    assert not off["evaluation"].bos
    assert torch.equal(with_bos["evaluation"].tokens[:, 1:].reshape(-1), off["evaluation"].tokens.reshape(-1)[: 3 * 31])
    without = build_segments(configs, tokenizer)  # this tokenizer adds no BOS: auto means off
    assert not without["calibration"].bos and not without["evaluation"].bos


def test_bos_true_needs_a_bos_token(tokenizer):
    with pytest.raises(CompressError, match=r"data.calibration.bos: true, but the tokenizer has no BOS token"):
        build_segments({"calibration": SegmentsConfig(source="python-docs", nsamples=2, seqlen=16, bos=True)}, tokenizer)
