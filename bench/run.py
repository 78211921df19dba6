"""tagrelay's benchmark: in-process engine throughput and HTTP intake against the framework ceiling.

A script, not a timed test: the figures depend on the machine, so what matters are the ratios
measured side by side in one run (see bench/README.md).

    .venv/bin/python bench/run.py                 # everything (~3 minutes)
    .venv/bin/python bench/run.py --quick         # a short run (~40 seconds)
    .venv/bin/python bench/run.py --only engine   # or --only http
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import workload
from loadgen import LoadResult, LoadSpec, run_load, wrk_path

from destinations.base import Destination
from engine import __version__
from engine.pipeline import Pipeline, load_rules
from engine.rules import Container
from engine.store.sqlite import SQLiteStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONTAINER = HERE / "container"
SERVER_KEY = "sk_bench_0123456789abcdef"
BATCH_SIZE = 100
# A batch connection asks to be closed with its 4th request (one new connection per 400 events).
BATCH_CLOSE_EVERY = 4

ENGINE_TARGET = 20_000.0  # events/s per core through normalize + evaluate
TRACK_TARGET = 0.60  # tagrelay track req/s over bare Flask req/s


@dataclass(frozen=True)
class Plan:
    """How long and how hard: the full run or ``--quick``."""

    engine_events: int
    engine_rounds: int
    kind_events: int
    store_events: int
    store_rounds: int
    http_seconds: float
    http_warmup: float
    http_rounds: int
    max_single: int
    max_batch: int


FULL = Plan(5000, 7, 1000, 3000, 3, 6.0, 3.0, 5, 200_000, 10_000)
QUICK = Plan(2000, 3, 300, 1000, 2, 2.0, 1.0, 2, 50_000, 2_000)


# -- machine ------------------------------------------------------------------------------------


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib.metadata import version

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "tagrelay": __version__,
        "flask": version("flask"),
        "gunicorn": version("gunicorn"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "loadavg_start": list(os.getloadavg()),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- engine -------------------------------------------------------------------------------------


def _rate(fn: Callable[[], int]) -> float:
    """Events per CPU-second of this process: what one core does, whatever the neighbours do."""
    start = time.process_time()
    n = fn()
    return n / max(time.process_time() - start, 1e-9)


def _prepare_all(
    pipeline: Pipeline, container: Container, pool: Sequence[Any], now: datetime
) -> Callable[[], int]:
    def run() -> int:
        prepare = pipeline.prepare
        for raw in pool:
            prepare(raw, container, now)
        return len(pool)

    return run


def _shown(path: Path) -> str:
    """A path as the report shows it: within the repository, relative to it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def bench_engine(plan: Plan, workdir: Path, container_path: Path = CONTAINER) -> dict[str, Any]:
    """Events/s through ``Pipeline.prepare``, then through ``Pipeline.accept`` with SQLite."""
    rules = load_rules(container_path)
    container = rules.container
    store = SQLiteStore(workdir / "engine.db")
    pipeline = Pipeline(store, rules)
    now = datetime.now(UTC)

    pool = workload.events(plan.engine_events, now=now)
    fired = sum(
        sum(d.fired for d in pipeline.prepare(raw, container, now).decisions) for raw in pool
    )
    _prepare_all(pipeline, container, pool[:500], now)()  # warm up
    # Every round sends people not seen before (the caches of normalized identifiers would
    # otherwise answer from an earlier round, which real traffic does not repeat).
    n = plan.engine_events
    pools = [workload.events(n, now=now, start=(r + 1) * n) for r in range(plan.engine_rounds)]
    rates = [_rate(_prepare_all(pipeline, container, fresh, now)) for fresh in pools]
    prepare = {
        "events_per_s": statistics.median(rates),
        "best_events_per_s": max(rates),
        "rounds": rates,
        "events_per_round": len(pool),
        "tags": len(container.tags),
        "destinations": len(container.destinations),
        "fired_per_event": fired / len(pool),
    }

    # The rules engine alone: the same container and events, but every adapter's payload step
    # (normalize, hash, check) replaced by the plugin API's default, which only copies the
    # mapped fields. Triggers, conditions, consent, mappings and dedup keys run as above.
    plain = load_rules(container_path).container
    for instance in plain.destinations.values():
        adapter = instance.adapter
        adapter.build_payload = types.MethodType(Destination.build_payload, adapter)  # type: ignore[method-assign]
    _prepare_all(pipeline, plain, pool[:500], now)()
    rule_rates = [_rate(_prepare_all(pipeline, plain, fresh, now)) for fresh in pools]
    rules_only = {
        "events_per_s": statistics.median(rule_rates),
        "best_events_per_s": max(rule_rates),
        "rounds": rule_rates,
        "target_events_per_s": ENGINE_TARGET,
        "meets_target": statistics.median(rule_rates) >= ENGINE_TARGET,
        # What the four platforms' payload steps add to an average event, in microseconds.
        "payload_us_per_event": 1e6 / prepare["events_per_s"] - 1e6 / statistics.median(rule_rates),
    }

    by_kind = {}
    for k, (kind, weight) in enumerate(workload.MIX):
        start = (plan.engine_rounds + 1 + 3 * k) * n
        kind_rates = [
            _rate(
                _prepare_all(
                    pipeline,
                    container,
                    workload.events(
                        plan.kind_events, now=now, only=kind, prefix=kind, start=start + r * n
                    ),
                    now,
                )
            )
            for r in range(3)
        ]
        kind_pool = workload.events(plan.kind_events, now=now, only=kind, prefix=kind, start=start)
        by_kind[kind] = {
            "share": weight / sum(w for _, w in workload.MIX),
            "events_per_s": statistics.median(kind_rates),
            "fired_per_event": sum(
                sum(d.fired for d in pipeline.prepare(raw, container, now).decisions)
                for raw in kind_pool[:100]
            )
            / min(100, len(kind_pool)),
        }

    stored: dict[str, list[float]] = {"single": [], "batch": []}
    for r in range(plan.store_rounds):
        for mode in ("single", "batch"):
            fresh = workload.events(plan.store_events, seed=100 + r, prefix=f"s{r}{mode}")
            if mode == "single":
                chunks = [[raw] for raw in fresh]
            else:
                chunks = [fresh[i : i + BATCH_SIZE] for i in range(0, len(fresh), BATCH_SIZE)]

            def run(chunks: list[list[dict[str, Any]]] = chunks) -> int:
                n = 0
                for chunk in chunks:
                    outcomes = pipeline.accept(chunk)
                    n += sum(o.accepted is not None and not o.accepted.duplicate for o in outcomes)
                return n

            stored[mode].append(_rate(run))
    store.close()
    return {
        "prepare": prepare,
        "rules_only": rules_only,
        "by_kind": by_kind,
        "accept_sqlite": {
            "single_events_per_s": statistics.median(stored["single"]),
            "batch100_events_per_s": statistics.median(stored["batch"]),
            "rounds": stored,
            "synchronous": store.synchronous,
            "events_per_round": plan.store_events,
        },
    }


# -- HTTP ---------------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its direct children (gunicorn's
    workers), by PID."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry.name) == pid or int(fields[1]) == pid:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return found


def _busiest_share(pid: int, before: dict[int, float], after: dict[int, float]) -> float:
    """The busiest worker's share of the workers' CPU between two readings (1.0: one worker
    did everything, 1/workers: an even spread)."""
    spent = [after[p] - before.get(p, 0.0) for p in after if p != pid]
    total = sum(spent)
    return max(spent) / total if total > 0 else 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process we started, with its logs."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def tail(self) -> str:
        """The end of its log, for error messages."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


def _start(name: str, cmd: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.tail()}")
        url = f"http://127.0.0.1:{port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return server
        time.sleep(0.2)
    _stop(server)
    raise RuntimeError(f"{name} did not answer /healthz within 60 s:\n{server.tail()}")


def _stop(server: Server) -> None:
    # The server runs in its own session: signal its process group (gunicorn master and
    # workers), which we created, and nothing else.
    if server.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)


@contextlib.contextmanager
def _servers(
    workers: int, threads: int, workdir: Path, container_path: Path = CONTAINER
) -> Iterator[dict[str, Server]]:
    """tagrelay, the bare app and the durable floor, under the same gunicorn options."""
    env = dict(os.environ)
    env.update(
        TAGRELAY_THREADS=str(threads),
        TAGRELAY_DATA_DIR=str(workdir / "data"),
        TAGRELAY_SERVER_KEYS=SERVER_KEY,
        TAGRELAY_DELIVER="false",
        TAGRELAY_RATE_LIMIT="1000000000",  # limiter on (its cost counts), never reached
    )
    env.pop("TAGRELAY_DB", None)
    env.pop("TAGRELAY_DATABASE", None)
    log_level = env.get("TAGRELAY_LOG_LEVEL", "INFO")
    bin_dir = Path(sys.executable).parent
    ports = {name: _free_port() for name in ("tagrelay", "bare", "floor")}
    commands = {
        "tagrelay": [
            str(bin_dir / "tagrelay"),
            "serve",
            "--bind",
            f"127.0.0.1:{ports['tagrelay']}",
            "--workers",
            str(workers),
            "--rules",
            str(container_path),
            "--data-dir",
            str(workdir / "data"),
        ],
    }
    for name, extra in (("bare", []), ("floor", ["--commit", str(workdir / "floor.db")])):
        commands[name] = [
            sys.executable,
            str(HERE / "bare_app.py"),
            "--bind",
            f"127.0.0.1:{ports[name]}",
            "--workers",
            str(workers),
            "--log-level",
            log_level,
            *extra,
        ]
    started: dict[str, Server] = {}
    try:
        for name, cmd in commands.items():
            started[name] = _start(name, cmd, env, ports[name], workdir)
        yield started
    finally:
        for server in started.values():
            _stop(server)


def _post(port: int, path: str, body: bytes, key: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body, headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _sanity(servers: dict[str, Server], single: str, batch: str) -> dict[str, Any]:
    """One request of each kind, checked, before anything is timed."""
    one = single.replace(workload.PLACEHOLDER, "sanity-1").replace(workload.NUMBER, "1234567")
    one = one.encode()
    status, answer = _post(servers["tagrelay"].port, "/v1/track", one, SERVER_KEY)
    if status != 200 or not answer.get("success"):
        raise RuntimeError(f"tagrelay /v1/track answered {status}: {answer}")
    parts = batch.split(workload.PLACEHOLDER)
    many = "".join(p + (f"sanity-b{i}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
    many = many.replace(workload.NUMBER, "7654321")
    status, answer_b = _post(servers["tagrelay"].port, "/v1/track/batch", many.encode(), SERVER_KEY)
    if status != 200 or answer_b.get("accepted") != BATCH_SIZE:
        raise RuntimeError(f"tagrelay /v1/track/batch answered {status}: {str(answer_b)[:500]}")
    status, answer_bare = _post(servers["bare"].port, "/v1/track", one, None)
    if status != 200:
        raise RuntimeError(f"the bare app answered {status}: {answer_bare}")
    floor = [_post(servers["floor"].port, "/v1/track", one, None) for _ in range(2)]
    if [(s, a.get("duplicate")) for s, a in floor] != [(200, False), (200, True)]:
        raise RuntimeError(f"the durable floor answered {floor} to an event and its repeat")
    fired = sum(len(r.get("fired", [])) for r in answer_b["results"]) / BATCH_SIZE
    return {"track_fired": answer.get("fired"), "batch_fired_per_event": fired}


def _count_stored(path: Path) -> int | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT COUNT(*) FROM events").fetchone()
            return int(row[0])
    except sqlite3.Error:
        return None


def _verdict(throughput: float, cpu: float) -> str:
    """The track target's verdict: met only if both ratios meet it.

    On a busy machine the neighbours' load can cap the cheap server's throughput (bare Flask
    cannot get the CPU to go faster) and so lift the throughput ratio without tagrelay costing
    any less; the CPU ratio does not move with it. When the two disagree the run settles
    nothing, and says so rather than claim the target.
    """
    if throughput >= TRACK_TARGET and cpu >= TRACK_TARGET:
        return "meets"
    if throughput < TRACK_TARGET and cpu < TRACK_TARGET:
        return "BELOW"
    return "UNSETTLED: throughput and CPU ratios disagree (a busy machine?); run again"


def bench_http(
    plan: Plan,
    workers: int,
    threads: int,
    connections: int,
    tool: str,
    container_path: Path = CONTAINER,
) -> dict[str, Any]:
    """Bare Flask, the durable floor, tagrelay track and batch: alternating, one gunicorn setup."""
    singles = workload.templates(200)
    batches = workload.batch_templates(4, BATCH_SIZE)
    plain = {"Content-Type": "application/json"}
    auth = plain | {"Authorization": f"Bearer {SERVER_KEY}"}
    used_tool = "wrk" if tool == "wrk" or (tool == "auto" and wrk_path()) else "python"
    with tempfile.TemporaryDirectory(prefix="tagrelay-bench-") as tmp:
        workdir = Path(tmp)
        with _servers(workers, threads, workdir, container_path) as servers:
            sanity = _sanity(servers, singles[0], batches[0])

            # target -> (server, path, body templates, headers, request cap)
            setups = {
                "bare": (servers["bare"], "/v1/track", singles, plain, plan.max_single),
                "floor": (servers["floor"], "/v1/track", singles, plain, plan.max_single),
                "track": (servers["tagrelay"], "/v1/track", singles, auth, plan.max_single),
                "batch": (servers["tagrelay"], "/v1/track/batch", batches, auth, plan.max_batch),
            }

            def spec(target: str, seconds: float, run_id: str) -> LoadSpec:
                server, path, bodies, headers, cap = setups[target]
                return LoadSpec(
                    "127.0.0.1",
                    server.port,
                    path,
                    bodies,
                    headers,
                    seconds,
                    cap,
                    connections,
                    1,
                    run_id,
                    # A batch round sends a few requests a second in all: too few for the
                    # server's keep-alive recycling to spread its connections over the workers.
                    close_every=BATCH_CLOSE_EVERY if target == "batch" else 0,
                )

            targets = ("bare", "floor", "track", "batch")
            for target in targets:
                run_load(spec(target, plan.http_warmup, f"w{target}"), tool)
            measured: dict[str, list[LoadResult]] = {t: [] for t in targets}
            server_cpu: dict[str, list[float]] = {t: [] for t in targets}
            busiest: dict[str, list[float]] = {t: [] for t in targets}
            for r in range(plan.http_rounds):
                for target in targets:
                    pid = setups[target][0].proc.pid
                    cpu_before = _cpu_by_process(pid)
                    result = run_load(spec(target, plan.http_seconds, f"r{r}{target}"), tool)
                    cpu_after = _cpu_by_process(pid)
                    spent = sum(cpu_after.values()) - sum(cpu_before.values())
                    cpu = spent / max(result.requests, 1)
                    measured[target].append(result)
                    server_cpu[target].append(cpu)
                    busiest[target].append(_busiest_share(pid, cpu_before, cpu_after))
                    _progress(
                        f"  round {r + 1}/{plan.http_rounds} {target:5s} "
                        f"{result.rps:9.1f} req/s  {cpu * 1e6:8.0f} server CPU us/req  "
                        f"busiest worker {busiest[target][-1]:4.0%}  bad={result.bad}"
                    )
        stored = _count_stored(workdir / "data" / "tagrelay.db")
        floor_stored = _count_stored(workdir / "floor.db")

    def summary(target: str, per_request: int) -> dict[str, Any]:
        results = measured[target]
        rps = statistics.median(r.rps for r in results)
        cpu = statistics.median(server_cpu[target])
        return {
            "req_per_s": rps,
            "events_per_s": rps * per_request,
            "server_cpu_us_per_req": cpu * 1e6,
            "server_cpu_us_per_event": cpu * 1e6 / per_request,
            "p50_ms": statistics.median(r.p50_ms or 0.0 for r in results),
            "p99_ms": statistics.median(r.p99_ms or 0.0 for r in results),
            "bad": sum(r.bad for r in results),
            "busiest_worker_share": max(busiest[target]),
            "rounds": [
                asdict(r) | {"rps": r.rps, "busiest_worker_share": b}
                for r, b in zip(results, busiest[target], strict=True)
            ],
        }

    bare_s, floor_s = summary("bare", 1), summary("floor", 1)
    track_s, batch_s = summary("track", 1), summary("batch", BATCH_SIZE)
    sent = sum(r.requests for r in measured["track"]) + BATCH_SIZE * sum(
        r.requests for r in measured["batch"]
    )
    return {
        "settings": {
            "worker_class": "gthread",
            "workers": workers,
            "threads": threads,
            "connections": connections,
            "load_generator": used_tool,
            "seconds_per_round": plan.http_seconds,
            "rounds": plan.http_rounds,
            "deliveries": "disabled (TAGRELAY_DELIVER=false); the outbox is still written",
            "rules": _shown(container_path),
        },
        "sanity": sanity,
        "bare": bare_s,
        "floor": floor_s,
        "track": track_s,
        "batch": batch_s,
        "ratios": {
            "track_over_bare": track_s["req_per_s"] / bare_s["req_per_s"],
            "track_target": TRACK_TARGET,
            "verdict": _verdict(
                track_s["req_per_s"] / bare_s["req_per_s"],
                bare_s["server_cpu_us_per_req"] / track_s["server_cpu_us_per_req"],
            ),
            "batch_events_over_bare_req": batch_s["events_per_s"] / bare_s["req_per_s"],
            # The same comparison in server CPU per request: steadier on a shared machine.
            "cpu_track_over_bare": bare_s["server_cpu_us_per_req"]
            / track_s["server_cpu_us_per_req"],
            "cpu_batch_events_over_bare_req": bare_s["server_cpu_us_per_req"]
            / batch_s["server_cpu_us_per_event"],
            # What committing each event before answering costs, and tagrelay over that floor.
            "floor_over_bare": floor_s["req_per_s"] / bare_s["req_per_s"],
            "cpu_floor_over_bare": bare_s["server_cpu_us_per_req"]
            / floor_s["server_cpu_us_per_req"],
            "track_over_floor": track_s["req_per_s"] / floor_s["req_per_s"],
            "cpu_track_over_floor": floor_s["server_cpu_us_per_req"]
            / track_s["server_cpu_us_per_req"],
            # Round by round (the two measured seconds apart): how far the neighbours' load
            # moves the ratio, which the medians above hide.
            "track_over_bare_rounds": [
                t.rps / b.rps if b.rps else 0.0
                for b, t in zip(measured["bare"], measured["track"], strict=True)
            ],
            "cpu_track_over_bare_rounds": [
                b / t if t else 0.0
                for b, t in zip(server_cpu["bare"], server_cpu["track"], strict=True)
            ],
        },
        "stored_events": stored,
        "floor_stored_events": floor_stored,
        "accepted_in_measured_rounds_at_least": sent,
    }


# -- output -------------------------------------------------------------------------------------


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _fmt(value: float) -> str:
    return f"{value:,.0f}"


def _span(values: Sequence[float]) -> str:
    """The lowest and highest of ``values`` as ``0.33-0.43``."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def report(results: dict[str, Any]) -> str:
    """The human-readable tables."""
    m = results["machine"]
    lines = [
        f"tagrelay bench  ({m['nproc']} cores usable, {m['cpu_model']}, "
        f"Python {m['python']}, gunicorn {m['gunicorn']}, commit {m['git_commit']}"
        f"{' +local changes' if m['git_dirty'] else ''})",
        f"load average at start {m['loadavg_start'][0]:.2f}, "
        f"at end {m['loadavg_end'][0]:.2f}  (a shared machine: compare ratios, not absolutes)",
        "",
    ]
    if "engine" in results:
        e = results["engine"]
        p = e["prepare"]
        r = e["rules_only"]
        ok = "meets" if r["meets_target"] else "BELOW"
        lines += [
            f"Engine, in process, one thread ({p['tags']} tags, {p['destinations']} "
            f"destinations, {p['fired_per_event']:.2f} tags fired per event)",
            f"  {'what':44s} {'events/s':>12s}   (per CPU-second of the benchmark process)",
            f"  {'rules engine (adapters copy mapped fields)':44s} {_fmt(r['events_per_s']):>12s}"
            f"   {ok} target {_fmt(r['target_events_per_s'])}; best round "
            f"{_fmt(r['best_events_per_s'])}",
            f"  {'+ platform payloads (normalize, hash, check)':44s} "
            f"{_fmt(p['events_per_s']):>12s}   best round {_fmt(p['best_events_per_s'])}; "
            f"payloads add {r['payload_us_per_event']:.0f} us per event",
        ]
        for kind, k in e["by_kind"].items():
            lines.append(
                f"    {kind + ' only':42s} {_fmt(k['events_per_s']):>12s}"
                f"   {k['share']:4.0%} of the mix, {k['fired_per_event']:.1f} tags fired"
            )
        a = e["accept_sqlite"]
        lines += [
            f"  {'+ SQLite store, Pipeline.accept, 1 per call':44s} "
            f"{_fmt(a['single_events_per_s']):>12s}   (synchronous={a['synchronous']})",
            f"  {'+ SQLite store, Pipeline.accept, 100 per call':44s} "
            f"{_fmt(a['batch100_events_per_s']):>12s}",
            "",
        ]
    if "http" in results:
        h = results["http"]
        s = h["settings"]
        r = h["ratios"]
        lines += [
            f"HTTP intake, gunicorn {s['worker_class']} workers={s['workers']} "
            f"threads={s['threads']}, {s['connections']} keep-alive connections "
            f"({s['load_generator']}), median of {s['rounds']} x {s['seconds_per_round']:g} s",
            f"rules: {s['rules']}; deliveries: {s['deliveries']}",
            f"  {'endpoint':34s} {'req/s':>9s} {'events/s':>10s} {'p50 ms':>8s} "
            f"{'p99 ms':>8s} {'CPU us/req':>10s} {'bad':>5s} {'busiest':>8s}",
        ]
        for label, key in (
            ("bare Flask POST (JSON parse only)", "bare"),
            ("durable floor (bare + 1 commit)", "floor"),
            ("tagrelay POST /v1/track", "track"),
            ("tagrelay POST /v1/track/batch x100", "batch"),
        ):
            row = h[key]
            lines.append(
                f"  {label:34s} {_fmt(row['req_per_s']):>9s} {_fmt(row['events_per_s']):>10s} "
                f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
                f"{_fmt(row['server_cpu_us_per_req']):>10s} {row['bad']:5d} "
                f"{row['busiest_worker_share']:8.0%}"
            )
        lines += [
            f"  {'ratio':34s} {'throughput':>10s} {'by CPU':>8s}",
            f"  {'track req/s / bare req/s':34s} {r['track_over_bare']:10.2f} "
            f"{r['cpu_track_over_bare']:8.2f}   {r['verdict']} (target "
            f"{r['track_target']:.2f})",
            f"  {'  the same, round by round':34s} {_span(r['track_over_bare_rounds']):>10s} "
            f"{_span(r['cpu_track_over_bare_rounds']):>8s}",
            f"  {'batch events/s / bare req/s':34s} {r['batch_events_over_bare_req']:10.2f} "
            f"{r['cpu_batch_events_over_bare_req']:8.2f}",
            f"  {'floor req/s / bare req/s':34s} {r['floor_over_bare']:10.2f} "
            f"{r['cpu_floor_over_bare']:8.2f}   (committing before answering, alone)",
            f"  {'track req/s / floor req/s':34s} {r['track_over_floor']:10.2f} "
            f"{r['cpu_track_over_floor']:8.2f}   (tagrelay's work over that floor)",
            "  (by CPU: the first server's CPU per request over the second's, per request or per"
            " event)",
            "  (busiest: the largest share of the server's requests' CPU that one worker took in"
            " a round)",
            f"  events in the store after the run: {h['stored_events']} "
            f"(floor: {h['floor_stored_events']})",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables and write the JSON results."""
    parser = argparse.ArgumentParser(description="tagrelay benchmark")
    parser.add_argument("--quick", action="store_true", help="a short run (~40 s)")
    parser.add_argument("--only", choices=("engine", "http"), help="run one part")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("TAGRELAY_THREADS", "4")),
        help="gthread threads per worker (default TAGRELAY_THREADS or 4)",
    )
    parser.add_argument(
        "--connections", type=int, help="keep-alive connections (default 2 x workers x threads)"
    )
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--rules",
        type=Path,
        default=CONTAINER,
        help="the container to measure (default bench/container: 12 tags, 4 platforms)",
    )
    parser.add_argument("--output", default=str(HERE / "results.json"), help="JSON results file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    connections = args.connections or 2 * args.workers * args.threads

    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    if args.only in (None, "engine"):
        _progress("engine: in-process throughput ...")
        with tempfile.TemporaryDirectory(prefix="tagrelay-bench-") as tmp:
            results["engine"] = bench_engine(plan, Path(tmp), args.rules)
    if args.only in (None, "http"):
        _progress("http: starting tagrelay and the bare app under gunicorn ...")
        results["http"] = bench_http(
            plan, args.workers, args.threads, connections, args.tool, args.rules
        )
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    sys.stdout.write(report(results) + "\n")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    _progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
