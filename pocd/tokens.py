"""The CLI's saved sessions: the bearer token `pocd login` got, per API address.

One file per OS user, `$XDG_CONFIG_HOME/pocd/tokens.json` (`~/.config/pocd/tokens.json`
without it), the file 0600 and its folder 0700: a token is as good as the password until its
session ends. Keyed by the API's address (`api.listen`), each with its login and expiry.
Rewritten whole (a new file renamed over the old), so a reader never sees half of one.

Nothing here talks to the daemon or asks for a password: the CLI does.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pocd.errors import PocdError

__all__ = ["SavedToken", "TokenFileError", "find", "forget", "save", "tokens_path"]


class TokenFileError(PocdError):
    """The saved tokens file cannot be read or written; `path` is the file."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True, slots=True)
class SavedToken:
    """A session of `login` at one API: its bearer token, session id and expiry (ISO 8601)."""

    login: str
    token: str = field(repr=False)
    session: str
    expires: str


def tokens_path() -> Path:
    # The XDG base directory spec: a relative or empty XDG_CONFIG_HOME is to be ignored.
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "pocd" / "tokens.json"


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TokenFileError(f"cannot read it: {exc.strerror}", path=path) from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TokenFileError("not a pocd tokens file: remove it and log in again", path=path)
    return data


def find(listen: str) -> SavedToken | None:
    """The token saved for the API at `listen`, if any."""
    path = tokens_path()
    entry = _load(path).get(listen)
    if entry is None:
        return None
    try:
        return SavedToken(
            str(entry["login"]), str(entry["token"]), str(entry["session"]), str(entry["expires"])
        )
    except (KeyError, TypeError):
        raise TokenFileError(
            f"the entry of {listen} is not a saved token: log in again", path=path
        ) from None


def save(listen: str, token: SavedToken) -> Path:
    """Save `token` for the API at `listen` (replacing the one there was); the file's path."""
    path = tokens_path()
    data = _load(path)
    data[listen] = asdict(token)
    _write(path, data)
    return path


def forget(listen: str) -> bool:
    """Remove the token of the API at `listen`; whether there was one."""
    path = tokens_path()
    data = _load(path)
    if data.pop(listen, None) is None:
        return False
    _write(path, data)
    return True


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)  # made by someone else, it may be open to others
        # mkstemp makes the file 0600 before anything is written to it.
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tokens.", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise TokenFileError(f"cannot write it: {exc.strerror}", path=path) from None
