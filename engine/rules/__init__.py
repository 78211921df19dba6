"""Rule containers: load YAML, check it, compile it, run its tests."""

from engine.rules.compile import compile_container, load, parse_duration
from engine.rules.model import Container, Tag, Trigger

__all__ = ["Container", "Tag", "Trigger", "compile_container", "load", "parse_duration"]
