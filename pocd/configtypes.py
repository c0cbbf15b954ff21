"""Building blocks shared by every configuration model: strict models, durations and paths.

Kept apart from settings.py so that transports can declare their own settings models without
importing the site loader. A setting that names a file or a folder is typed `ConfigFile`,
`ConfigFolder` or `DevicePath`: relative paths are resolved against the folder of the config
file that says them (the loader passes it as the validation context `base`), and
`config_paths` finds every such setting of a model, so that `pocd check` can make sure each
file can be read. Nothing here reads or opens a file.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo
from pydantic.fields import FieldInfo

__all__ = [
    "ConfigFile",
    "ConfigFolder",
    "DevicePath",
    "Duration",
    "PathUse",
    "StrictModel",
    "config_paths",
    "field_path_use",
    "parse_duration",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)")


class StrictModel(BaseModel):
    """Unknown keys are errors; values are not coerced between types silently.

    TOML allows `nan` and `inf`; no pocd setting can mean either, and a NaN limit would compare
    false against every reading and so never alarm. They are rejected everywhere.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


_DURATION_HINT = "a duration is a number of seconds or a string like '90s', '5m', '1h30m', '250ms'"


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as "90s", "5m", "1h30m", "250ms"."""
    # ValueError, not TypeError, throughout: pydantic turns only ValueError into a located error.
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_HINT} (got {value!r})")  # noqa: TRY004
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = list(_PART.finditer(text))
        if not parts or "".join(p.group(0) for p in parts) != text:
            raise ValueError(f"{value!r} is not a duration like '90s', '5m', '1h30m', '250ms'")
        seconds = sum(float(p.group(1)) * _UNITS[p.group(2)] for p in parts)
    else:
        raise ValueError(f"{_DURATION_HINT} (got {value!r})")  # noqa: TRY004
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite (got {value!r})")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative (got {value!r})")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


# --- paths ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathUse:
    """Marks a setting that names a path, and what pocd does with it: reads a `file`, lists a
    `folder`, or opens a `device` (a serial port: it may come and go, and is not checked)."""

    kind: Literal["file", "folder", "device"]


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """The path against the config file's folder (the context's `base`), if it is relative.
    Without a context (a driver file checked alone, a model built in code) it stays as written;
    a URL (`socket://gateway:4001`, which pyserial opens) is not a path."""
    base = info.context.get("base") if isinstance(info.context, dict) else None
    if base is None or "://" in value or Path(value).is_absolute():
        return value
    return str(Path(base) / value)


ConfigFile = Annotated[str, AfterValidator(_resolve_path), PathUse("file")]
"""A file pocd reads (a certificate, a key, a password file): `pocd check` reads it."""
ConfigFolder = Annotated[str, AfterValidator(_resolve_path), PathUse("folder")]
"""A folder pocd lists (a folder of trusted certificates): `pocd check` lists it."""
DevicePath = Annotated[str, AfterValidator(_resolve_path), PathUse("device")]
"""A device node such as a serial port: resolved like the others, not checked (a USB adapter
that is unplugged is a communication fault of its device, not a config error)."""


def field_path_use(info: FieldInfo) -> PathUse | None:
    """What a model's field does with the path it names; None if it names none."""
    return _path_use(info.annotation, info.metadata)


def _path_use(annotation: object, metadata: list[object]) -> PathUse | None:
    for item in metadata:
        if isinstance(item, PathUse):
            return item
    # `ConfigFile | None`: the marker sits inside the union's Annotated member.
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            if typing.get_origin(member) is Annotated:
                found = _path_use(None, list(member.__metadata__))
                if found is not None:
                    return found
    return None


def config_paths(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, PathUse]]:
    """(key path, path, use) of every path setting that is set in `model`, nested models,
    lists and tables of models included."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}.{name}" if prefix else name
        use = field_path_use(info)
        if use is not None and isinstance(value, str):
            yield key, value, use
        else:
            yield from _nested_paths(value, key)


def _nested_paths(value: object, key: str) -> Iterator[tuple[str, str, PathUse]]:
    if isinstance(value, BaseModel):
        yield from config_paths(value, key)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _nested_paths(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _nested_paths(item, f"{key}.{name}")
