"""The model library: `models.toml`, the list of models a user has, their defaults, and the
one default model.

The file is for people as much as for the program, so reads are strict but kind (one
sentence naming the file, line, model or field at fault; unknown keys only warn) and writes
keep whatever the user wrote (comments, order, spacing: tomlkit edits the parsed document
in place). Every write is atomic: the new text goes to a temp file in the same folder, is
fsynced and renamed over the old one, whose previous contents are kept as `models.toml.bak`.

Layout (version 1):

    version = 1                      # format version; a newer one makes the file read-only here
    default = "smollm2-135m-instruct"

    [models.smollm2-135m-instruct]
    path = "SmolLM2-135M-Instruct.Q4_1.gguf"   # relative paths are inside the data dir's models/
    description = "..."
    temp = 0.2                       # any key of runtime.params.SETTINGS: that model's default
    n_ctx = 2048

Settings are checked with runtime.params.check_setting, the same table the command-line flags
and the app use.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit
import tomlkit.exceptions

from llamachat.runtime.atomic_file import atomic_output, make_temp_file  # noqa: F401 - pull.py takes make_temp_file from here
from llamachat.runtime.errors import ConfigError, UserError, shown
from llamachat.runtime.params import INT32_MAX, SETTINGS, check_setting, suggestion

from . import paths

try:  # fcntl is POSIX-only; elsewhere writers are simply not serialised against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# The newest layout this program reads and writes. A file with a bigger `version` was written
# by a newer llamachat: we still read what we understand, but refuse to write it.
FORMAT_VERSION = 1

# Bounds that keep reading (and editing) a hostile models.toml in seconds: a library of a
# thousand models with descriptions is some hundred kilobytes and a few thousand values.
MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 10_000  # tables, keys and array items together
MAX_DEPTH = 16  # arrays and tables inside each other
MAX_WARNINGS = 10

# Keys of a [models.NAME] table besides the settings.
ENTRY_KEYS = ("path", "description", "quality")
# `quality` (written by `import --quant ... --report`): the figures measured against the float
# source; only these keys, each a number (source: the source's type as text).
QUALITY_KEYS = {"ppl": float, "source_ppl": float, "kl": float, "top_agree": float, "tokens": int, "source": str}
# Keys of a remote entry ([models.NAME] with backend = "openai") besides the settings.
REMOTE_KEYS = ("backend", "base_url", "model", "api_key_env", "description")
REMOTE_BACKENDS = ("openai",)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
TOP_KEYS = ("version", "default", "models", "resume_budget_mib")
# resume_budget_mib: the disk the app may fill with chats' saved KV caches (instant resume,
# tui/resume.py); 0 turns saving off.
DEFAULT_RESUME_BUDGET_MIB = 1024
MAX_RESUME_BUDGET_MIB = 1 << 20  # a terabyte: any more is a typo


def check_resume_budget(value) -> int:
    """A budget in MiB, typed or read: a whole number 0..MAX; ValueError(sentence) otherwise."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RESUME_BUDGET_MIB:
        raise ValueError(f"resume_budget_mib must be a whole number of MiB from 0 (saving off) to "
                         f"{MAX_RESUME_BUDGET_MIB}, got {shown(value)}")
    return value

# Names are what people type after -m, so keep them shell- and TOML-friendly.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,79}$")

def _settings_comment() -> str:
    """One comment line per setting, from runtime.params.SETTINGS (the one table of rules)."""
    def num(x) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    lines = []
    for setting in SETTINGS.values():
        if setting.type is str:
            allowed = "text"
        elif setting.low is not None and setting.high is not None and setting.high < INT32_MAX:
            allowed = f"{num(setting.low)} .. {num(setting.high)}"
        elif setting.low is not None:
            allowed = f">= {num(setting.low)}"
        else:
            allowed = "any number"
        kind = "integer, " if setting.type is int else ""
        lines.append(f"#     {setting.name:<18} {kind + allowed:<27} {setting.help}".rstrip())
    return "\n".join(lines)


HEADER = f"""\
# llamachat model library. `llamachat models edit` opens this file; `llamachat models --help`
# lists the commands that change it. Edits by hand are welcome: comments and order are kept.
#
# version  the layout of this file (this llamachat writes {FORMAT_VERSION}).
# default  the model used when you give no -m/--model.
# resume_budget_mib  disk space for chats' saved contexts, so a reopened chat is not read
#          again (default {DEFAULT_RESUME_BUDGET_MIB}; 0: off); the least recently used go first.
#
# Each model is a table [models.NAME]; NAME is what you pass to -m. Its keys:
#   path         the .gguf file; a relative path is inside llamachat's data dir (models/).
#   description  free text shown by `llamachat models list/show`.
#   quality      written by `llamachat import --quant TYPE --report`: perplexity (ppl) and
#                that of the float source (source_ppl), mean KL divergence from the source
#                (kl) and how often the top token agrees (top_agree), on `tokens` tokens.
#   and any of these defaults for that model (a command-line flag still wins; a setting
#   left out keeps llama.cpp's default). Every read of this file checks them:
{_settings_comment()}
#
# Example:
#   [models.my-model]
#   path = "/home/me/models/my-model.Q4_K_M.gguf"
#   description = "my fine-tune"
#   temp = 0.7
#   n_ctx = 4096

version = {FORMAT_VERSION}
"""


@dataclass
class ModelEntry:
    """One model: its file, description and its default settings (validated, typed)."""

    name: str
    path: Path
    description: str = ""
    settings: dict = field(default_factory=dict)
    missing: bool = False  # the file is gone (listed, never a crash)
    adhoc: bool = False  # a path given on the command line, not in the library
    quality: dict = field(default_factory=dict)  # QUALITY_KEYS, measured at import (--report)
    remote = False  # a RemoteEntry: a model on an OpenAI-compatible server


@dataclass(eq=False, repr=False)
class RemoteEntry(ModelEntry):
    """A model on an OpenAI-compatible server (backend = "openai"):

        [models.big]
        backend = "openai"
        base_url = "http://127.0.0.1:8080/v1"
        model = "llama-3-8b"          # optional: the server's first model otherwise
        api_key_env = "MY_SERVER_KEY" # optional: the NAME of the variable holding the key

    A key itself is never written here. It has no file: reading `path` (what the local-only
    commands do: perplexity, quantize, bench, tokenize, inspect) refuses in one sentence."""

    backend: str = "openai"
    base_url: str = ""
    model: str | None = None
    api_key_env: str | None = None
    remote = True

    @property
    def path(self):
        raise UserError(f"model {self.name!r} is a remote model ({self.base_url}), and this works on a local "
                        "GGUF file only; give a local library model or a path")

    @path.setter
    def path(self, value) -> None:
        pass  # the dataclass __init__ sets it; a remote model has none

    def __repr__(self) -> str:
        return f"RemoteEntry({self.name!r}, {self.base_url!r}, model={self.model!r})"


def _config_error(file: Path, message: str) -> ConfigError:
    return ConfigError(f"{file}: {message}")


def _syntax_error(file: Path, text: str, err: Exception) -> ConfigError:
    """The TOML syntax error as `FILE, line L, column C: invalid TOML: WHAT`."""
    line = col = None
    what = str(err)
    try:  # Python 3.11+: tomllib states line and column in its message, 1-based
        import tomllib

        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exact:
            what = str(exact)
            m = re.search(r"\(at line (\d+), column (\d+)\)$", what)
            if m:
                line, col = int(m.group(1)), int(m.group(2))
                what = what[: m.start()].strip()
            elif what.endswith("(at end of document)"):
                lines = text.split("\n")
                line, col = len(lines), len(lines[-1]) + 1
                what = what[: -len("(at end of document)")].strip() + " at the end of the file"
    except ImportError:  # pragma: no cover - Python 3.10
        pass
    if line is None and isinstance(err, tomlkit.exceptions.ParseError):
        line, col = err.line, err.col + 1  # tomlkit counts columns from 0
        what = re.sub(r"\s*at line \d+ col \d+$", "", what)
    where = f"line {line}, column {col}" if line is not None else "somewhere"
    what = what[:1].lower() + what[1:]
    return ConfigError(f"{file}, {where}: invalid TOML: {what}")


_suggest = suggestion


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UserError(f"{name!r} is not a usable model name: use letters, digits and . _ + - (up to 80, starting with a letter or digit)")
    return name


def name_from_path(path: Path) -> str:
    """A model name made from a file name: `SmolLM2-135M.Q4_1.gguf` -> `smollm2-135m-q4_1`."""
    stem = Path(path).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    name = re.sub(r"[^a-z0-9_+-]+", "-", stem.lower()).strip("-_+")
    return name[:80] or "model"


def _expand(path) -> Path:
    """Path.expanduser, but `~nosuchuser/x.gguf` stays as written (then it is no such file)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _resolve_model_path(raw: str) -> Path:
    p = _expand(raw)
    if str(p).startswith("~"):  # no such user: kept as written, listed as missing
        return p
    return p if p.is_absolute() else paths.models_dir() / p


def _is_file(path: Path) -> bool:
    """Path.is_file, but an over-long or otherwise impossible path is simply not a file."""
    try:
        return path.is_file()
    except OSError:
        return False


def _stored_path(path: Path) -> str:
    """How a path is written: relative when inside the models dir (so LLAMACHAT_HOME or the
    data dir can move), else absolute."""
    path = _expand(path).resolve()
    try:
        return path.relative_to(paths.models_dir().resolve()).as_posix()
    except ValueError:
        return str(path)


def is_inside_data_dir(path: Path) -> bool:
    try:
        Path(path).resolve().relative_to(paths.data_dir().resolve())
        return True
    except ValueError:
        return False


def parse_plain(text: str, file: Path) -> dict:
    """The TOML as plain Python data (tomllib, fast), checked for size and nesting; ConfigError
    with line and column for bad syntax."""
    try:
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10: tomlkit reads too, more slowly
            return parse_document(text, file)[1]
        try:
            plain = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise _syntax_error(file, text, err) from None
    except RecursionError:
        raise _config_error(file, "values are nested too deeply to be a model library") from None
    _check_shape(plain, file)
    return plain


def _check_shape(plain: dict, file: Path) -> None:
    """At most MAX_VALUES values and MAX_DEPTH levels (walked without recursion)."""
    count = 0
    stack = [(plain, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _config_error(file, f"values are nested more than {MAX_DEPTH} deep; a model library needs no such nesting")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            count += 1
            if count > MAX_VALUES:
                raise _config_error(file, f"holds more than {MAX_VALUES} values, more than a model library needs")
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def parse_document(text: str, file: Path):
    """(tomlkit document, plain dict) or ConfigError with line and column."""
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as err:  # ParseError, KeyAlreadyPresent, ...
        raise _syntax_error(file, text, err) from None
    except RecursionError:
        raise _config_error(file, "values are nested too deeply to be a model library") from None
    try:
        plain = doc.unwrap()
    except Exception as err:  # pragma: no cover - tomlkit accepted something it cannot convert
        raise _config_error(file, f"cannot be read ({err})") from None
    return doc, plain


def check_model_setting(key: str, value):
    """runtime.params.check_setting: the one rule (finite numbers in range, a chat_format that
    names a built-in format), applied when the file is read, not when a chat starts."""
    return check_setting(key, value)


def _interpret_model(name: str, table, file: Path, warnings: list, newer: bool) -> ModelEntry:
    where = f"model {shown(name)}"
    if not isinstance(table, dict):
        raise _config_error(file, f"{where} must be a table ([models.{name}]) with at least a path")
    if not _NAME_RE.match(name):
        raise _config_error(file, f"{where}: the name must use letters, digits and . _ + - (up to 80, starting with a letter or digit)")
    if "backend" in table:
        return _interpret_remote(name, table, file, warnings, newer)
    raw_path = table.get("path")
    if raw_path is None:
        raise _config_error(file, f'{where} needs path = "FILE.gguf"')
    if not isinstance(raw_path, str):
        raise _config_error(file, f"{where}: path must be text, got {raw_path!r}")
    if not raw_path.strip():
        raise _config_error(file, f"{where}: path is empty")
    description, settings = _description_and_settings(table, ENTRY_KEYS, file, where, warnings, newer)
    path = _resolve_model_path(raw_path)
    return ModelEntry(name, path, description, settings, missing=not _is_file(path),
                      quality=_read_quality(table.get("quality"), f"{file}: {where}", warnings))


def _description_and_settings(table, own_keys, file: Path, where: str, warnings: list, newer: bool) -> tuple[str, dict]:
    """An entry's description and settings (every key but `own_keys`, checked by the settings'
    one rule); unknown keys are warned about, unless the file is of a newer format, which may
    well have keys we do not know."""
    description = table.get("description", "")
    if not isinstance(description, str):
        raise _config_error(file, f"{where}: description must be text, got {description!r}")
    settings = {}
    for key, value in table.items():
        if key in own_keys:
            continue
        if key not in SETTINGS:
            if not newer:
                warnings.append(f"{file}: {where}: unknown key {key!r} ignored{_suggest(key, list(SETTINGS) + list(own_keys))}")
            continue
        try:
            settings[key] = check_model_setting(key, value)
        except ValueError as err:
            raise _config_error(file, f"{where}: {err}") from None
    return description, settings


def _read_quality(raw, where: str, warnings: list) -> dict:
    """The `quality` figures, or {} with a warning when they are not what import writes
    (they are informative only: a bad value never makes the library unreadable)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or any(k not in QUALITY_KEYS or isinstance(v, bool) or not isinstance(v, (QUALITY_KEYS[k], int) if QUALITY_KEYS[k] is float else QUALITY_KEYS[k])
                                        for k, v in raw.items()):
        warnings.append(f"{where}: quality is not the table of figures `llamachat import --report` writes; ignored")
        return {}
    return {k: (float(v) if QUALITY_KEYS[k] is float else v) for k, v in raw.items()}


def quality_text(quality: dict) -> str:
    """The import report's figures in a few characters, `KL 0.0123 top 96.1%` (the CLI's
    `models list`, the library screen's table, the model picker); "" without figures."""
    if "kl" not in quality or "top_agree" not in quality:
        return ""
    return f"KL {quality['kl']:.4f} top {100 * quality['top_agree']:.1f}%"


def quality_details(quality: dict) -> str:
    """All the figures in one line (`models show`, the library screen's form); "" without."""
    short = quality_text(quality)
    if not short:
        return ""
    nan = float("nan")
    return (f"{short}; perplexity {quality.get('ppl', nan):.4f} ({quality.get('source', 'F16')} source "
            f"{quality.get('source_ppl', nan):.4f}) on {quality.get('tokens', '?')} tokens")


def check_remote_fields(where: str, base_url, model=None, api_key_env=None, backend="openai") -> None:
    """The rules of a remote entry's fields; ValueError with the sentence."""
    if backend not in REMOTE_BACKENDS:
        raise ValueError(f"{where}: backend must be one of {', '.join(map(repr, REMOTE_BACKENDS))}, got {backend!r}")
    if not isinstance(base_url, str) or not re.match(r"^https?://[^\s/]+", base_url or ""):
        raise ValueError(f"{where}: base_url must be an http:// or https:// URL (like http://127.0.0.1:8080/v1), got {base_url!r}")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError(f"{where}: model must be the server's model name (text), got {model!r}")
    if api_key_env is not None and (not isinstance(api_key_env, str) or not _ENV_NAME_RE.match(api_key_env)):
        raise ValueError(f"{where}: api_key_env must be the NAME of an environment variable (like MY_API_KEY), got {api_key_env!r}")


def _interpret_remote(name: str, table, file: Path, warnings: list, newer: bool) -> "RemoteEntry":
    where = f"model {shown(name)}"
    if "api_key" in table:
        raise _config_error(file, f"{where}: a key is never kept in models.toml; put it in an environment variable "
                                  "and name that variable with api_key_env = \"VAR\"")
    if "path" in table:
        raise _config_error(file, f"{where}: a remote model (backend = ...) has no path; remove one of them")
    try:
        check_remote_fields(where, table.get("base_url"), table.get("model"), table.get("api_key_env"), table.get("backend"))
    except ValueError as err:
        raise _config_error(file, str(err)) from None
    description, settings = _description_and_settings(table, REMOTE_KEYS, file, where, warnings, newer)
    return RemoteEntry(name, None, description, settings, backend=str(table["backend"]), base_url=str(table["base_url"]),
                       model=None if table.get("model") is None else str(table["model"]),
                       api_key_env=None if table.get("api_key_env") is None else str(table["api_key_env"]))


def _interpret(plain: dict, file: Path):
    """Check the plain data; returns (models, default_name, version, warnings)."""
    warnings: list[str] = []
    version = plain.get("version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _config_error(file, f"version must be a whole number of at least 1, got {version!r}")
    newer = version > FORMAT_VERSION
    for key in plain:
        if key not in TOP_KEYS and not newer:
            warnings.append(f"{file}: unknown key {key!r} ignored{_suggest(key, TOP_KEYS)}")

    tables = plain.get("models", {})
    if not isinstance(tables, dict):
        if not newer:
            raise _config_error(file, "`models` must be a table of [models.NAME] tables")
        tables = {}
    models: dict[str, ModelEntry] = {}
    for name, table in tables.items():
        try:
            models[name] = _interpret_model(name, table, file, warnings, newer)
        except ConfigError as err:
            if not newer:
                raise
            # a newer layout may describe a model differently: skip it, say so, keep the rest
            warnings.append(f"{err} (skipped: this llamachat reads version {FORMAT_VERSION})")

    default = plain.get("default")
    if default is not None:
        if not isinstance(default, str):
            if not newer:
                raise _config_error(file, f"default must be a model name (text), got {default!r}")
            default = None
        elif default not in models:
            if not newer:
                known = ", ".join(models) or "none yet"
                raise _config_error(file, f"default = {default!r} names no model in this file (models: {known})")
            default = None
    if newer:
        warnings.append(f"{file} has version {version}, newer than this llamachat understands ({FORMAT_VERSION}): it is read-only here; upgrade llamachat to change it")
    return models, default, version, warnings


def write_atomic(target: Path, text: str, backup: bool = True) -> None:
    """Replace `target` with `text` all at once: temp file in the same dir, fsync, rename.
    With `backup`, the old contents are first kept as TARGET.bak (written the same way).
    A failure at any point leaves the old file as it was. OSError -> UserError."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if backup and target.is_file():
            _replace_with(target.with_name(target.name + ".bak"), target.read_bytes())
        _replace_with(target, text.encode("utf-8"))
    except OSError as err:
        raise UserError(f"could not write {target}: {err.strerror or err}; the previous version is unchanged") from None


def _replace_with(target: Path, data: bytes) -> None:
    with atomic_output(target) as f:  # keeps the user's permissions on the file (e.g. 600)
        f.write(data)


@contextmanager
def _locked(file: Path):
    """Serialise read-modify-write of models.toml between processes (app + CLI)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(file.with_name(file.name + ".lock"), "a")
    except OSError as err:
        raise UserError(f"cannot write in {file.parent}: {err.strerror or err}") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class Library:
    """The parsed models.toml. Every change re-reads the file under a lock, applies itself to
    that document and writes it back, so edits made elsewhere since `load` are not lost."""

    def __init__(self, file: Path, doc, models, default_name, version, warnings, exists: bool, text: str | None = None):
        self.file = Path(file)
        self._doc = doc  # the tomlkit document, parsed from _text only when an edit needs it
        self._text = text
        self.models: dict[str, ModelEntry] = models
        self.default_name: str | None = default_name
        self.version: int = version
        self.warnings: list[str] = warnings
        self.exists = exists
        self.resume_budget_mib: int = DEFAULT_RESUME_BUDGET_MIB

    # ---- reading -------------------------------------------------------------------------

    @classmethod
    def load(cls, file: Path | None = None) -> "Library":
        """The library in `file` (default: paths.config_file()); a missing file is an empty
        library. Raises ConfigError for a file that cannot be used."""
        import stat

        file = Path(file) if file is not None else paths.config_file()
        try:
            st = os.stat(file)
            if not stat.S_ISREG(st.st_mode):
                raise _config_error(file, "is not a regular file (a directory, device or FIFO); it must be a TOML text file")
            if st.st_size > MAX_FILE_BYTES:
                raise _config_error(file, f"is {st.st_size} bytes long, more than a model library needs ({MAX_FILE_BYTES}); it is not read")
            with open(file, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise _config_error(file, f"is more than {MAX_FILE_BYTES} bytes long, more than a model library needs; it is not read")
            text = data.decode("utf-8")
        except FileNotFoundError:
            return cls(file, None, {}, None, FORMAT_VERSION, [], exists=False)
        except UnicodeDecodeError as err:
            raise _config_error(file, f"is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise _config_error(file, f"cannot be read: {err.strerror or err}") from None
        return cls.from_text(text, file)

    @classmethod
    def from_text(cls, text: str, file: Path) -> "Library":
        plain = parse_plain(text, file)
        models, default, version, warnings = _interpret(plain, file)
        if len(warnings) > MAX_WARNINGS:
            warnings = warnings[:MAX_WARNINGS - 1] + [f"{file}: ... and {len(warnings) - MAX_WARNINGS + 1} more warnings like these"]
        lib = cls(file, None, models, default, version, warnings, exists=True, text=text)
        if "resume_budget_mib" in plain:
            try:
                lib.resume_budget_mib = check_resume_budget(plain["resume_budget_mib"])
            except ValueError as err:
                if version <= FORMAT_VERSION:
                    raise _config_error(file, str(err)) from None
        return lib

    def _document(self):
        """The tomlkit document of the file as read (slower than the read: only for edits)."""
        if self._doc is None and self._text is not None:
            self._doc = parse_document(self._text, self.file)[0]
        return self._doc

    @property
    def read_only(self) -> bool:
        return self.version > FORMAT_VERSION

    @property
    def read_only_reason(self) -> str | None:
        if not self.read_only:
            return None
        return (f"{self.file} has version {self.version}, newer than this llamachat understands "
                f"({FORMAT_VERSION}), so it is not changed here; upgrade llamachat to edit the library")

    @property
    def default(self) -> ModelEntry | None:
        return self.models.get(self.default_name) if self.default_name else None

    def get(self, name: str) -> ModelEntry:
        """The entry called `name`, or UserError naming the choices."""
        if name in self.models:
            return self.models[name]
        known = ", ".join(self.models) if self.models else "the library is empty (`llamachat pull` fetches the default model)"
        raise UserError(f"no model named {name!r} in {self.file}{_suggest(name, self.models)}; models: {known}")

    def resolve(self, name_or_path: str | os.PathLike | None) -> ModelEntry:
        """What `-m` means: None -> the default model; a library name -> that entry; a path to
        an existing file not in the library -> an ad-hoc entry (no settings). A library entry
        whose file is gone is an error here (callers are about to load it)."""
        if name_or_path is None:
            if self.default_name is None:
                if self.models:
                    raise UserError(f"no default model is set in {self.file}; choose one with `llamachat models default NAME` or pass -m (models: {', '.join(self.models)})")
                raise UserError("the model library is empty; run `llamachat pull` to fetch the default model, or pass -m FILE.gguf")
            entry = self.models[self.default_name]
        else:
            key = os.fspath(name_or_path)
            entry = self.models.get(key)
            if entry is None:
                candidate = _expand(key)
                if candidate.is_file():
                    resolved = candidate.resolve()
                    for known in self.models.values():  # a path of a library model gets its settings
                        if not known.missing and not known.remote and known.path.resolve() == resolved:
                            return known
                    return ModelEntry(name_from_path(candidate), resolved, adhoc=True)
                if candidate.exists():
                    raise UserError(f"{key} is not a file")
                looks_like_path = key.lower().endswith(".gguf") or os.sep in key or "/" in key
                if looks_like_path:
                    raise UserError(f"{key}: no such file")
                self.get(key)  # raises with the list of names
        if entry.missing:
            raise UserError(f"model {entry.name!r}: its file {entry.path} is gone; point it at the file with `llamachat models set {entry.name} path=FILE` or remove it with `llamachat models remove {entry.name}`")
        return entry

    # ---- writing -------------------------------------------------------------------------

    @contextmanager
    def _editing(self):
        """Re-read the file under the lock, let the caller change the tomlkit document, check
        the result with the same rules as any read, write it atomically, refresh self."""
        if self.read_only:
            raise ConfigError(self.read_only_reason)
        with _locked(self.file):
            current = Library.load(self.file)
            if current.read_only:
                raise ConfigError(current.read_only_reason)
            doc = current._document() if current.exists else tomlkit.parse(HEADER)
            yield doc
            text = tomlkit.dumps(doc)
            fresh = Library.from_text(text, self.file)  # never write what we could not read back
            write_atomic(self.file, text, backup=current.exists)
        self._take(fresh)

    def _take(self, other: "Library") -> None:
        self._doc, self._text, self.models, self.default_name = other._doc, other._text, other.models, other.default_name
        self.version, self.warnings, self.exists = other.version, other.warnings, other.exists
        self.resume_budget_mib = other.resume_budget_mib

    def reload(self) -> "Library":
        self._take(Library.load(self.file))
        return self

    @staticmethod
    def _models_table(doc):
        if "models" not in doc:
            doc["models"] = tomlkit.table(is_super_table=True)
        return doc["models"]

    def add(self, path, name: str | None = None, description: str = "", settings: dict | None = None,
            quality: dict | None = None) -> ModelEntry:
        """Add a GGUF file (validated first: GGUFError if it is not one) under `name`
        (default: made from the file name). The first model added becomes the default.
        `quality`: figures measured at import (QUALITY_KEYS), kept as an inline table."""
        from llamachat.runtime.gguf.reader import GGUFFile

        path = _expand(path)
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if not path.is_file():
            raise UserError(f"{path} is not a file")
        with GGUFFile(path):  # raises GGUFError with the reason
            pass
        name = check_name(name if name is not None else name_from_path(path))
        if not isinstance(description, str):
            raise UserError(f"description must be text, got {description!r}")
        checked = self._check_settings(name, settings or {})
        resolved = path.resolve()
        with self._editing() as doc:
            current = Library.from_text(tomlkit.dumps(doc), self.file)
            if name in current.models:
                raise UserError(f"a model named {name!r} is already in the library; choose another with --name")
            for other in current.models.values():
                if not other.missing and not other.remote and other.path.resolve() == resolved:
                    raise UserError(f"{path} is already in the library as {other.name!r}")
            table = tomlkit.table()
            table["path"] = _stored_path(resolved)
            if description:
                table["description"] = description
            if quality:
                figures = tomlkit.inline_table()
                figures.update({k: v for k, v in quality.items() if k in QUALITY_KEYS})
                table["quality"] = figures
            self._put_entry(doc, current, name, table, checked)
        return self.models[name]

    def _put_entry(self, doc, current: "Library", name: str, table, settings: dict) -> None:
        """Write a new [models.NAME] table with its settings; the first model becomes the default."""
        for key, value in settings.items():
            table[key] = value
        self._models_table(doc)[name] = table
        if current.default_name is None:
            doc["default"] = name

    def add_remote(self, name: str, base_url: str, model: str | None = None, api_key_env: str | None = None,
                   description: str = "", settings: dict | None = None) -> "RemoteEntry":
        """Add a model on an OpenAI-compatible server (the caller checks the endpoint first).
        Only the NAME of the key's environment variable is written, never a key."""
        check_name(name)
        try:
            check_remote_fields(f"model {name!r}", base_url, model, api_key_env)
        except ValueError as err:
            raise UserError(str(err)) from None
        checked = self._check_settings(name, settings or {})
        with self._editing() as doc:
            current = Library.from_text(tomlkit.dumps(doc), self.file)
            if name in current.models:
                raise UserError(f"a model named {name!r} is already in the library; choose another name")
            table = tomlkit.table()
            table["backend"] = "openai"
            table["base_url"] = base_url
            if model:
                table["model"] = model
            if api_key_env:
                table["api_key_env"] = api_key_env
            if description:
                table["description"] = description
            self._put_entry(doc, current, name, table, checked)
        return self.models[name]

    def remove(self, name: str, delete_file: bool = False, force: bool = False) -> Path | None:
        """Remove `name` from the library. With delete_file, also delete its file, but only
        if it is inside llamachat's data dir (or `force`) and no other entry uses it; refused
        otherwise before anything changes. Returns the deleted path, if any. Removing the
        default model leaves no default."""
        entry = self.get(name)
        target = None
        if delete_file and not entry.missing and not entry.remote:
            target = entry.path
            if not force and not is_inside_data_dir(target):
                raise UserError(f"{target} is outside llamachat's data dir ({paths.data_dir()}), so it was not deleted and {name!r} stays in the library; add --force to delete it anyway, or remove without --delete-file")
            users = [o.name for o in self.models.values() if o.name != name and not o.missing and not o.remote
                     and o.path.resolve() == target.resolve()]
            if users:
                raise UserError(f"{target} is also used by {', '.join(users)}, so it was not deleted and {name!r} stays in the library")
        with self._editing() as doc:
            models = doc.get("models")
            if models is None or name not in models:
                raise UserError(f"no model named {name!r} in {self.file} (it was removed meanwhile)")
            del models[name]
            if doc.get("default") == name:
                del doc["default"]
        if target is not None:
            try:
                target.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise UserError(f"{name!r} was removed from the library but its file {target} could not be deleted: {err.strerror or err}") from None
        return target

    def set(self, name: str, **settings) -> ModelEntry:
        """Change settings of `name` (any key of runtime.params.SETTINGS, plus `path` and
        `description`); a value of None removes that key (back to llama.cpp's default)."""
        self.get(name)
        changes = {}
        for key, value in settings.items():
            if value is None:
                changes[key] = None
            elif key == "description":
                if not isinstance(value, str):
                    raise UserError(f"model {name!r}: description must be text, got {value!r}")
                changes[key] = value
            elif key == "path":
                p = _expand(os.fspath(value))
                if not p.is_file():
                    raise UserError(f"{p}: no such file")
                from llamachat.runtime.gguf.reader import GGUFFile

                with GGUFFile(p):
                    pass
                changes[key] = _stored_path(p)
            else:
                changes.update(self._check_settings(name, {key: value}))
        if self.get(name).remote and "path" in changes:
            raise UserError(f"model {name!r} is a remote model; it has no path (change base_url with add-remote after a remove)")
        if "path" in changes and changes["path"] is None:
            raise UserError(f"model {name!r}: path cannot be removed; use `llamachat models remove {name}`")
        with self._editing() as doc:
            models = doc.get("models")
            if models is None or name not in models:
                raise UserError(f"no model named {name!r} in {self.file} (it was removed meanwhile)")
            table = models[name]
            for key, value in changes.items():
                if value is None:
                    if key in table:
                        del table[key]
                else:
                    table[key] = value
        return self.models[name]

    def set_default(self, name: str) -> ModelEntry:
        self.get(name)
        with self._editing() as doc:
            if name not in doc.get("models", {}):
                raise UserError(f"no model named {name!r} in {self.file} (it was removed meanwhile)")
            doc["default"] = name
        return self.models[name]

    def set_resume_budget(self, mib) -> int:
        """Set resume_budget_mib (checked: UserError naming it); the value written."""
        try:
            mib = check_resume_budget(mib)
        except ValueError as err:
            raise UserError(str(err)) from None
        with self._editing() as doc:
            doc["resume_budget_mib"] = mib
        return mib

    @staticmethod
    def _check_settings(name: str, settings: dict) -> dict:
        checked = {}
        for key, value in settings.items():
            if key not in SETTINGS:
                raise UserError(f"unknown setting {key!r}{_suggest(key, SETTINGS)}; settings: {', '.join(SETTINGS)}")
            try:
                checked[key] = check_model_setting(key, value)
            except ValueError as err:
                raise UserError(f"model {name!r}: {err}") from None
        return checked

    def ensure_file(self) -> Path:
        """Create models.toml with its explaining header if it does not exist yet."""
        if not self.file.exists():
            with _locked(self.file):
                if not self.file.exists():
                    write_atomic(self.file, HEADER, backup=False)
            self.reload()
        return self.file



@dataclass
class FileSummary:
    """What `models list/show` (and the app's picker) say about a model file, read from its
    GGUF header. `error` is the one-line reason when the file is missing or not valid."""

    size: int | None = None
    quant: str | None = None
    context_length: int | None = None
    architecture: str | None = None
    name: str | None = None
    error: str | None = None


def file_type_name(file_type, tensor_types) -> str | None:
    """general.file_type as llama.cpp names it (Q4_1, Q4_K_M, F16...); without that key, the
    commonest tensor type other than F32."""
    from llamachat.runtime.gguf.constants import LlamaFileType

    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            name = LlamaFileType(file_type).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"file type {file_type}"
    counts: dict[str, int] = {}
    for t in tensor_types:
        counts[t.name] = counts.get(t.name, 0) + 1
    quantized = {k: v for k, v in counts.items() if k != "F32"} or counts
    return max(quantized, key=quantized.get) if quantized else None


def _clip(text: str, limit: int = 120) -> str:
    """A string from a model file as a listing shows it (the file may hold megabytes of it)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def file_summary(path: Path) -> FileSummary:
    from llamachat.runtime.gguf.reader import GGUFFile

    path = Path(path)
    if not path.is_file():
        return FileSummary(error=f"{path}: no such file")
    summary = FileSummary(size=path.stat().st_size)
    try:
        with GGUFFile(path) as g:
            arch = g.get("general.architecture")
            summary.architecture = _clip(arch) if isinstance(arch, str) else None
            context = g.get(f"{arch}.context_length") if summary.architecture else None
            summary.context_length = int(context) if isinstance(context, int) and not isinstance(context, bool) else None
            summary.quant = file_type_name(g.get("general.file_type"), (t.ggml_type for t in g.tensors.values()))
            name = g.get("general.name")
            summary.name = _clip(name) if isinstance(name, str) else None
    except UserError as err:
        summary.error = str(err)
    return summary
