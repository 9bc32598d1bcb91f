"""A tokenizer's files as the families' repositories ship them: tokenizer.json and friends, and for
SentencePiece vocabularies (Llama 2, Mistral, Phi-3, Gemma) the tokenizer.model beside them, copied
from the folder the model came from or rebuilt from the GGUF file it came from.

Why rebuild: llama.cpp's converter reads SentencePiece vocabularies (Llama 2, Mistral, Phi-3, Gemma) only
from tokenizer.model, with each piece's score, which its tokenizer merges by. A model loaded from a
GGUF file has no such file: transformers builds a fast tokenizer from the GGUF's arrays, and the
converter's fallback for a folder without tokenizer.model (tokenizer.json) gives every piece the
same score, so llama.cpp then splits words differently (19 of the 47 tokenizer-test texts of
llama.cpp's Llama-SPM vocabulary, measured). The GGUF stores exactly what a tokenizer.model holds
(pieces, scores, piece types numbered as SentencePiece numbers them, the special ids, whether a
space is put first), so the file is rebuilt field for field.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from compress.model.gguf_file import GgufIndex

# SentencePiece's ModelProto.SentencePiece.Type, which GGUF's token types copy (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.ModelType


def tokenizer_fields(path: Path) -> dict:
    """The GGUF's tokenizer.* metadata, arrays decoded."""
    return {key: value for key, value, _, _ in GgufIndex(path).metadata() if key.startswith("tokenizer.")}


def is_sentencepiece(path: Path) -> bool:
    """The GGUF's tokenizer is SentencePiece's ("llama" in llama.cpp: Llama 2, Mistral, Phi-3, Gemma)."""
    return GgufIndex(path).fields.get("tokenizer.ggml.model") == "llama"


def model_proto(path: Path) -> bytes:
    """The serialized tokenizer.model for a GGUF file whose tokenizer is SentencePiece's."""
    fields = tokenizer_fields(path)
    tokens = fields["tokenizer.ggml.tokens"]
    special = {name: fields.get(f"tokenizer.ggml.{key}_token_id", -1)
               for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    return sentencepiece_proto(tokens, fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
                               fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens), special,
                               bool(fields.get("tokenizer.ggml.add_space_prefix", True)))


def sentencepiece_proto(pieces: list[str], scores: list[float], types: list[int], special: dict[str, int], add_prefix: bool) -> bytes:
    """A SentencePiece BPE ModelProto (what tokenizer.model holds): pieces with their scores and
    types, the unk / bos / eos / pad ids (-1: none), and whether a space is put before the text."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    unk = special.get("unk", -1)
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        # SentencePiece allows one UNKNOWN piece, <unk>; some GGUF files mark <unk> CONTROL and
        # their padding pieces ([PAD32011]...) UNKNOWN
        kind = UNKNOWN if i == unk else UNUSED if kind == UNKNOWN else int(kind)
        proto.pieces.add(piece=piece, score=float(score), type=kind)
    spec = proto.trainer_spec
    spec.model_type = BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = BYTE in types
    for name in ("unk", "bos", "eos", "pad"):
        i = special.get(name, -1)
        setattr(spec, f"{name}_id", i)
        if i >= 0:
            setattr(spec, f"{name}_piece", pieces[i])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def is_sentencepiece_json(tokenizer_json: dict) -> bool:
    """tokenizer.json holds a SentencePiece BPE vocabulary (Llama 2, Mistral, Phi-3, Gemma): BPE
    with byte fallback over pieces that spell a space as "▁" (byte-level BPE, Llama 3's or Qwen's,
    has neither)."""
    model = tokenizer_json.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and any("▁" in piece for piece in model.get("vocab", {}))


def proto_from_tokenizer_json(tokenizer_json: dict, special_tokens: dict[str, str | None]) -> bytes:
    """tokenizer.model for a SentencePiece vocabulary known only from its tokenizer.json;
    special_tokens: {"unk" | "bos" | "eos" | "pad": the token's text or None}.

    A SentencePiece BPE tokenizer (and llama.cpp's, which reads the same file) merges the adjacent
    pair whose joined piece has the highest score; tokenizer.json's BPE merges the pair listed
    first. The merges of such a tokenizer.json are the SentencePiece merges in score order (how
    transformers converts a tokenizer.model), so a piece's score is minus the rank of the first
    merge that makes it, and pieces no merge makes (characters, bytes, specials) score below every
    merge. The added tokens become CONTROL (special) or USER_DEFINED pieces at their ids."""
    model = tokenizer_json["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    pieces, scores, types = [f"[PAD{i}]" for i in range(size)], [0.0] * size, [UNUSED] * size
    rank: dict[str, int] = {}
    for k, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, k)
    for piece, i in vocab.items():
        pieces[i] = piece
        scores[i] = -float(rank.get(piece, len(rank)))
        types[i] = BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else NORMAL
    for i, token in added.items():
        pieces[i] = token["content"]
        types[i] = CONTROL if token.get("special") else USER_DEFINED
    ids = {piece: i for i, piece in enumerate(pieces)}
    special = {name: ids.get(text, -1) if text else -1 for name, text in special_tokens.items()}
    if special.get("unk", -1) < 0 and model.get("unk_token") in ids:
        special["unk"] = ids[model["unk_token"]]
    # the space SentencePiece puts before the text: Llama 2's normalizer prepends it, the Metaspace
    # pre-tokenizer transformers writes adds it unless its scheme is "never"; Gemma does neither
    steps = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    add_prefix = '"Prepend"' in steps or ('"Metaspace"' in steps and '"prepend_scheme": "never"' not in steps)
    return sentencepiece_proto(pieces, scores, types, special, add_prefix)


def model_from_tokenizer_json(folder: Path) -> bool:
    """Write folder/tokenizer.model from folder/tokenizer.json when that holds a SentencePiece
    vocabulary and the folder has no tokenizer.model (many fine-tuned Llama 2 / Mistral / Phi-3
    folders): llama.cpp's converter reads such vocabularies, with their scores, only from
    tokenizer.model. True when written."""
    model_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
    if model_file.is_file() or not json_file.is_file():
        return False
    tokenizer_json = json.loads(json_file.read_text(encoding="utf-8"))
    if not is_sentencepiece_json(tokenizer_json):
        return False
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    text = lambda token: token.get("content") if isinstance(token, dict) else token  # noqa: E731
    special = {name: text(config.get(f"{name}_token")) for name in ("unk", "bos", "eos", "pad")}
    model_file.write_bytes(proto_from_tokenizer_json(tokenizer_json, special))
    return True


def prefixes_space(path: Path) -> bool:
    """A SentencePiece vocabulary that puts a space before the text (Llama 2, Mistral, Phi-3; not Gemma)."""
    fields = GgufIndex(path).fields
    return fields.get("tokenizer.ggml.model") == "llama" and bool(fields.get("tokenizer.ggml.add_space_prefix", True))


def llama_tokenizer(path: Path):
    """The HF tokenizer of a GGUF file's Llama-style SentencePiece vocabulary, built as those
    models' repositories build tokenizer.json: pieces merged in score order, a space put before
    the text, byte fallback, the special pieces as special tokens, BOS / EOS as the file adds them.
    transformers' own GGUF conversion of these vocabularies splits runs of spaces and the text
    after a special token differently from SentencePiece and llama.cpp (15 of the 47 test texts of
    llama.cpp's Llama-SPM vocabulary, against none here)."""
    fields = tokenizer_fields(path)
    pieces = fields["tokenizer.ggml.tokens"]
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(pieces)
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(pieces)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: score for piece, score in zip(pieces, scores)})
    special = {name: pieces[fields[f"tokenizer.ggml.{name}_token_id"]] for name in ("bos", "eos", "unknown", "padding")
               if f"tokenizer.ggml.{name}_token_id" in fields}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=special.get("unknown"), byte_fallback=BYTE in types, fuse_unk=True))
    steps = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *steps] if fields.get("tokenizer.ggml.add_space_prefix", True) else steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, t in zip(pieces, types) if t == CONTROL])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, t in zip(pieces, types) if t == USER_DEFINED])
    bos, eos = special.get("bos"), special.get("eos")
    first = [bos] if bos and fields.get("tokenizer.ggml.add_bos_token", True) else []
    last = [eos] if eos and fields.get("tokenizer.ggml.add_eos_token", False) else []
    single = " ".join([*first, "$A", *last])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} {single.replace('$A', '$B')}",
                                                       special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=special.get("unknown"),
                                  pad_token=special.get("padding"))
    if "tokenizer.chat_template" in fields:
        out.chat_template = fields["tokenizer.chat_template"]
    return out


def write_model(path: Path, out: Path) -> Path:
    out.write_bytes(model_proto(path))
    return out


def user_defined(model_file: Path) -> dict[str, int]:
    """{piece: id} of a tokenizer.model's USER_DEFINED pieces (Gemma's runs of spaces and newlines)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == USER_DEFINED}


def list_user_defined(folder: Path) -> None:
    """added_tokens.json with tokenizer.model's USER_DEFINED pieces, for llama.cpp's converter: it
    reads piece types through SentencePiece's API, which has no test for USER_DEFINED, and takes
    them from added_tokens.json or tokenizer_config.json instead (where the families' repositories
    list them). Without it llama.cpp would split Gemma's whitespace runs into ordinary pieces."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file() or (folder / "added_tokens.json").is_file():
        return
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) if (folder / "tokenizer_config.json").is_file() else {}
    listed = {int(i) for i in config.get("added_tokens_decoder", {})}
    added = {piece: i for piece, i in user_defined(model_file).items() if i not in listed}
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False), encoding="utf-8")


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.save_pretrained, plus tokenizer.model where the model has one: from the folder it
    was loaded from, or rebuilt from the GGUF file it was loaded from (compress.model sets
    tokenizer.gguf_source)."""
    tokenizer.save_pretrained(folder)
    if (folder / "tokenizer.model").is_file():
        return
    source = Path(getattr(tokenizer, "name_or_path", "") or ".")
    gguf_file = getattr(tokenizer, "gguf_source", None)
    if source.is_dir() and (source / "tokenizer.model").is_file():
        shutil.copyfile(source / "tokenizer.model", folder / "tokenizer.model")
    elif gguf_file is not None and is_sentencepiece(Path(gguf_file)):
        write_model(Path(gguf_file), folder / "tokenizer.model")
