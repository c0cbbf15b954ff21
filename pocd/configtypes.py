"""Building blocks shared by every configuration model: strict models and durations.

Kept apart from settings.py so that transports can declare their own settings models without
importing the site loader.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Duration", "StrictModel", "parse_duration"]

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
