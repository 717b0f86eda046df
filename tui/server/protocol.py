"""What `llamachat serve` accepts and answers, in OpenAI's shapes, with no I/O.

Owns `ApiError` (OpenAI's error object with its HTTP status), the JSON body parser (NaN and
Infinity refused, nesting bounded) and the checks that turn a request body into a typed
`GenerationRequest`: every field we know is checked for its JSON type, numbers for being
finite, and then by the rule the command line uses for the same setting
(runtime.params.check_setting), so `temperature: -1` is refused here exactly as `--temp -1`
is. Fields of OpenAI's API that mean nothing here (user, store, metadata, ...) and unknown
fields are ignored, as llama.cpp's server does; fields we cannot honour (n > 1, tools,
logprobs, a JSON response format) are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from llamachat.runtime.params import check_setting

# request field -> the runtime.params setting it sets (and is checked as)
SAMPLING_FIELDS = {
    "temperature": "temp",
    "top_p": "top_p",
    "top_k": "top_k",  # llama.cpp's extras from here on
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat",
    "mirostat_mode": "mirostat",  # llama-cpp-python's name
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "seed": "seed",
}
# fields that cap the reply's length, the later ones winning (OpenAI's newer name, then llama.cpp's)
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1000
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias, -100 (ban) to 100 (force)


class ApiError(Exception):
    """An answer other than success: HTTP status + OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict:
    """The request body as a dict, or ApiError(400) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid(f"the request body is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise invalid("the request body is empty: send a JSON object")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError is a ValueError, as is NaN / Infinity
        raise invalid(f"the request body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@dataclass
class GenerationRequest:
    """One checked /v1/chat/completions or /v1/completions request."""

    kind: str  # "chat" | "completion"
    model: str | None = None
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    settings: dict = field(default_factory=dict)  # runtime.params setting name -> checked value
    max_tokens: int | None = None  # None: not given; -1: no limit
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    inputs: list | None = None  # embedding: texts and/or token id lists
    encoding_format: str = "float"


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {_json_type(value)}", name)
    return value


def _number(body: dict, name: str, setting: str):
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {_json_type(value)}", name)
    if isinstance(value, float) and not math.isfinite(value):
        # json reads 1e999 as infinity; the settings' range checks let NaN through
        raise invalid(f"{name} must be a finite number, got {value!r}", name)
    try:
        return check_setting(setting, value)
    except ValueError as err:
        message = str(err)
        if message.startswith(setting + " "):  # the CLI's sentence names the setting; name the field
            message = name + message[len(setting):]
        raise invalid(message, name) from None


def _max_tokens(body: dict) -> int | None:
    chosen = None
    for name in LENGTH_FIELDS:
        if body.get(name) is None:
            continue
        value = _number(body, name, "n_predict")
        if value == 0 or value < -1:
            raise invalid(f"{name} must be at least 1 (or -1 for no limit), got {value}", name)
        chosen = value
    return chosen


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop must be a string or an array of strings", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in items):
        raise invalid(f"each stop string may be at most {MAX_STOP_LENGTH} characters long", "stop")
    return [s for s in items if s]


def _logit_bias(body: dict) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("logit_bias must be an object mapping token ids to numbers from -100 to 100", "logit_bias")
    bias: dict[int, float] = {}
    for key, number in value.items():
        if not key.strip().isdigit():
            raise invalid(f"logit_bias keys must be token ids (whole numbers), got {key!r}", "logit_bias")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise invalid(f"logit_bias[{key!r}] must be a number from -100 to 100, got {_json_type(number)}", "logit_bias")
        if not -LOGIT_BIAS_LIMIT <= number <= LOGIT_BIAS_LIMIT:
            raise invalid(f"logit_bias[{key!r}] must be from -100 to 100, got {number}", "logit_bias")
        bias[int(key)] = float(number)
    return bias


def _refuse_unsupported(body: dict, kind: str) -> None:
    """Fields that would change the answer's shape in ways this server cannot honour."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise invalid(f"{name} must be 1: this server makes one choice per request", name)
    if kind == "chat":
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
            raise invalid("logprobs are not supported by this server", "logprobs")
        for name in ("tools", "functions"):
            if body.get(name):
                raise invalid(f"{name} (function calling) is not supported by this server", name)
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise invalid("response_format: only {\"type\": \"text\"} is supported by this server", "response_format")
    else:
        if body.get("logprobs") not in (None, 0):
            raise invalid("logprobs are not supported by this server", "logprobs")
        if body.get("suffix") not in (None, ""):
            raise invalid("suffix (insertion) is not supported by this server", "suffix")


def _message_content(content, i: int) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise invalid(f"{param}: only text parts are supported, got {kind!r}", param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{param} must be a string or an array of text parts, got {_json_type(content)}", param)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise invalid(f"messages[{i}] must be an object with a role and a content", f"messages[{i}]")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            shown = role if isinstance(role, str) else _json_type(role)
            raise invalid(f"messages[{i}].role must be one of system, user, assistant (got {shown!r})", f"messages[{i}].role")
        if "content" not in msg or msg["content"] is None:
            raise invalid(f"messages[{i}] has no content", f"messages[{i}].content")
        out.append({"role": CHAT_ROLES[role], "content": _message_content(msg["content"], i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise invalid("prompt token ids must not be negative", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt: send one prompt per request (batches are not supported)", "prompt")
    raise invalid("prompt must be a string or a non-empty array of token ids", "prompt")


def parse_generation(body: dict, kind: str) -> GenerationRequest:
    """Check a /v1/chat/completions (kind "chat") or /v1/completions ("completion") body."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise invalid("model must be the name of a model (GET /v1/models lists them)", "model")
    _refuse_unsupported(body, kind)
    req = GenerationRequest(kind=kind, model=model)
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
        req.echo = _bool(body, "echo")
    for name, setting in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            req.settings[setting] = _number(body, name, setting)
    req.max_tokens = _max_tokens(body)
    req.stop = _stop(body)
    req.logit_bias = _logit_bias(body)
    req.ignore_eos = _bool(body, "ignore_eos")
    _bool(body, "cache_prompt")  # llama.cpp's switch: the cache is always reused here
    req.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
        req.include_usage = _bool(options, "include_usage")
    return req


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one request


def _embedding_input(value, where: str):
    if isinstance(value, str):
        if not value:
            raise invalid(f"{where} is an empty string: there is nothing to embed", "input")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(t < 0 for t in value):
            raise invalid(f"{where}: token ids must not be negative", "input")
        return list(value)
    raise invalid(f"{where} must be a non-empty string or a non-empty array of token ids", "input")


def parse_embedding(body: dict) -> GenerationRequest:
    """Check a /v1/embeddings body: input as a string, an array of strings, an array of token
    ids or an array of such arrays; encoding_format "float" or "base64"."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise invalid("model must be the name of a model (GET /v1/models lists them)", "model")
    if "input" not in body:
        raise invalid("input is missing: give the text (or texts) to embed", "input")
    value = body["input"]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        inputs = [_embedding_input(value, "input")]
    elif isinstance(value, list) and value:
        inputs = [_embedding_input(v, f"input[{i}]") for i, v in enumerate(value)]
    else:
        inputs = [_embedding_input(value, "input")]
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} per request", "input")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise invalid(f"encoding_format must be \"float\" or \"base64\", got {fmt!r:.40}", "encoding_format")
    if body.get("dimensions") is not None:
        raise invalid("dimensions is not supported: this server returns the model's full embedding", "dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f"user must be a string, got {_json_type(user)}", "user")
    return GenerationRequest(kind="embedding", model=model, inputs=inputs, encoding_format=fmt)
