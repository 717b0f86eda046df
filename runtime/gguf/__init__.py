"""GGUF files: `reader` maps and validates a file in full before anything uses it (`GGUFFile`),
`writer` writes one atomically (`write_gguf`), `quantize_model` converts a whole model to
another quantization type as llama-quantize does."""
