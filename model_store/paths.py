"""Where llamachat keeps things: platformdirs' user dirs, or all under $LLAMACHAT_HOME.

LLAMACHAT_HOME relocates everything: the config (models.toml), the data (model files, chats)
and the download cache (wheels and the models read out of them) go to `$LLAMACHAT_HOME/config`,
`$LLAMACHAT_HOME/data` and `$LLAMACHAT_HOME/cache`. LLAMACHAT_CACHE_DIR, when set, puts the
cache elsewhere still (the tests give every test its own LLAMACHAT_HOME but one shared cache,
so the model is downloaded once).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "llamachat"


def _home() -> Path | None:
    home = os.environ.get("LLAMACHAT_HOME")
    return Path(home).expanduser() if home else None


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    home = _home()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP))


def models_dir() -> Path:
    return data_dir() / "models"


def cache_dir() -> Path:
    override = os.environ.get("LLAMACHAT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def config_file() -> Path:
    return config_dir() / "models.toml"


def model_file(name_or_path: str | os.PathLike | None = None) -> Path:
    """The GGUF file of a library model (None: the default model; a path to a file: that file),
    for programs that want to load a pulled model themselves:

        from llamachat.model_store.paths import model_file
        from llamachat.runtime import Llama
        llm = Llama(str(model_file("smollm2-135m-instruct")))

    Raises UserError (one sentence naming the library file and the choices) if there is no such
    model or its file is gone."""
    from .library import Library

    return Path(Library.load().resolve(name_or_path).path)
