"""What the ``tagrelay`` commands share: output, settings, the rule container and the store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import Settings, load_settings
from engine.errors import ConfigError, StoreError
from engine.rules import compile_container
from engine.rules.model import Container

if TYPE_CHECKING:
    from engine.store.sqlite import SQLiteStore


def out(text: str = "") -> None:
    """Print a line of a command's output."""
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    """Print a line to stderr (problems, notes)."""
    sys.stderr.write(text + "\n")


def load_container(path: Path) -> Container | None:
    """The container at ``path``, its problems printed to stderr; None when it has errors."""
    container, problems = compile_container(path)
    for problem in problems:
        err(str(problem))
    return container


def command_settings(args: argparse.Namespace) -> Settings:
    """Settings with the command's flags over the environment and the config file."""
    names = ("bind", "metrics_bind", "workers", "rules", "data_dir")
    flags = {name: getattr(args, name, None) for name in names}
    return load_settings(flags=flags)


def open_store(settings: Settings) -> SQLiteStore:
    """The store, created when there is none (``worker``)."""
    from engine.store.sqlite import SQLiteStore

    try:
        return SQLiteStore(settings.database_path, settings.sqlite_sync)
    except StoreError as exc:
        raise StoreError(f"the store {settings.database_path} cannot be used: {exc}") from exc


def existing_store(settings: Settings) -> SQLiteStore:
    """The store, which must exist: a mistyped directory is an error, not a new empty store.

    Raises:
        ConfigError: there is no store file where the settings point.
    """
    path = settings.database_path
    if not path.is_file():
        key = "db" if settings.database is not None else "data_dir"
        given = settings.database if settings.database is not None else settings.data_dir
        raise ConfigError(f"no store at {path} ({settings.name_of(key)} {given})")
    return open_store(settings)
