"""Tokenizers of GGUF vocabularies against llama.cpp's own expected tokenizations (the .inp / .out
cases beside its tokenizer-test vocab files): the tokenizers the family tests pair with tiny
models, and what compress.model loads a GGUF file's tokenizer as."""

import pytest

from compress.export.gguf import convert as llama_convert
from compress.model.load import gguf_tokenizer
from compress.model.tokenizer_files import (
    is_sentencepiece,
    list_user_defined,
    llama_tokenizer,
    model_from_tokenizer_json,
    model_proto,
    prefixes_space,
    save_tokenizer,
)

import families
from conftest import needs_converter


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


# ---------------------------------------------------------------- folders with tokenizer.json alone


def json_only_folder(folder, name: str, made_by: str):
    """A folder with the vocabulary's tokenizer.json and no tokenizer.model, as many fine-tuned
    Llama 2 / Mistral / Phi-3 folders are: written as the family's repository writes it, or by
    transformers' own conversion of the GGUF file."""
    from transformers import AutoTokenizer

    path = vocab(name)
    tokenizer = llama_tokenizer(path) if made_by == "repository" else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").exists()
    return tokenizer


def llama_cpp_vocab(folder, tokenizer, model_type: str):
    """The converter's vocab-only GGUF of folder, opened in llama.cpp."""
    import json

    llama_cpp = pytest.importorskip("llama_cpp")
    family = families.Family("x", model_type, "", model_type)
    arch = {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[model_type]
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type, **families.family_config(family, len(tokenizer))}))
    out = llama_convert.convert(folder, folder / "vocab.gguf", "f32", folder / "converter.log", vocab_only=True)
    return llama_cpp.Llama(str(out), vocab_only=True, verbose=False)


@needs_converter
@pytest.mark.parametrize("made_by", ["repository", "transformers"])
@pytest.mark.parametrize("name,model_type", [("llama-spm", "llama"), ("phi-3", "phi3")])
def test_a_sentencepiece_vocabulary_known_only_from_tokenizer_json_reaches_llama_cpp_intact(tmp_path, name, model_type, made_by):
    """tokenizer.model built from tokenizer.json (scores from the merge ranks): SentencePiece
    itself and llama.cpp's file made from it tokenize every one of llama.cpp's reference cases as
    expected, whichever tool wrote the tokenizer.json."""
    import sentencepiece

    tokenizer = json_only_folder(tmp_path, name, made_by)
    assert model_from_tokenizer_json(tmp_path) and not model_from_tokenizer_json(tmp_path)  # once, never over a file
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert processor.vocab_size() >= 32000 and mismatches(processor.encode, name) == []
    llm = llama_cpp_vocab(tmp_path, tokenizer, model_type)
    try:
        assert mismatches(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), name) == []
    finally:
        llm.close()


@needs_converter
def test_which_side_was_wrong_at_token_51(tmp_path):
    """The evidence for the fix, on llama.cpp's 46 Llama-SPM reference cases: the converter's
    fallback for a folder without tokenizer.model (every piece scored -1000) splits 16 of them
    otherwise (the GGUF was wrong); transformers 5's LlamaTokenizer class, which Llama 2 and
    Mistral repositories name, splits 15 otherwise (runs of spaces: " " -> [259]), whatever
    tokenizer.json holds, so it is no reference for those cases either. "\\n\\n  Indented" (the
    sample's token 51) is one of the first kind: SentencePiece gives ▁ + ▁Ind, as the HF side did."""
    import sentencepiece
    from transformers import AutoTokenizer

    tokenizer = json_only_folder(tmp_path / "folder", "llama-spm", "repository")
    llm = llama_cpp_vocab(tmp_path / "folder", tokenizer, "llama")
    try:
        fallback = mismatches(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), "llama-spm")
    finally:
        llm.close()
    assert len(fallback) >= 10
    config = tmp_path / "folder" / "tokenizer_config.json"
    import json

    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "LlamaTokenizer"}))
    as_repositories_name_it = AutoTokenizer.from_pretrained(tmp_path / "folder")
    assert len(mismatches(lambda t: as_repositories_name_it(t, add_special_tokens=False).input_ids, "llama-spm")) >= 10
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto(vocab("llama-spm")))
    assert processor.encode("\n\n  Indented")[-4:] == [13, 29871, 1894, 14927]  # ▁ ▁Ind ented


def test_byte_level_bpe_folders_get_no_tokenizer_model(tmp_path, vocab_folder):
    import shutil

    shutil.copytree(vocab_folder("qwen2"), tmp_path / "qwen2")
    assert not model_from_tokenizer_json(tmp_path / "qwen2") and not (tmp_path / "qwen2" / "tokenizer.model").exists()
