"""Where llamachat keeps things: platformdirs' user dirs, or all under $LLAMACHAT_HOME.

LLAMACHAT_HOME relocates the config (models.toml) and the data (model files, chats) to
`$LLAMACHAT_HOME/config` and `$LLAMACHAT_HOME/data`. The download cache (wheels and the
models read out of them) stays in the user cache dir unless LLAMACHAT_CACHE_DIR is set, so
tests that use a throw-away LLAMACHAT_HOME still reuse one download between runs.
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
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir(APP))


def config_file() -> Path:
    return config_dir() / "models.toml"
