"""Logging setup: structlog, JSON lines when not on a terminal (systemd), readable on one.

Context (device, run) is bound with structlog.contextvars by the tasks that own it.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

__all__ = ["configure_logging"]


def configure_logging(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog for the process: to `stream` (stderr), JSON unless it is a tty."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    # Libraries (asyncua, pymodbus) log through the standard library: same stream, warnings up.
    logging.basicConfig(
        level=logging.WARNING,
        stream=stream,
        force=True,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # No locals in a traceback: a request's would show its session and body.
    tracebacks = structlog.dev.RichTracebackFormatter(show_locals=False)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(exception_formatter=tracebacks)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
