"""The UI-free conversation rules: settings precedence, llama.cpp's -l syntax, the Alpaca and
transcript prompts, and what the chat pane shows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from llamachat.runtime.errors import UserError
from llamachat.tui.cli import build_main_parser
from llamachat.tui.conversation import (
    INSTRUCT,
    INTERACTIVE,
    Conversation,
    Message,
    call_kwargs,
    load_kwargs,
    merged_settings,
    parse_logit_bias,
)


def args(*argv):
    return build_main_parser().parse_args(list(argv))


def test_flag_over_library_over_default():
    s = merged_settings(args("--temp", "0", "-c", "512"), {"temp": 0.7, "top_k": 5, "n_ctx": 4096})
    assert s["temp"] == 0.0 and s["n_ctx"] == 512  # flags win
    assert s["top_k"] == 5  # then the library
    assert s["top_p"] == 0.95 and s["repeat_last_n"] == 64  # then llama.cpp's defaults
    kw = call_kwargs(s)
    assert kw["temperature"] == 0.0 and kw["mirostat_mode"] == 0 and kw["max_tokens"] is None
    assert call_kwargs(merged_settings(args("-n", "7")))["max_tokens"] == 7
    assert load_kwargs(s, args("--context-shift", "--keep", "4")) == dict(
        n_ctx=512, n_threads=None, seed=-1, chat_format=None, context_shift=True, n_keep=4)


def test_bad_values_are_sentences():
    with pytest.raises(UserError, match=r"^--top-p: top_p must be between 0 and 1, got 2.0"):
        args("--top-p", "2")  # refused as the flag is read
    with pytest.raises(UserError, match=r"top_p must be between 0 and 1, got 2 \(command-line flag\)"):
        merged_settings(SimpleNamespace(top_p=2))  # and by the same rule when set another way
    with pytest.raises(UserError, match="model library: temp must be at least 0"):
        merged_settings(args(), {"temp": -1})


def test_logit_bias_syntax():
    assert parse_logit_bias(["15043+1", "2-0.5", "7-inf"]) == {15043: 1.0, 2: -0.5, 7: -math.inf}
    with pytest.raises(UserError, match="TOKEN_ID"):
        parse_logit_bias(["abc"])


def test_instruct_prompt_is_alpaca():
    conv = Conversation.from_args(args("--instruct", "-f", "alpaca"))
    assert conv.mode == INSTRUCT and conv.preamble_name == "alpaca.txt"
    conv.messages += [Message("user", "Q1"), Message("assistant", " A1\n\n"), Message("user", "Q2")]
    req = conv.request()
    assert req.prompt == (conv.preamble + "\n\n### Instruction:\n\nQ1\n\n### Response:\n\nA1"
                          "\n\n### Instruction:\n\nQ2\n\n### Response:\n\n")
    assert req.stop == ["### Instruction:"] and req.messages is None


def test_interactive_transcript_and_display():
    conv = Conversation.from_args(args("-i", "-r", "User:", "-f", "chat-with-bob"))
    assert conv.mode == INTERACTIVE and conv.preamble.endswith("User:") and conv.user_speaks_first()
    conv.messages.append(Message("user", "Hi"))
    assert conv.request().prompt == conv.preamble + " Hi\n"
    reply = conv.reply_message(" Bob: Hello.\n", "stop")
    assert reply.content == " Bob: Hello.\nUser:"
    assert conv.display_text(reply) == "Bob: Hello."
    assert conv.reply_message("partial", "cancelled", cancelled=True).content == "partial"  # no hand-over injected
    assert conv.reply_message("x", "stop", stop_text="User:").content == "xUser:"


def test_chat_request_and_markdown_export():
    conv = Conversation(system_prompt="Be brief.")
    conv.messages += [Message("user", "Hi"), Message("assistant", "Hello!", stopped=True)]
    assert conv.request().messages == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    md = conv.to_markdown("m")
    assert md.startswith("# Hi\n") and "**Assistant:** *(stopped)*" in md and "Be brief." in md


def test_unknown_prompt_file_names_the_choices():
    with pytest.raises(UserError, match="prompt file 'nope' not found.*alpaca"):
        Conversation.from_args(args("--instruct", "-f", "nope"))
