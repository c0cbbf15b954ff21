"""The engine: pure evaluation of samples against protocol limits (see core.py)."""

from pocd.engine.core import Engine, EngineEvent, ParameterView

__all__ = ["Engine", "EngineEvent", "ParameterView"]
