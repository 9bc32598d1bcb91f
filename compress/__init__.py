"""atp-compress: compress causal language models with layer-wise sparsity, from one YAML recipe."""

__version__ = "0.1.0"
