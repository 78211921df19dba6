"""The ``tagrelay`` command: serve | worker | check | test | preview | schema | deadletters |
replay | forget | purge.

Exit codes: 0 success; 1 the rules or tests failed, or there was nothing to do that was asked
for (no such dead letter); 2 bad usage, bad settings, or an unreadable file or store.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

from engine import __version__
from engine.cli.common import err
from engine.cli.ops import cmd_deadletters, cmd_forget, cmd_purge, cmd_replay
from engine.cli.processes import cmd_serve, cmd_worker
from engine.cli.rulefiles import cmd_check, cmd_preview, cmd_schema, cmd_test
from engine.config import MAX_DAYS
from engine.errors import ConfigError, RulesError, StoreError


def _whole(minimum: int, maximum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number in a range (a store ID or limit must fit in 64 bits)."""

    def parse(text: str) -> int:
        number = int(text) if re.fullmatch(r"\s*[0-9]{1,19}\s*", text) else -1
        if not minimum <= number <= maximum:
            raise argparse.ArgumentTypeError(f"{what} must be {minimum} to {maximum}, not {text!r}")
        return number

    return parse


_ID = _whole(1, 2**63 - 1, "a delivery ID")
_LIMIT = _whole(1, 2**63 - 1, "the limit")
_DAYS = _whole(0, MAX_DAYS, "the days")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tagrelay`` command."""
    parser = argparse.ArgumentParser(prog="tagrelay", description="Server-side tag manager.")
    parser.add_argument("--version", action="version", version=f"tagrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (gunicorn)")
    serve.add_argument("--bind", help="address:port (env TAGRELAY_BIND; default 127.0.0.1:8080)")
    serve.add_argument("--workers", help="gunicorn workers (env TAGRELAY_WORKERS; default 2)")
    serve.add_argument("--rules", help="rule container (env TAGRELAY_RULES; default rules/)")
    serve.add_argument("--data-dir", help="store and key directory (env TAGRELAY_DATA_DIR)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="deliver the outbox without serving HTTP")
    worker.add_argument("--rules", help="rule container (env TAGRELAY_RULES)")
    worker.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    worker.add_argument(
        "--metrics-bind",
        help="HOST:PORT to serve this worker's /metrics on (env TAGRELAY_METRICS_BIND; "
        "default: not served)",
    )
    worker.set_defaults(func=cmd_worker)

    dead = sub.add_parser("deadletters", help="list, show or replay dead letters")
    dead.add_argument("action", choices=["list", "show", "replay"])
    dead.add_argument("ids", nargs="*", type=_ID, help="delivery IDs (show, replay)")
    dead.add_argument("--destination", help="only this destination")
    dead.add_argument("--limit", type=_LIMIT, default=100)
    dead.add_argument("--all", action="store_true", help="replay every dead letter")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--rules", help="rule container (env TAGRELAY_RULES)")
    dead.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    dead.set_defaults(func=cmd_deadletters)

    replay = sub.add_parser("replay", help="send events since a time to a destination again")
    replay.add_argument("--destination", required=True)
    replay.add_argument("--since", required=True, help="ISO 8601 time, or a duration like 6h")
    replay.add_argument("--rules", help="rule container (env TAGRELAY_RULES)")
    replay.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    replay.set_defaults(func=cmd_replay)

    forget = sub.add_parser("forget", help="erase a person's events, identities, deliveries")
    forget.add_argument("--user-id")
    forget.add_argument("--visitor-id")
    forget.add_argument("--email")
    forget.add_argument("--json", action="store_true")
    forget.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    forget.set_defaults(func=cmd_forget)

    purge = sub.add_parser("purge", help="apply the retention period now")
    purge.add_argument("--days", type=_DAYS, help="default: TAGRELAY_RETENTION_DAYS (395)")
    purge.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    purge.set_defaults(func=cmd_purge)

    check = sub.add_parser("check", help="validate a rule container")
    check.add_argument("path", nargs="?", help="default: TAGRELAY_RULES, else rules/")
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="run the rule files' tests")
    test.add_argument("path", nargs="?", help="default: TAGRELAY_RULES, else rules/")
    test.set_defaults(func=cmd_test)

    prev = sub.add_parser("preview", help="dry-run one event through the rules")
    prev.add_argument("event", help="a JSON file with one event")
    prev.add_argument("--rules", help="rule container (env TAGRELAY_RULES; default rules/)")
    prev.add_argument("--json", action="store_true", help="print one JSON object")
    prev.add_argument("--data-dir", help="enrich from this store (env TAGRELAY_DATA_DIR)")
    prev.set_defaults(func=cmd_preview)

    schema = sub.add_parser("schema", help="print or write the rule-file JSON Schema")
    schema.add_argument("-o", "--output", default="-")
    schema.add_argument(
        "--built-in",
        action="store_true",
        help="only the destinations tagrelay ships, not the plugins installed here",
    )
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tagrelay`` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, RulesError, StoreError) as exc:
        err(f"tagrelay: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into a reader that stopped (`tagrelay preview ... | head`): no traceback.
        # What Python would still flush at exit goes nowhere; the shell's code for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
