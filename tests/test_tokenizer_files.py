"""Tokenizers of GGUF vocabularies against llama.cpp's own expected tokenizations (the .inp / .out
cases beside its tokenizer-test vocab files): the tokenizers the family tests pair with tiny
models, and what compress.model loads a GGUF file's tokenizer as."""

import pytest

import families
from compress.model import gguf_tokenizer
from compress.tokenizer_files import is_sentencepiece, list_user_defined, model_proto, prefixes_space, save_tokenizer


def vocab(name: str):
    why = families.missing(name)
    if why:
        pytest.skip(why)
    return families.vocab_file(name)


def mismatches(encode, name: str) -> list[str]:
    return [text for text, ids in families.cases(name) if encode(text) != ids]


@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_a_llama_style_sentencepiece_gguf_loads_with_the_tokenizer_its_repository_has(name):
    """Every case equal; transformers' own conversion of the Llama-2 vocabulary misses 15 of them."""
    path = vocab(name)
    assert is_sentencepiece(path) and prefixes_space(path)
    tokenizer = gguf_tokenizer(path)
    assert mismatches(lambda t: tokenizer(t, add_special_tokens=False).input_ids, name) == []
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id == 1  # the file adds BOS
    assert tokenizer.gguf_source == str(path)


def test_tokenizer_model_rebuilt_from_a_gguf_encodes_as_the_original():
    import sentencepiece

    path = vocab("llama-spm")
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto(path))
    assert processor.vocab_size() == 32000 and mismatches(processor.encode, "llama-spm") == []


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe"])
def test_byte_level_bpe_ggufs_keep_transformers_conversion(name, vocab_folder):
    """Byte-level BPE vocabularies keep transformers' conversion (what the family tests use, saved
    and reloaded): Qwen2's agrees on every case, Llama 3's on all but one (a Vietnamese word that
    its Unicode normalisation splits otherwise)."""
    from transformers import AutoTokenizer

    assert not is_sentencepiece(vocab(name))
    tokenizer = AutoTokenizer.from_pretrained(vocab_folder(name))
    assert len(mismatches(lambda t: tokenizer(t, add_special_tokens=False).input_ids, name)) <= (1 if name == "llama-bpe" else 0)


def test_gemma_user_defined_pieces_are_listed_for_the_converter(tmp_path, vocab_folder):
    """Gemma's runs of spaces and newlines are USER_DEFINED pieces: the converter learns them from
    added_tokens.json, which the HF tokenizer folder itself does not get."""
    from transformers import AutoTokenizer

    path = vocab("gemma3")
    assert is_sentencepiece(path) and not prefixes_space(path)
    tokenizer = AutoTokenizer.from_pretrained(vocab_folder("gemma3"))
    save_tokenizer(tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.model").is_file() and not (tmp_path / "added_tokens.json").exists()
    list_user_defined(tmp_path)
    import json

    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert added["\n\n"] == 108 and len(added) > 100
