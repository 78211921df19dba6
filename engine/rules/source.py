"""Reading rule files: YAML with the line and column of every value, and problems that point there.

``tagrelay check`` must say exactly where a mistake is, so loading keeps, for every value, the
position it came from. Positions are 1-based (as editors show them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathKey = tuple[str | int, ...]


@dataclass(frozen=True, order=True)
class Position:
    """Where a value starts in a rule file."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One mistake in a container, in plain English, with its position."""

    position: Position
    message: str
    severity: str = "error"  # "error" stops the container from loading; "warning" does not

    def __str__(self) -> str:
        return f"{self.position}: {self.severity}: {self.message}"


@dataclass
class Document:
    """One parsed rule file: its data and the position of every value in it."""

    file: str
    data: Any
    positions: dict[PathKey, Position] = field(default_factory=dict)
    key_positions: dict[PathKey, Position] = field(default_factory=dict)

    def key_at(self, *path: str | int) -> Position:
        """The position of the key that names the value at ``path`` (else :meth:`at`)."""
        return self.key_positions.get(tuple(path)) or self.at(*path)

    def at(self, *path: str | int) -> Position:
        """The position of the value at ``path`` (or of its nearest known parent)."""
        key: PathKey = tuple(path)
        while key:
            if key in self.positions:
                return self.positions[key]
            key = key[:-1]
        return self.positions.get((), Position(self.file, 1, 1))


class _Walker:
    def __init__(self, doc: Document, loader: yaml.SafeLoader, problems: list[Problem]) -> None:
        self.doc = doc
        self.loader = loader
        self.problems = problems

    def pos(self, node: yaml.Node) -> Position:
        mark = node.start_mark
        return Position(self.doc.file, mark.line + 1, mark.column + 1)

    def walk(self, node: yaml.Node, path: PathKey) -> Any:
        self.doc.positions[path] = self.pos(node)
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # resolve YAML merge keys (<<)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool) or key is None:
                    self.problems.append(Problem(self.pos(key_node), "keys must be plain text"))
                    continue
                skey = str(key) if not isinstance(key, bool) else str(key).lower()
                if skey in out:
                    self.problems.append(
                        Problem(
                            self.pos(key_node), f"duplicate key {skey!r} (it is already set above)"
                        )
                    )
                out[skey] = self.walk(value_node, (*path, skey))
                self.doc.key_positions[(*path, skey)] = self.pos(key_node)
                # Scalars point at the value; blocks point at their key, where a reader looks.
                if not isinstance(value_node, yaml.ScalarNode):
                    self.doc.positions[(*path, skey)] = self.pos(key_node)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(child, (*path, i)) for i, child in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)


def parse_yaml(text: str, file: str, problems: list[Problem]) -> Document | None:
    """Parse one YAML document, recording positions; syntax errors become problems."""
    doc = Document(file, None)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            doc.data = {}
            return doc
        doc.data = _Walker(doc, loader, problems).walk(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        what = exc.problem or exc.context or "not valid YAML"
        problems.append(Problem(where, f"YAML syntax error: {what}"))
        return None
    except yaml.YAMLError as exc:
        problems.append(Problem(Position(file, 1, 1), f"YAML error: {exc}"))
        return None
    finally:
        loader.dispose()
    return doc


def rule_files(path: Path) -> Iterator[Path]:
    """The rule files of a container: the file itself, or every *.yaml/*.yml below a directory."""
    if path.is_file():
        yield path
        return
    for child in sorted(path.rglob("*")):
        if child.suffix in (".yaml", ".yml") and child.is_file() and not child.name.startswith("."):
            yield child
