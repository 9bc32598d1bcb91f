"""Scoring beyond perplexity: zero-shot tasks through lm-eval, exported files in their own runtimes, tokens per second."""
