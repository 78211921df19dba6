"""The ``tagrelay`` command: serve | check | test | preview | schema.

Exit codes: 0 success; 1 the rules or tests failed; 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from engine import __version__
from engine.config import Settings, ensure_server_key, load_settings
from engine.errors import BadRequest, ConfigError, RulesError
from engine.rules import compile_container
from engine.rules.model import Container
from engine.rules.schema import RULES_SCHEMA

SCHEMA_FILE = "tagrelay.schema.json"


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _load(path: Path) -> Container | None:
    container, problems = compile_container(path)
    for problem in problems:
        _err(str(problem))
    return container


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a container; every problem with file:line:column."""
    path = Path(args.path)
    container, problems = compile_container(path)
    for problem in problems:
        _out(str(problem))
    if container is None:
        errors = sum(1 for p in problems if p.severity == "error")
        _out(f"{path}: {errors} error{'s' if errors != 1 else ''}")
        return 1
    _out(
        f"{path}: ok ({len(container.destinations)} destinations, {len(container.tags)} tags, "
        f"{len(container.tests)} tests)"
    )
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """Run the rule files' tests."""
    from engine.rules.testing import run_tests

    container = _load(Path(args.path))
    if container is None:
        return 1
    results = run_tests(container)
    failed = [r for r in results if not r.passed]
    for result in results:
        mark = "ok  " if result.passed else "FAIL"
        _out(f"{mark} {result.test.name}  ({result.test.position})")
        for diff in result.differences:
            _out(f"       {diff}")
    _out(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Dry-run one event: per tag, fired or not and why, and the request it would send."""
    from engine.preview import preview

    container = _load(Path(args.rules))
    if container is None:
        return 1
    try:
        raw = json.loads(Path(args.event).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        _err(f"cannot read {args.event}: {exc}")
        return 2
    try:
        result = preview(container, raw)
    except BadRequest as exc:
        _err(f"{args.event}: invalid event: {exc}")
        return 2
    if args.json:
        _out(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    event = result["event"]
    _out(f"event {event['event_name']!r} (event_id {event['event_id']})")
    for tag in result["tags"]:
        mark = "FIRED  " if tag["fired"] else "skipped"
        _out(f"  {mark} {tag['name']} -> {tag['destination']}: {tag['reason']}")
        if tag.get("consent"):
            suffix = " (anonymous)" if tag.get("anonymous") else ""
            _out(f"          consent: {tag['consent']}{suffix}")
        if tag["request"]:
            req = tag["request"]
            _out(f"          {req['method']} {req['url']}")
            for name, value in req["headers"].items():
                _out(f"          {name}: {value}")
            body = json.dumps(req["body"], indent=2, ensure_ascii=False)
            _out("\n".join("          " + line for line in body.splitlines()))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Write the rule-file JSON Schema (for editors)."""
    text = json.dumps(RULES_SCHEMA, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        _out(f"wrote {args.output}")
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings().with_overrides(
        bind=getattr(args, "bind", None),
        workers=getattr(args, "workers", None),
        rules=Path(args.rules) if getattr(args, "rules", None) else None,
        data_dir=Path(args.data_dir) if getattr(args, "data_dir", None) else None,
    )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server under gunicorn."""
    from engine.server import run

    settings = _settings(args)
    container = _load(settings.rules)
    if container is None:
        _err(f"tagrelay: refusing to start: {settings.rules} has errors (see above)")
        return 1
    settings, generated = ensure_server_key(settings)
    if generated:
        _out(f"tagrelay: server key (kept in {settings.data_dir / 'server_key'}): {generated}")
    _out(
        f"tagrelay {__version__}: serving {settings.rules} on http://{settings.bind} "
        f"({settings.workers} workers, store {settings.database_path})"
    )
    sys.stdout.flush()
    run(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tagrelay`` command."""
    parser = argparse.ArgumentParser(prog="tagrelay", description="Server-side tag manager.")
    parser.add_argument("--version", action="version", version=f"tagrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (gunicorn)")
    serve.add_argument("--bind", help="address:port (env TAGRELAY_BIND; default 127.0.0.1:8080)")
    serve.add_argument("--workers", type=int, help="gunicorn workers (env TAGRELAY_WORKERS)")
    serve.add_argument("--rules", help="rule container (env TAGRELAY_RULES; default rules/)")
    serve.add_argument("--data-dir", help="store and key directory (env TAGRELAY_DATA_DIR)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate a rule container")
    check.add_argument("path", nargs="?", default="rules")
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="run the rule files' tests")
    test.add_argument("path", nargs="?", default="rules")
    test.set_defaults(func=cmd_test)

    prev = sub.add_parser("preview", help="dry-run one event through the rules")
    prev.add_argument("event", help="a JSON file with one event")
    prev.add_argument("--rules", default="rules")
    prev.add_argument("--json", action="store_true", help="print one JSON object")
    prev.set_defaults(func=cmd_preview)

    schema = sub.add_parser("schema", help="print or write the rule-file JSON Schema")
    schema.add_argument("-o", "--output", default="-")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tagrelay`` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, RulesError) as exc:
        _err(f"tagrelay: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
