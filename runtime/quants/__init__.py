"""Block quantization formats, one module per ggml format (layout, dequantize, quantize)."""
