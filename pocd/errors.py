"""The one exception hierarchy of pocd. Exceptions carry their data as attributes.

Recoverable errors (a device timeout, a garbled frame) stay inside the runner that owns them and
become incidents; only fatal errors end the daemon.
"""

from __future__ import annotations

__all__ = [
    "AccessError",
    "CommitTimeout",
    "ConfigError",
    "ConfigProblem",
    "DeviceError",
    "DeviceReadError",
    "FrameError",
    "PocdError",
    "RecordRejected",
    "RunError",
    "SignatureRequired",
    "StoreError",
]


class PocdError(Exception):
    """Base of every error pocd raises on purpose."""


class ConfigProblem:
    """One problem in one file: where (file, key path, device) and what."""

    __slots__ = ("device", "file", "key", "message")

    def __init__(self, file: str, key: str, message: str, device: str | None = None) -> None:
        self.file = file
        self.key = key
        self.message = message
        self.device = device

    def __str__(self) -> str:
        where = f"{self.file}: {self.key or '<top>'}"
        if self.device:
            where += f" (device {self.device!r})"
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self!s})"


class ConfigError(PocdError):
    """A site config, protocol or driver file is invalid. Holds every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RunError(PocdError):
    """A run operation was refused (draft protocol, inactive site, unknown phase, ...)."""


class SignatureRequired(RunError):
    """The operation is critical: it is done only with the actor's electronic signature."""


class AccessError(PocdError):
    """Who is asking may not do this: not logged in, a wrong password, a role that does not
    allow it, a locked account, a password that breaks the policy. The message says which."""


class StoreError(PocdError):
    """The embedded store cannot be opened, read or written (a full disk, an I/O error), or is
    not a pocd store of a known version."""


class RecordRejected(StoreError):
    """A batch was not stored because of what one of its records holds (a constraint, a value
    SQLite cannot hold), not because of the store: retrying the same batch fails again."""


class CommitTimeout(PocdError):
    """What an operation recorded is not committed yet: the store has not answered in time.
    The records wait, in order, and are committed once it does."""


class DeviceError(PocdError):
    """A device could not be reached or answered wrongly."""

    def __init__(self, message: str, *, device: str, code: str = "error") -> None:
        self.device = device
        self.code = code
        super().__init__(f"device {device!r}: {message}")


class DeviceReadError(DeviceError):
    """Reading one address of a device failed."""

    def __init__(self, message: str, *, device: str, address: str, code: str = "read") -> None:
        self.address = address
        super().__init__(f"{address}: {message}", device=device, code=code)


class FrameError(DeviceError):
    """A frame from a device could not be parsed. Holds the raw bytes."""

    def __init__(self, message: str, *, device: str, raw: bytes, code: str = "unparseable") -> None:
        self.raw = raw
        super().__init__(f"{message}: {raw!r}", device=device, code=code)
