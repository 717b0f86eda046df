"""Chat templates: turning a conversation into the prompt text and tokens a chat model expects.

A model's `tokenizer.chat_template` (Jinja, Hugging Face's format) is rendered the way HF's
`apply_chat_template` renders it: jinja2's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
text, and bos_token/eos_token/... as strings. Rendering is bounded in time and output size; a
template that fails, refuses the conversation or tries something unsafe becomes one UserError
naming the model. Models without a template get a built-in format (BUILTIN_FORMATS), which can
also be chosen by name.

Encoding keeps what the user typed literal: the conversation is rendered a second time with
every message's text between private-use sentinels, which locates the text in the output; the
template's own markup is then tokenized with special tokens parsed and the message text
without (Tokenizer.encode_segments), so typing `<|im_end|>` gives its plain-text tokens, while
ordinary text still tokenizes exactly as the whole rendered prompt would.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import UserError, shown

log = logging.getLogger("llamachat")
log.addHandler(logging.NullHandler())  # the caller shows ChatTemplate.notice; stderr would garble the app

# A chat template is a few kilobytes (tool-calling ones some tens); past this it is not one,
# and compiling it would take time nothing bounds.
MAX_SOURCE_CHARS = 1 << 20

BUILTIN_FORMATS = ("chatml", "llama-2", "llama-3", "mistral", "zephyr", "alpaca", "vicuna")

_BUILTIN_SOURCES = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Meta's Llama-2-chat template (as in HF's tokenizer_config.json)
    "llama-2": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set loop_messages = messages[1:] -%}{%- set system_message = messages[0]['content'] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- set system_message = false -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
        "{%- if loop.index0 == 0 and system_message != false -%}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- ' ' + content.strip() + ' ' + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Meta's Llama-3-Instruct template
    "llama-3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    # Mistral-Instruct: [INST] turns; a system message is put in front of the next user turn
    "mistral": (
        "{%- set ns = namespace(system='') -%}"
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
        "{%- elif message['role'] == 'user' -%}{{- '[INST] ' + ns.system + message['content'] + ' [/INST]' -}}{%- set ns.system = '' -%}"
        "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # HuggingFaceH4/zephyr
    "zephyr": (
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    ),
    "alpaca": (
        "{%- set ns = namespace(system='Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.') -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- endif -%}{%- endfor -%}"
        "{{- ns.system + '\\n\\n' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    # Vicuna v1.1
    "vicuna": (
        "{%- set ns = namespace(system=\"A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.\") -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- endif -%}{%- endfor -%}"
        "{{- ns.system + ' ' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    ),
}

# sentinels around message text in the locating render (Unicode private use: not whitespace,
# so trim/strip inside a template keeps them)
_OPEN, _CLOSE = "\ue000", "\ue001"


class _TemplateRaised(Exception):
    """raise_exception() called by the template."""


class _RenderLimit(Exception):
    """Time or size budget exceeded."""


class _Refused(Exception):
    """A template that could not be rendered (the sentence); a fallback format may take over."""


def _clip(text: str, limit: int = 200) -> str:
    """Text a template produced, as a message repeats it (a template may raise megabytes)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # HF's override of Jinja's tojson: no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (marks assistant text); renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body)


def _too_big(args, kwargs, limit) -> bool:
    return any(isinstance(a, int) and not isinstance(a, bool) and a > limit for a in (*args, *kwargs.values()))


_NUMBER = re.compile(r"\d+")


def _format_too_big(fmt, args, kwargs, limit) -> bool:
    """Whether a %-format or str.format call could build a huge string: a width or precision
    written in the format (`%999999999s`, `{:>999999999}`) or passed as an argument (`%*s`)."""
    if isinstance(fmt, str) and any(len(n) > 7 or int(n) > limit for n in _NUMBER.findall(fmt)):
        return True
    if isinstance(args, (tuple, list)):
        return _too_big(args, kwargs, limit)
    if isinstance(args, dict):
        return _too_big((), args, limit)
    return _too_big((args,), kwargs, limit)


def _str_call_too_big(method: str, s: str, args, kwargs, limit) -> bool:
    """Whether a str method call would build a string longer than `limit` (estimated first)."""
    if _too_big(args, kwargs, limit):  # center/ljust/rjust/zfill widths, expandtabs sizes
        return True
    if method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = s.count(args[0]) if args[0] else len(s) + 1
        return len(s) + hits * len(args[1]) > limit
    if method == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return isinstance(size, int) and s.count("\t") * size > limit
    if method == "join" and args and isinstance(args[0], (list, tuple)):
        return len(s) * len(args[0]) > limit
    if method in ("format", "format_map"):
        return _format_too_big(s, args, kwargs, limit)
    return False


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's `a ~ b` joins strings without calling anything the sandbox sees; route it
    through the environment so a doubling loop cannot build gigabytes."""

    def visit_Concat(self, node, frame):
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded(filter_func, limit):
    """A width-taking filter that refuses absurd widths (they allocate before any check)."""

    def bounded(*args, **kwargs):
        if _too_big(args[1:], kwargs, limit):
            raise SecurityError("a string that large is not allowed")
        return filter_func(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep jinja's pass_context/pass_environment marker
        if hasattr(filter_func, attr):
            setattr(bounded, attr, getattr(filter_func, attr))
    return bounded


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with a deadline checked on every call/attribute access and bounded
    string/list repetition and powers."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])
    max_repeat = 1 << 20  # the size bound outside a render; a render sets its own (_local.limit)
    code_generator_class = _BoundedCodeGenerator

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])
        self._local = threading.local()
        self.filters["tojson"] = _bounded(_tojson, 64)  # indent
        for name in ("center", "indent", "wordwrap", "truncate"):
            self.filters[name] = _bounded(self.filters[name], self.max_repeat)
        self.filters["format"] = self._bounded_format_filter(self.filters["format"])
        self.filters["replace"] = self._bounded_str_filter(self.filters["replace"], "replace")
        self.filters["join"] = self._bounded_join_filter(self.filters["join"])
        self.globals["lipsum"] = self._bounded_lipsum(self.globals["lipsum"])
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    @property
    def limit(self) -> int:
        return getattr(self._local, "limit", None) or self.max_repeat

    def _refuse_if(self, too_big: bool, what: str = "a string that large") -> None:
        if too_big:
            raise SecurityError(f"{what} is not allowed")

    def bounded_concat(self, parts) -> str:
        self._check()
        texts = [p if isinstance(p, str) else str(p) for p in parts]
        self._refuse_if(sum(map(len, texts)) > self.limit)
        return "".join(texts)

    def _bounded_format_filter(self, do_format):
        def bounded(value, *args, **kwargs):
            self._refuse_if(_format_too_big(str(value) if isinstance(value, str) else value, args, kwargs, self.limit))
            return do_format(value, *args, **kwargs)
        return bounded

    def _bounded_str_filter(self, filter_func, method):
        def bounded(*args, **kwargs):
            jinja_args = args[1:] if args and isinstance(args[0], jinja2.nodes.EvalContext) else args
            s = jinja_args[0] if jinja_args else ""
            self._refuse_if(isinstance(s, str) and _str_call_too_big(method, s, jinja_args[1:], kwargs, self.limit))
            return filter_func(*args, **kwargs)
        if hasattr(filter_func, "jinja_pass_arg"):
            bounded.jinja_pass_arg = filter_func.jinja_pass_arg
        return bounded

    def _bounded_join_filter(self, do_join):
        def bounded(eval_ctx, value, d="", attribute=None):
            if isinstance(value, (list, tuple)):
                self._refuse_if(len(str(d)) * len(value) > self.limit)
            return do_join(eval_ctx, value, d, attribute)
        bounded.jinja_pass_arg = do_join.jinja_pass_arg
        return bounded

    def _bounded_lipsum(self, lipsum):
        def bounded(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja's own parameter names
            self._refuse_if(not all(isinstance(x, int) for x in (n, min, max)) or n * max > 10_000, "lipsum that large")
            return lipsum(n, html, min, max)
        return bounded

    def _check(self) -> None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise _RenderLimit("time")

    def call_binop(self, context, operator, left, right):
        self._check()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.limit:
                    raise SecurityError("a repetition that large is not allowed")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self._refuse_if(len(left) + len(right) > self.limit)
        if operator == "%" and isinstance(left, str):
            self._refuse_if(_format_too_big(left, right, {}, self.limit))  # '%999999999s' % x
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1000:
            raise SecurityError("a power that large is not allowed")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        __self._check()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and _str_call_too_big(getattr(__obj, "__name__", ""), owner, args, kwargs, __self.limit):
            raise SecurityError("a string that large is not allowed")  # 'x'.center(10**9), replace, expandtabs, ...
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        def bounded(*args, **kwargs):  # '{:>999999999}'.format(x), format_map
            self._refuse_if(_format_too_big(fmt, args, kwargs, self.limit))
            return wrapper(*args, **kwargs)
        return bounded

    def getattr(self, obj, attribute):
        self._check()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._check()
        return super().getitem(obj, argument)


_ENV = _Sandbox()


class ChatTemplate:
    """A compiled chat template. Get one with `ChatTemplate.for_model(...)`."""

    time_limit = 2.0  # seconds per render
    min_output_limit = 1 << 20  # characters; plus four times the conversation's own text

    def __init__(self, source: str, name: str, model_name: str, special_tokens: Mapping[str, str], tokenizer=None,
                 fallback: str | None = None):
        self.source = source
        self.name = name  # "model" for the model's own template, else the built-in format
        self.model_name = model_name = model_name if isinstance(model_name, str) and len(model_name) <= 80 else shown(model_name)
        self.special_tokens = dict(special_tokens)
        self.tokenizer = tokenizer
        # with a fallback (a built-in format's name), a model template that fails to compile or
        # to render is replaced by that format once, and `notice` says so (for the caller to show)
        self.fallback = fallback
        self.notice: str | None = None
        if len(source) > MAX_SOURCE_CHARS:
            raise UserError(f"the chat template of {model_name} is {len(source)} characters long, more than any real "
                            f"template ({MAX_SOURCE_CHARS}); choose a built-in format instead ({', '.join(BUILTIN_FORMATS)})")
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(
                f"the chat template of {model_name} is not valid Jinja ({e.message}, line {e.lineno}); "
                f"choose a built-in format instead ({', '.join(BUILTIN_FORMATS)})"
            ) from None
        except Exception as e:  # noqa: BLE001 - any compile failure is the template's fault
            raise UserError(f"the chat template of {model_name} cannot be compiled ({type(e).__name__}: {e})") from None

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, gguf_file_or_metadata, tokenizer, override: str | None = None, model_name: str | None = None,
                  fallback: bool = False) -> "ChatTemplate":
        """The model's own template, or the built-in format `override` (one of BUILTIN_FORMATS).
        Without either, a built-in format that fits the vocabulary (llama.cpp falls back to chatml).
        With `fallback`, a model template that cannot be compiled or rendered (too slow, too big,
        unsafe, broken; not one that refuses the conversation on purpose) gives way to that
        built-in format, and `notice` says so once."""
        metadata = getattr(gguf_file_or_metadata, "metadata", gguf_file_or_metadata) or {}
        if model_name is None:
            model_name = metadata.get("general.name") or str(getattr(gguf_file_or_metadata, "path", "the model"))
        specials = cls._special_token_strings(tokenizer)
        if override is not None:
            if override not in BUILTIN_FORMATS:
                raise UserError(f"unknown chat format {shown(override)}; choose one of: {', '.join(BUILTIN_FORMATS)}")
            return cls(_BUILTIN_SOURCES[override], override, model_name, specials, tokenizer)
        fmt = cls._builtin_for(tokenizer)
        source = metadata.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            try:
                return cls(source, "model", model_name, specials, tokenizer, fallback=fmt if fallback else None)
            except UserError as err:
                if not fallback:
                    raise
                ct = cls(_BUILTIN_SOURCES[fmt], fmt, model_name, specials, tokenizer)
                ct.notice = cls._fallback_notice(err, fmt)
                log.warning(ct.notice)
                return ct
        return cls(_BUILTIN_SOURCES[fmt], fmt, model_name, specials, tokenizer)

    @staticmethod
    def _fallback_notice(err: UserError, fmt: str) -> str:
        reason = re.sub(r"; choose a built-in format instead.*$", "", str(err))
        return f"{reason}; using the built-in {fmt!r} format instead"

    @staticmethod
    def _builtin_for(tokenizer) -> str:
        """The built-in format that fits a vocabulary (llama.cpp's guess falls back to chatml)."""
        fmt = "chatml"
        if tokenizer is not None and tokenizer.token_id("<|start_header_id|>") is not None:
            fmt = "llama-3"
        elif tokenizer is not None and tokenizer.vocab_type == "spm" and tokenizer.token_id("<|im_start|>") is None:
            fmt = "llama-2"
        return fmt

    @classmethod
    def builtin(cls, name: str, tokenizer=None, model_name: str = "the model") -> "ChatTemplate":
        if name not in BUILTIN_FORMATS:
            raise UserError(f"unknown chat format {name!r}; choose one of: {', '.join(BUILTIN_FORMATS)}")
        return cls(_BUILTIN_SOURCES[name], name, model_name, cls._special_token_strings(tokenizer), tokenizer)

    @staticmethod
    def _special_token_strings(tokenizer) -> dict[str, str]:
        """bos_token/eos_token always (empty if absent: built-in formats concatenate them);
        unk_token/pad_token only when the vocabulary has them, as in HF's special_tokens_map."""
        out = {"bos_token": "", "eos_token": ""}
        if tokenizer is None:
            return out
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("unk_token", "unk_id"), ("pad_token", "pad_id")):
            tid = getattr(tokenizer, attr, None)
            if tid is not None:
                out[key] = tokenizer.token_text(tid)
        return out

    # ---------------------------------------------------------------- rendering
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text, exactly as Hugging Face's apply_chat_template(tokenize=False) gives it."""
        return self._render(self._check_messages(messages), add_generation_prompt)

    def _check_messages(self, messages) -> list[dict[str, Any]]:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise UserError("a conversation must be a list of messages ({'role': ..., 'content': ...})")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise UserError(f"message {i + 1} of the conversation has no 'role' (each message needs a role and a content)")
            out.append(dict(m))
        return out

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._render_strict(messages, add_generation_prompt)
        except _Refused as err:
            if self.fallback is None or self.name != "model":
                raise UserError(str(err)) from None
            reason = str(err)
        fmt, self.fallback = self.fallback, None
        self.notice = self._fallback_notice(UserError(reason), fmt)
        log.warning(self.notice)
        self.source, self.name, self._template = _BUILTIN_SOURCES[fmt], fmt, _ENV.from_string(_BUILTIN_SOURCES[fmt])
        return self._render_strict(messages, add_generation_prompt)

    def take_notice(self) -> str | None:
        """The fallback notice, once (None afterwards and when nothing fell back)."""
        notice, self.notice = self.notice, None
        return notice

    def _render_strict(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        text_len = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        limit = self.min_output_limit + 4 * text_len
        local = _ENV._local
        local.limit = limit
        local.deadline = time.monotonic() + self.time_limit
        tracer = _line_deadline_tracer(local.deadline) if sys.gettrace() is None else None
        pieces: list[str] = []
        size = 0
        try:
            if tracer is not None:
                sys.settrace(tracer)
            for chunk in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            ):
                size += len(chunk)
                if size > limit:
                    raise _RenderLimit("size")
                pieces.append(chunk)
        except _TemplateRaised as e:
            raise UserError(f"the chat template of {self.model_name} refused the conversation: {_clip(str(e))}") from None
        except _RenderLimit as e:
            what = f"took longer than {self.time_limit:g} s to render" if str(e) == "time" else f"produced more than {limit} characters"
            raise _Refused(f"the chat template of {self.model_name} {what}; choose a built-in format instead ({', '.join(BUILTIN_FORMATS)})") from None
        except SecurityError as e:
            raise _Refused(f"the chat template of {self.model_name} tried something unsafe ({_clip(str(e))}); choose a built-in format instead") from None
        except RecursionError:
            raise _Refused(f"the chat template of {self.model_name} recursed too deeply; choose a built-in format instead") from None
        except MemoryError:
            raise _Refused(f"the chat template of {self.model_name} ran out of memory; choose a built-in format instead") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a template does wrong, the user gets one sentence
            raise _Refused(f"the chat template of {self.model_name} failed ({type(e).__name__}: {_clip(str(e))}); choose a built-in format instead") from None
        finally:
            if tracer is not None:
                sys.settrace(None)
            local.deadline = None
            local.limit = None
        return "".join(pieces)

    # ---------------------------------------------------------------- encoding
    def encode(self, messages: Sequence[Mapping[str, Any]], tokenizer=None, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids: the template's markup with special tokens parsed, message text never.
        BOS is added when the vocabulary wants it and the template did not already write it."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError("ChatTemplate.encode needs a tokenizer")
        messages = self._check_messages(messages)
        segments = self.segments(messages, add_generation_prompt)
        bos_text = tok.token_text(tok.bos_id) if tok.bos_id is not None else None
        if tok.add_bos and bos_text and segments and segments[0][1] and segments[0][0].startswith(bos_text):
            # like llama.cpp: the template's own leading BOS text stands for the BOS token
            segments[0] = (segments[0][0][len(bos_text):], True)
            ids = tok.encode_segments(segments, add_special=False)
            return [tok.bos_id] + ids
        ids = tok.encode_segments(segments, add_special=False)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    def segments(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The rendered prompt cut into (text, is_markup) pieces; joined they are render()'s text."""
        messages = self._check_messages(messages)
        plain = self._render(messages, add_generation_prompt)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and c for c in contents):
            return [(plain, True)]
        located = self._locate_with_sentinels(messages, plain, add_generation_prompt)
        if located is None:
            located = _locate_by_search(plain, [c for c in contents if isinstance(c, str) and c])
        return [(text, markup) for text, markup in located if text]

    def _locate_with_sentinels(self, messages, plain, add_generation_prompt):
        contents = [m.get("content") for m in messages]
        if any(isinstance(c, str) and (_OPEN in c or _CLOSE in c) for c in contents) or _OPEN in plain or _CLOSE in plain:
            return None
        wrapped = [dict(m, content=_OPEN + m["content"] + _CLOSE) if isinstance(m.get("content"), str) and m["content"] else m for m in messages]
        try:
            marked = self._render_strict(wrapped, add_generation_prompt)
        except (UserError, _Refused):
            return None
        parts: list[tuple[str, bool]] = []
        pos = 0
        while True:
            o = marked.find(_OPEN, pos)
            if o < 0:
                tail = marked[pos:]
                if _CLOSE in tail:
                    return None
                parts.append((tail, True))
                break
            c = marked.find(_CLOSE, o + 1)
            if c < 0 or _OPEN in marked[o + 1 : c] or _CLOSE in marked[pos:o]:
                return None
            parts.append((marked[pos:o], True))
            parts.append((marked[o + 1 : c], False))
            pos = c + 1
        if "".join(t for t, _ in parts) == plain:
            return parts
        # a template that trims message text (| trim, .strip()) cannot trim inside sentinels
        stripped = [(t if markup else t.strip(), markup) for t, markup in parts]
        if "".join(t for t, _ in stripped) == plain:
            return stripped
        return None


def _locate_by_search(plain: str, contents: list[str]) -> list[tuple[str, bool]]:
    """Fallback: find each message's text (or its stripped form) in order in the rendered text."""
    parts: list[tuple[str, bool]] = []
    pos = 0
    for content in contents:
        for variant in (content, content.strip()):
            if not variant:
                continue
            i = plain.find(variant, pos)
            if i >= 0:
                parts.append((plain[pos:i], True))
                parts.append((variant, False))
                pos = i + len(variant)
                break
    parts.append((plain[pos:], True))
    return parts


def _line_deadline_tracer(deadline: float):
    """A sys.settrace hook that stops a template's own loops at the deadline (a loop with no
    calls or attribute access would otherwise never reach the sandbox's checks)."""
    counter = [0]

    def local(frame, event, arg):
        if event == "line":
            counter[0] += 1
            if counter[0] & 255 == 0 and time.monotonic() > deadline:
                raise _RenderLimit("time")
        return local

    def global_(frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return local
        return None

    return global_
