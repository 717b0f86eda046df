"""A llama-architecture model: `model` (config from the GGUF metadata, the weights as views of
the memory map, `load_model`, `LlamaModel`), `loading` (what loading does to the weights before
any token: repacking, stacking, releasing copied pages), `forward` (the forward pass, prompts
and decode alike), `kv_cache` (the attention cache) and `kv_state` (saving and loading it)."""
