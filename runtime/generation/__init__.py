"""Using a loaded model: `sampling` (llama.cpp's samplers), `generate` (the generation loop and
its events), `perplexity`, `bench` (llama-bench's measurements) and `llama_api` (`Llama`,
llama-cpp-python's API)."""
