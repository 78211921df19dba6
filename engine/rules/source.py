"""Reading rule files: YAML with the line and column of every value, and problems that point there.

``tagrelay check`` must say exactly where a mistake is, so loading keeps, for every value, the
position it came from. Positions are 1-based (as editors show them).
"""

from __future__ import annotations

import os
import re
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
    # Unquoted values that YAML reads as something other than text (``NO``, ``on``, ``12:30``,
    # ``2026-01-20``), as written: messages show them as the writer sees them.
    written: dict[PathKey, str] = field(default_factory=dict)

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


# Limits on what one rule file may make the reader build. Rule files are small; these only stop
# files that would exhaust the reader (a value nested thousands deep, or aliases of aliases that
# expand a few hundred bytes into a billion values) with a message instead of a crash or a hang.
MAX_DEPTH = 100
MAX_ALIAS_VALUES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


def _screen(loader: yaml.SafeLoader, file: str, problems: list[Problem]) -> bool:
    """Read the YAML events once, before anything is built: False (with a problem) if the file
    nests deeper than :data:`MAX_DEPTH`, has an alias inside the value it names, or has aliases
    that expand to more than :data:`MAX_ALIAS_VALUES` values.

    The parser is a state machine, so this pass needs no recursion however deep the file is;
    building nodes (PyYAML's composer) and walking them recurse once per level.
    """

    def stop(event: yaml.Event, message: str) -> bool:
        mark = event.start_mark
        where = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        problems.append(Problem(where, message))
        return False

    open_values: list[list[Any]] = []  # per open mapping or sequence: [anchor, values in it]
    sizes: dict[str, int] = {}  # anchor -> how many values it stands for
    added = 0  # values that aliases add to the file
    while not loader.check_event(yaml.StreamEndEvent):
        event = loader.get_event()  # type: ignore[no-untyped-call]  # PyYAML's stubs lack it
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_values) >= MAX_DEPTH:
                return stop(event, f"values are nested more than {MAX_DEPTH} levels deep")
            open_values.append([event.anchor, 1])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_values.pop()
            if anchor is not None:
                sizes[anchor] = count
            if open_values:
                open_values[-1][1] += count
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = 1
            if open_values:
                open_values[-1][1] += 1
        elif isinstance(event, yaml.AliasEvent):
            name = str(event.anchor)
            if any(anchor == name for anchor, _ in open_values):
                return stop(event, f"alias *{name} is used inside the value it names (&{name})")
            size = sizes.get(name, 1)  # an unknown anchor is reported when composing
            added += size
            if added > MAX_ALIAS_VALUES:
                return stop(
                    event,
                    f"aliases make this file expand to more than {MAX_ALIAS_VALUES:,} values "
                    "(aliases of aliases multiply); write the values out instead",
                )
            if open_values:
                open_values[-1][1] += size
    return True


class _Walker:
    def __init__(self, doc: Document, problems: list[Problem]) -> None:
        self.doc = doc
        self.problems = problems

    def pos(self, node: yaml.Node) -> Position:
        mark = node.start_mark
        return Position(self.doc.file, mark.line + 1, mark.column + 1)

    def walk(self, node: yaml.Node, path: PathKey, loader: yaml.SafeLoader) -> Any:
        self.doc.positions[path] = self.pos(node)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for skey, (key_node, value_node) in self.pairs(node).items():
                out[skey] = self.walk(value_node, (*path, skey), loader)
                self.doc.key_positions[(*path, skey)] = self.pos(key_node)
                # Scalars point at the value; blocks point at their key, where a reader looks.
                if not isinstance(value_node, yaml.ScalarNode):
                    self.doc.positions[(*path, skey)] = self.pos(key_node)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(child, (*path, i), loader) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag != _STR_TAG:
            self.doc.written[path] = node.value
        return loader.construct_object(node, deep=True)

    def pairs(self, node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's keys and value nodes, with YAML merge keys (``<<: *base``) resolved.

        A key written in the mapping overrides a merged one (that is what ``<<`` is for); of
        several merged mappings (``<<: [*a, *b]``) the earlier wins. Only a key written twice in
        the same mapping is a duplicate.
        """
        merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        self.problems.append(
                            Problem(self.pos(source), "<< merges a mapping (or a list of them)")
                        )
                        continue
                    for skey, pair in self.pairs(source).items():
                        merged.setdefault(skey, pair)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(Problem(self.pos(key_node), "keys must be plain text"))
                continue
            # The key as written: YAML 1.1 would read NO, ON, 01067 or 1:30 as false, true, 567
            # and 90, and a lookup table's keys are compared with text from events.
            skey = key_node.value
            if skey in own:
                self.problems.append(
                    Problem(self.pos(key_node), f"duplicate key {skey!r} (it is already set above)")
                )
            own[skey] = (key_node, value_node)
        return {**{k: v for k, v in merged.items() if k not in own}, **own}


# Plain numbers YAML 1.1 reads in another base than the decimal they look like: a leading 0
# makes ``0755`` octal (493), and colons make ``1:30`` a count in sixties (90).
_OCTAL = re.compile(r"[-+]?0[0-9_]+")
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")


def misread_number(written: str) -> str | None:
    """What is wrong with an unquoted value that YAML reads as a number other than the one
    written (``0755`` as 493, ``1:30`` as 90), in words; None for any other value.

    Nowhere in a rule file is such a number meant: sent as a constant or a lookup table's
    value, or set as a limit, it would silently be another number; in a test's event it is not
    what a page sends (``01067`` is no JSON number, and a code to its writer).
    """
    octal = _OCTAL.fullmatch(written) is not None
    if not octal and _SEXAGESIMAL.fullmatch(written) is None:
        return None
    value = yaml.safe_load(written)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    shown = f"YAML reads the unquoted {written} as the number {value}"
    if octal:
        decimal = int(written.replace("_", ""), 10)
        return (
            f"{shown} (to YAML a number that starts with 0 is octal): write it in quotes "
            f'("{written}") if it is a code, or {decimal} if it is the number'
        )
    return (
        f"{shown} (to YAML numbers with colons count in sixties, as minutes and seconds): "
        f'write it in quotes ("{written}")'
    )


_CANNOT_START = re.compile(r"found character '(.+)' that cannot start any token")
_BLOCK_END = re.compile(
    r"expected <block end>, but found '(?:<(?:block \w+ start|scalar|block entry)>|\?)'"
)
_FLOW_END = re.compile(r"expected ',' or '([}\]])'")
_ALIAS = re.compile(r"found undefined alias '(.*)'")
_TAG = re.compile(r"constructor for the tag '")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|'.*|\".*")


def _syntax_message(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's syntax error in plain words, for the mistakes people make most; its own words
    otherwise (``while parsing a block mapping: expected <block end>`` means nothing to the
    marketer who misaligned a line)."""
    if (words := plain_syntax_words(exc)) is not None:
        return words
    # Never the name of an alias or a tag, nor any other token PyYAML quotes: an unquoted
    # secret that starts with "*" or "!" reads as one, and these messages reach the server's
    # log and /readyz when a reload is refused.
    problem = exc.problem or ""
    if _ALIAS.search(problem) is not None:
        return (
            "an alias (a value starting with *) that names no anchor defined before it; "
            "a text that starts with * goes in quotes"
        )
    if _TAG.search(problem) is not None:
        return (
            "a value starting with ! is a YAML tag this file cannot use; "
            "a text that starts with ! goes in quotes"
        )
    told = [_QUOTED.sub(_one_character, part) for part in (exc.context, exc.problem) if part]
    return ": ".join(told) or "not valid YAML"


def _one_character(quoted: re.Match[str]) -> str:
    """A quoted character kept ("found unknown escape character 'q'"), a longer token cut."""
    text = quoted.group()
    return text if len(text) == 3 and text[0] == text[-1] else "..."


def syntax_mark(exc: yaml.MarkedYAMLError) -> yaml.Mark | None:
    """Where to point at a syntax error: where PyYAML found it, but for a quote never closed,
    found at the end of the file, where the quote opens."""
    if _unclosed_quote(exc) and exc.context_mark is not None:
        return exc.context_mark
    return exc.problem_mark or exc.context_mark


def _unclosed_quote(exc: yaml.MarkedYAMLError) -> bool:
    return exc.problem == "found unexpected end of stream" and "quoted scalar" in (
        exc.context or ""
    )


def plain_syntax_words(exc: yaml.MarkedYAMLError) -> str | None:
    """The plain words for the YAML syntax mistakes people make most, None for others. They
    quote nothing of the file (the settings file holds secrets), but a single character."""
    problem = exc.problem or ""
    if (found := _CANNOT_START.search(problem)) is not None:
        char = found.group(1)
        if char == "\\t":
            return "a tab: YAML indents with spaces only; replace the tab with spaces"
        return f"a value cannot start with {char} in YAML: put the value in quotes"
    if _BLOCK_END.search(problem):
        return (
            "this line is not indented like the lines above it: the keys of one mapping, and "
            "the '-' items of one list, start in the same column"
        )
    if problem == "mapping values are not allowed here":
        if _over_indented_key(exc.problem_mark):
            return (
                "this line is indented more than the key above it, so YAML reads it as the "
                "rest of that key's value: start it in the same column as the keys beside it "
                "(a text that holds ': ' goes in quotes, \"a: b\")"
            )
        return (
            "a ': ' where YAML cannot take one: a value that holds ': ' goes in quotes "
            '("a: b"), and a key starts a line of its own'
        )
    if _unclosed_quote(exc):
        return "a quoted text is not closed: its closing quote is missing"
    if (flow := _FLOW_END.search(problem)) is not None:
        kind = "{ ... } mapping" if flow.group(1) == "}" else "[ ... ] list"
        return f"a {kind} is not closed, or a comma is missing between its entries"
    if problem == "could not find expected ':'":
        return (
            "a line without ':' where a key: value belongs (or a text that goes on to the "
            "next line, which needs quotes)"
        )
    return None


_LONE_KEY = re.compile(r"\s+[A-Za-z_$][\w.$-]*")


def _over_indented_key(mark: yaml.Mark | None) -> bool:
    """Whether the ': ' YAML could not take follows a lone key on an indented line: a key
    indented past its neighbours continues the value above (``event: purchase`` then
    ``when: ...`` one space further in), where the ': ' is out of place."""
    if mark is None or not isinstance(mark.buffer, str):
        return False
    before = mark.buffer[mark.pointer - mark.column : mark.pointer]
    return _LONE_KEY.fullmatch(before) is not None


def parse_yaml(text: str, file: str, problems: list[Problem]) -> list[Document] | None:
    """Parse the YAML documents of one file, recording positions; syntax errors become problems.

    Each document of a file (they are separated by ``---``) is read as a rule file of its own;
    a document of nothing (``---`` alone, or ``~``) is an empty one. Mapping keys are the text
    as written. Files nested too deeply, values that contain themselves through an alias, and
    alias bombs are problems too, never a crash or a hang.
    """
    docs: list[Document] = []
    try:
        screen = yaml.SafeLoader(text)
        try:
            if not _screen(screen, file, problems):
                return None
        finally:
            screen.dispose()
        loader = yaml.SafeLoader(text)
        try:
            while loader.check_node():  # check_node, not get_node, reads the stream's start
                node = loader.get_node()
                if node is None:
                    break
                doc = Document(file, None)
                doc.data = _Walker(doc, problems).walk(node, (), loader)
                if doc.data is None:
                    doc.data = {}
                docs.append(doc)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = syntax_mark(exc)
        where = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        problems.append(Problem(where, f"YAML syntax error: {_syntax_message(exc)}"))
        return None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, before parsing
        problems.append(Problem(_text_position(text, file, exc.position), _reader_message(exc)))
        return None
    except yaml.YAMLError as exc:
        problems.append(Problem(Position(file, 1, 1), f"YAML error: {exc}"))
        return None
    except RecursionError:
        # The screen keeps files well within Python's limit; this is the last line of defence.
        problems.append(Problem(Position(file, 1, 1), "the file is nested too deeply to read"))
        return None
    return docs


def read_rule_file(path: Path, problems: list[Problem]) -> str | None:
    """The text of a rule file, or None (with a problem at the first bad byte) if it is not
    UTF-8: a file saved as Latin-1 or Windows-1252 would otherwise have its accented letters
    replaced unseen, and an event name such as ``achat_effectué`` would never match."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(Position(str(path), 1, 1), _unreadable(path, exc)))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        where = _text_position(before, str(path), len(before))
        problems.append(
            Problem(
                where,
                f"the file is not UTF-8 text (byte 0x{data[exc.start]:02X} here is not UTF-8): "
                "save it as UTF-8 in your editor",
            )
        )
        return None


def _unreadable(path: Path, exc: OSError) -> str:
    """Why a rule file cannot be read, in words."""
    if path.is_symlink() and not path.exists():
        return (
            f"the file is a symbolic link to {os.readlink(path)}, which does not exist: "
            "restore what it points to, or remove the link"
        )
    return f"the file cannot be read: {exc.strerror or exc}"


def _text_position(text: str, file: str, index: int) -> Position:
    """The line and column of the character at ``index`` of ``text``."""
    index = max(0, min(index, len(text)))
    line_start = text.rfind("\n", 0, index) + 1
    return Position(file, text.count("\n", 0, index) + 1, index - line_start + 1)


def _reader_message(exc: yaml.reader.ReaderError) -> str:
    """A character YAML refuses (a control character, often pasted in unseen), in words."""
    char = exc.character
    code = f"U+{char:04X}" if isinstance(char, int) else repr(char)
    return (
        f"YAML syntax error: the character {code} is not allowed in a rule file (a control "
        "character, often pasted in unseen): retype the text around it"
    )


def rule_files(path: Path) -> Iterator[Path]:
    """The rule files of a container: the file itself, or every ``*.yaml``/``*.yml`` (in any
    case) below a directory, except hidden ones and those in hidden directories: a container
    kept in a repository has ``.github/workflows/*.yml`` and the like, which are no rules.

    Symbolic links are followed, to directories too (each directory is read once, so a link to
    a directory above is no loop); a link to nothing is yielded, for the reader to report: a
    container that lost a file must not load without it, unsaid.
    """
    if path.is_file():
        yield path
        return
    found: list[Path] = []
    seen: set[str] = set()
    for top, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            child = Path(top, name)
            if (
                not name.startswith(".")
                and child.suffix.lower() in (".yaml", ".yml")
                and (child.is_file() or (child.is_symlink() and not child.exists()))
            ):
                found.append(child)
    yield from sorted(found)
