"""The model itself: loading any source, its anatomy (blocks, Linears), the modules we add, our on-disk folders (restructured, sparse), tokenizer, tensor and GGUF files."""
