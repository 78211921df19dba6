"""Profile the engine path and the HTTP path with cProfile; print the top functions.

    .venv/bin/python bench/hotspots.py                 # both
    .venv/bin/python bench/hotspots.py --only engine   # Pipeline.prepare over the event mix
    .venv/bin/python bench/hotspots.py --only http     # POST /v1/track through the WSGI app
    .venv/bin/python bench/hotspots.py --save DIR      # also keep the .pstats files

The HTTP profile drives tagrelay's real Flask app in process (Werkzeug's test client, one
thread), so it shows where a request's CPU goes (Flask, auth, parsing, rules, SQLite) but not
gunicorn's own share or lock waits between threads; compare with ``run.py --only http``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import workload

from engine.app import create_app
from engine.config import ServerKey, Settings
from engine.pipeline import Pipeline, load_rules
from engine.store.sqlite import SQLiteStore

HERE = Path(__file__).resolve().parent
CONTAINER = HERE / "container"
KEY = "sk_bench_profile"


def _print(profile: cProfile.Profile, title: str, top: int, save: Path | None) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs()
    print(f"\n=== {title}: by own time (tottime) ===")
    stats.sort_stats("tottime").print_stats(top)
    print(out.getvalue())
    out.seek(0)
    out.truncate()
    print(f"=== {title}: by cumulative time ===")
    stats.sort_stats("cumulative").print_stats(top)
    print(out.getvalue())
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        path = save / f"{title.split(maxsplit=1)[0]}.pstats"
        profile.dump_stats(path)
        print(f"saved {path} (e.g. python -m pstats {path})")


def profile_engine(events: int, top: int, save: Path | None) -> None:
    """cProfile of ``Pipeline.prepare`` over the benchmark's event mix."""
    rules = load_rules(CONTAINER)
    container = rules.container
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(SQLiteStore(Path(tmp) / "p.db"), rules)
        pool = workload.events(events, now=now)
        for raw in pool[:200]:
            pipeline.prepare(raw, container, now)
        profile = cProfile.Profile()
        profile.enable()
        for raw in pool:
            pipeline.prepare(raw, container, now)
        profile.disable()
    _print(profile, f"engine prepare x{events}", top, save)


def profile_http(requests: int, top: int, save: Path | None) -> None:
    """cProfile of ``POST /v1/track`` through tagrelay's WSGI app (in process)."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            rules=CONTAINER,
            data_dir=Path(tmp),
            server_keys=(ServerKey(KEY),),
            deliver=False,
            rate_limit=1_000_000_000,  # on (its cost counts), never reached, as in run.py
        )
        app = create_app(settings)
        client = app.test_client()
        bodies = workload.templates(200)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

        def send(n: int, prefix: str) -> None:
            for i in range(n):
                body = bodies[i % len(bodies)].replace(workload.PLACEHOLDER, f"{prefix}-{i}")
                body = body.replace(workload.NUMBER, f"{i % 10_000_000:07d}")
                resp = client.post("/v1/track", data=body, headers=headers)
                assert resp.status_code == 200, resp.get_data()

        send(200, "warm")
        profile = cProfile.Profile()
        profile.enable()
        send(requests, "prof")
        profile.disable()
    _print(profile, f"http track x{requests}", top, save)


def main() -> None:
    """Profile what was asked for."""
    parser = argparse.ArgumentParser(description="profile tagrelay's hot paths")
    parser.add_argument("--only", choices=("engine", "http"))
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--save", type=Path, help="directory for .pstats files")
    args = parser.parse_args()
    if args.only in (None, "engine"):
        profile_engine(args.events, args.top, args.save)
    if args.only in (None, "http"):
        profile_http(args.requests, args.top, args.save)


if __name__ == "__main__":
    main()
