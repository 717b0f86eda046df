"""Prompt files shipped with llamachat (`--prompt-file NAME` finds them here)."""

from importlib import resources
from pathlib import Path


def shipped_prompt_names() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files(__name__).iterdir() if p.name.endswith(".txt"))


def find_prompt_file(name_or_path: str) -> Path | None:
    """A path as given if it exists, else a shipped prompt by name (with or without .txt)."""
    path = Path(name_or_path).expanduser()
    if path.exists():  # a directory or device too: the reader refuses it with the right reason
        return path
    stem = name_or_path[:-4] if name_or_path.endswith(".txt") else name_or_path
    candidate = resources.files(__name__) / f"{stem}.txt"
    return Path(str(candidate)) if candidate.is_file() else None
