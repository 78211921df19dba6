"""The rule-file commands: ``check``, ``test``, ``preview`` and ``schema``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from destinations import registry
from engine.cli.common import command_settings, err, existing_store, load_container, out
from engine.config import load_setting
from engine.errors import BadRequest
from engine.rules import compile_container
from engine.rules.schema import editor_schema


def _rules_path(args: argparse.Namespace) -> Path:
    """The container to read: the PATH given, else ``TAGRELAY_RULES`` (or the config's), else
    ``rules/``; only that setting is read, so another bad setting cannot fail the command."""
    return Path(args.path) if args.path else Path(load_setting("rules"))


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a container; every problem with file:line:column."""
    path = _rules_path(args)
    container, problems = compile_container(path)
    for problem in problems:
        out(str(problem))
    if container is None:
        errors = sum(1 for p in problems if p.severity == "error")
        out(f"{path}: {errors} error{'s' if errors != 1 else ''}")
        return 1
    out(
        f"{path}: ok ({len(container.destinations)} destinations, {len(container.tags)} tags, "
        f"{len(container.tests)} tests)"
    )
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """Run the rule files' tests."""
    from engine.rules.testing import run_tests

    container = load_container(_rules_path(args))
    if container is None:
        return 1
    # The server's IP policy and page URL redaction apply before the rules, so the tests see
    # what it would send; only those settings are read, so the server's other settings cannot
    # fail a rules test.
    results = run_tests(
        container,
        ip_storage=load_setting("ip_storage"),
        redact_params=load_setting("redact_query_params"),
    )
    failed = [r for r in results if not r.passed]
    for result in results:
        mark = "ok  " if result.passed else "FAIL"
        out(f"{mark} {result.test.name}  ({result.test.position})")
        for diff in result.differences:
            out(f"       {diff}")
    out(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Dry-run one event: per tag, fired or not and why, and the request it would send."""
    from engine.api import parse_json_body
    from engine.preview import preview

    settings = command_settings(args)
    container = load_container(settings.rules)
    if container is None:
        return 1
    try:
        # The limits of intake (depth, NaN, numbers out of range): what the server would refuse
        # is refused here, and a deeply nested file is an error, not a RecursionError.
        raw = parse_json_body(Path(args.event).read_bytes(), "application/json")
    except OSError as exc:
        err(f"cannot read {args.event}: {exc.strerror or exc}")
        return 2
    except BadRequest as exc:
        err(f"cannot read {args.event}: {exc}")
        return 2
    enricher = None
    # Enrich from the store when there is one; a --data-dir given must hold one.
    if args.data_dir or settings.database_path.is_file():
        from engine.pipeline import Privacy, enrich_from_store

        store = existing_store(settings)
        privacy = Privacy(settings.ip_storage, settings.click_id_window)  # (enrichment only)

        def enricher(
            event: dict[str, Any], now: datetime, granted: frozenset[str], signed_out: bool
        ) -> list[str]:
            return enrich_from_store(store, privacy, event, now, granted, signed_out)

    try:
        result = preview(
            container,
            raw,
            enricher=enricher,
            ip_storage=settings.ip_storage,
            redact_params=settings.redact_query_params,
        )
    except BadRequest as exc:
        err(f"{args.event}: invalid event: {exc}")
        return 2
    if args.json:
        out(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    event = result["event"]
    out(f"event {event['event_name']!r} (event_id {event['event_id']})")
    if event.get("enriched"):
        out(f"  enriched from the visitor's identity: {', '.join(event['enriched'])}")
    if event.get("dropped"):
        dropped = ", ".join(f"{k} ({v!r})" for k, v in event["dropped"].items())
        out(f"  dropped as no value: {dropped}")
    for tag in result["tags"]:
        mark = "FIRED  " if tag["fired"] else "skipped"
        out(f"  {mark} {tag['name']} -> {tag['destination']}: {tag['reason']}")
        if tag.get("consent"):
            suffix = " (anonymous)" if tag.get("anonymous") else ""
            out(f"          consent: {tag['consent']}{suffix}")
        if tag["request"]:
            req = tag["request"]
            out(f"          {req['method']} {req['url']}")
            for name, value in req["headers"].items():
                out(f"          {name}: {value}")
            body = json.dumps(req["body"], indent=2, ensure_ascii=False)
            out("\n".join("          " + line for line in body.splitlines()))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Write the rule-file JSON Schema (for editors), with the installed adapters' settings."""
    adapters = registry.built_in() if args.built_in else registry.registry()
    text = json.dumps(editor_schema(adapters), indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as exc:
        err(f"tagrelay: cannot write {args.output}: {exc.strerror or exc}")
        return 2
    out(f"wrote {args.output}")
    return 0
