"""The report's charts, drawn with matplotlib (Agg, no pyplot: no global state, no GUI): one
critical parameter's min/max envelope (pocd.release.charts) over the run's phases, with the
alert and action bands of each phase and the gaps of gaps.csv, as PNG for report.pdf.

Must not: read files or the store; the report gives it everything it draws.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pocd.release.charts import Envelope

__all__ = ["CHART_DPI", "CHART_H", "CHART_W", "Limits", "Span", "chart_png"]

CHART_DPI: Final = 120
CHART_W, CHART_H = 7.2, 3.1  # inches

# (phase, parameter) -> that phase's limits of the parameter (run.json's form), None if none.
Limits = Callable[[str, str], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class Span:
    """A phase of the timeline: [start_ns, end_ns)."""

    number: int
    phase: str
    start_ns: int
    end_ns: int
    in_order: bool


def chart_png(
    parameter: dict[str, Any],
    envelope: Envelope,
    spans: list[Span],
    gaps: list[dict[str, str]],
    window: tuple[int, int],
    limits: Limits,
) -> bytes:
    """One critical parameter's chart as PNG: its envelope over the phases, the alert and
    action bands of each phase, and its gaps."""
    name = str(parameter["id"])
    fig = Figure(figsize=(CHART_W, CHART_H), dpi=CHART_DPI)
    FigureCanvasAgg(fig)  # draws without pyplot: no global state, no GUI backend
    ax = fig.add_axes((0.075, 0.25, 0.89, 0.63))
    bottom, top = _y_range(limits, name, envelope, spans)
    ax.set_ylim(bottom, top)
    ax.set_xlim(_when(window[0]), _when(window[1]))
    for span in spans:
        _draw_phase(ax, span, window, limits(span.phase, name), (bottom, top))
    _draw_gaps(ax, gaps, window)
    uncertain = _draw_envelope(ax, envelope, bottom)
    _decorate(fig, ax, parameter, uncertain=uncertain)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=CHART_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _when(t_ns: int | npt.NDArray[np.int64]) -> Any:
    """Nanoseconds as what matplotlib plots as dates (UTC)."""
    return np.asarray(t_ns, dtype="datetime64[ns]")


def _y_range(
    limits: Limits, name: str, envelope: Envelope, spans: list[Span]
) -> tuple[float, float]:
    """The data and every limit drawn, with a margin."""
    drawn = []
    for span in spans:
        of_phase = limits(span.phase, name) or {}
        if of_phase.get("monitored", True):
            drawn += [
                float(v)
                for k in ("alert_low", "alert_high", "action_low", "action_high")
                if isinstance(v := of_phase.get(k), int | float)
            ]
    low, high = envelope.low, envelope.high
    values = np.concatenate(
        [low[np.isfinite(low)], high[np.isfinite(high)], np.asarray(drawn, np.float64)]
    )
    least, most = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = (most - least) * 0.08 or max(abs(most) * 0.05, 0.5)
    return least - pad, most + pad


def _draw_phase(
    ax: Any,
    span: Span,
    window: tuple[int, int],
    limits: dict[str, Any] | None,
    y: tuple[float, float],
) -> None:
    """A phase: shaded every other one, its number (and name, if it fits) above the plot,
    and its limits: bands, or a dotted area where the parameter is not monitored."""
    start_ns, end_ns = window
    left, right = _when(max(span.start_ns, start_ns)), _when(min(span.end_ns, end_ns))
    if span.number % 2 == 0:
        ax.axvspan(left, right, color="#eef0f3", zorder=0, lw=0)
    if span.start_ns > start_ns:
        ax.axvline(left, color="#8a929c", lw=0.6, ls=":", zorder=1)
    middle = _when((max(span.start_ns, start_ns) + min(span.end_ns, end_ns)) // 2)
    wide = (span.end_ns - span.start_ns) / (end_ns - start_ns) > 0.012 * (len(span.phase) + 3)
    ax.text(
        middle,
        1.015,
        f"{span.number} {span.phase}" if wide else str(span.number),
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="bottom",
        fontsize=6.5,
        color="#333333" if span.in_order else "#a8001c",
    )
    if limits is None:
        return
    if limits.get("monitored") is False:
        ax.axvspan(left, right, facecolor="none", edgecolor="#b0b6be", hatch="..", lw=0, zorder=1)
        return
    _bands(ax, left, right, limits, *y)


def _draw_gaps(ax: Any, gaps: list[dict[str, str]], window: tuple[int, int]) -> None:
    """The gaps of gaps.csv, hatched, at least a few pixels wide so a short one shows."""
    start_ns, end_ns = window
    least = (end_ns - start_ns) // 300
    for gap in gaps:
        g0, g1 = int(gap["start_ns"]), int(gap["end_ns"] or end_ns)
        if g1 - g0 < least:
            middle = (g0 + g1) // 2
            g0, g1 = middle - least // 2, middle + least // 2
        ax.axvspan(
            _when(g0),
            _when(g1),
            facecolor="#d9d9d9",
            edgecolor="#555555",
            hatch="////",
            lw=0.4,
            zorder=2,
            alpha=0.9,
        )


def _draw_envelope(ax: Any, envelope: Envelope, bottom: float) -> bool:
    """The envelope, filled from low to high with both edges drawn so a flat signal still
    shows; a tick on the time axis under each bucket with an uncertain value. Returns whether
    there was one."""
    starts = envelope.starts_ns
    x = _when(np.append(starts, starts[-1] + envelope.width_ns))
    lo, hi = np.append(envelope.low, envelope.low[-1]), np.append(envelope.high, envelope.high[-1])
    ax.fill_between(x, lo, hi, step="post", color="#1f4e9a", alpha=0.55, lw=0, zorder=3)
    for edge in (lo, hi):
        ax.plot(x, edge, drawstyle="steps-post", color="#1f4e9a", lw=0.6, zorder=3)
    uncertain = envelope.uncertain > 0
    if not uncertain.any():
        return False
    ticks = _when(starts[uncertain] + envelope.width_ns // 2)
    ax.plot(ticks, np.full(len(ticks), bottom), "|", color="#d98200", ms=6, zorder=4, clip_on=False)
    return True


def _decorate(fig: Figure, ax: Any, parameter: dict[str, Any], *, uncertain: bool) -> None:
    """Title, axes and legend."""
    unit = str(parameter.get("unit") or "")
    title = f"{parameter['id']} ({unit})"
    if parameter.get("description"):
        title += f" - {parameter['description']}"
    ax.set_title(title, fontsize=8.5, loc="left", pad=12)
    ax.set_ylabel(unit, fontsize=7.5)
    ax.tick_params(labelsize=6.5)
    locator = AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))  # type: ignore[no-untyped-call]
    ax.grid(axis="y", color="#dde1e6", lw=0.5, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [
        Patch(facecolor="#1f4e9a", alpha=0.55, label="values (min to max per bucket)"),
        Patch(facecolor="#f6c98e", edgecolor="#d98200", label="alert band"),
        Patch(facecolor="#f2b8c0", edgecolor="#c8102e", label="outside action limits"),
        Patch(facecolor="#d9d9d9", edgecolor="#555555", hatch="////", label="data gap"),
        Patch(facecolor="white", edgecolor="#b0b6be", hatch="..", label="not monitored"),
    ]
    if uncertain:
        handles.append(Patch(facecolor="#d98200", label="uncertain value (tick)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=6, frameon=False)


def _bands(
    ax: Any, left: Any, right: Any, limits: dict[str, Any], bottom: float, top: float
) -> None:
    """One phase's alert and action bands: shaded outside each limit, the limits as lines."""

    def value(key: str) -> float | None:
        v = limits.get(key)
        return float(v) if isinstance(v, int | float) else None

    alert_low, alert_high = value("alert_low"), value("alert_high")
    action_low, action_high = value("action_low"), value("action_high")
    x = [left, right]
    if action_high is not None:
        ax.fill_between(x, action_high, top, color="#f2b8c0", alpha=0.6, lw=0, zorder=1)
        ax.hlines(action_high, left, right, color="#c8102e", lw=0.9, zorder=4)
    if action_low is not None:
        ax.fill_between(x, bottom, action_low, color="#f2b8c0", alpha=0.6, lw=0, zorder=1)
        ax.hlines(action_low, left, right, color="#c8102e", lw=0.9, zorder=4)
    if alert_high is not None:
        ax.fill_between(
            x,
            alert_high,
            action_high if action_high is not None else top,
            color="#f6c98e",
            alpha=0.45,
            lw=0,
            zorder=1,
        )
        ax.hlines(alert_high, left, right, color="#d98200", lw=0.8, ls="--", zorder=4)
    if alert_low is not None:
        ax.fill_between(
            x,
            action_low if action_low is not None else bottom,
            alert_low,
            color="#f6c98e",
            alpha=0.45,
            lw=0,
            zorder=1,
        )
        ax.hlines(alert_low, left, right, color="#d98200", lw=0.8, ls="--", zorder=4)


# --- the record tables ---------------------------------------------------------------------
