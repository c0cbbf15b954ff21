"""Helpers for the malformed-file tables of test_config.py and test_protocol.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bad:
    """A malformed variant of a valid base file and the problem it must produce."""

    edits: tuple[tuple[str | None, str], ...]
    key: str
    message: str  # a part of the message
    device: str | None = None


def edit(text: str, *edits: tuple[str | None, str]) -> str:
    """Apply (old, new) replacements; old=None appends. Each old must occur exactly once."""
    for old, new in edits:
        if old is None:
            text += new
        else:
            assert text.count(old) == 1, f"edit target not unique in the base text: {old!r}"
            text = text.replace(old, new)
    return text


def where(file: Path | str, key: str, device: str | None = None) -> str:
    """The start of a problem line, as ConfigProblem prints it."""
    return f"{file}: {key}" + (f" (device {device!r})" if device else "") + ": "


def find_problem(lines: list[str], file: Path | str, key: str, device: str | None) -> str:
    prefix = where(file, key, device)
    matches = [line for line in lines if line.startswith(prefix)]
    assert matches, f"no problem at {prefix!r} in:\n" + "\n".join(lines)
    return matches[0]
