"""The alarm layer: ISA-18.2 alarm conditions over the engine's excursions (see states.py), and
their rate KPIs (kpis.py). Pure: it makes `AlarmEvent`s and sends none of them."""

from pocd.alarms.kpis import AlarmKey, AlarmKpis
from pocd.alarms.states import (
    AlarmCommand,
    AlarmError,
    Alarms,
    AlarmSettings,
    AlarmView,
    Scope,
    default_priority,
    view_json,
)

__all__ = [
    "AlarmCommand",
    "AlarmError",
    "AlarmKey",
    "AlarmKpis",
    "AlarmSettings",
    "AlarmView",
    "Alarms",
    "Scope",
    "default_priority",
    "view_json",
]
