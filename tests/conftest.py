"""Shared fixtures: a rule container written into a temporary directory."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[..., Path]:
    """Write YAML rule files (dedented) into a fresh container directory and return it."""

    def write(*texts: str, **named: str) -> Path:
        container = tmp_path / "rules"
        container.mkdir(exist_ok=True)
        files = {f"rules{i or ''}.yaml": text for i, text in enumerate(texts)} | named
        for name, text in files.items():
            (container / name).write_text(textwrap.dedent(text).lstrip("\n"))
        return container

    return write
