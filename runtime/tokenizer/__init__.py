"""Text <-> token ids, matching llama.cpp token for token: `tokenizer` (the `Tokenizer`: the
vocabulary's metadata, special tokens, encode/decode) over the mergers `spm` (SentencePiece,
`llama`), `bpe` with `pretokenizer` (`gpt2`), `wpm` (WordPiece, `bert`), `kernels` (numba
merging for long words); `chat_template` turns a conversation into the prompt."""
