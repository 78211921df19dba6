"""Delivery benchmarks (issue: durable delivery). A script, not a test.

1. Throughput: events/s from the outbox to a local sink at the destination's batch size; and
   unbatched (one event a request, as a webhook without ``batch: true``) to a sink that takes
   20 ms to answer each request, with ``concurrency: 4``: the slots should share the backlog.
2. Memory with a destination down: 100,000 events queue up while the server keeps accepting;
   the server's resident memory (master + workers) must stay flat (< 50 MB growth).

Run: ``.venv/bin/python bench/delivery_bench.py [--quick]``. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.delivery import DeliveryWorker  # noqa: E402
from engine.pipeline import Pipeline, load_rules  # noqa: E402
from engine.store.sqlite import SQLiteStore  # noqa: E402

KEY = "sk_bench_delivery_key_0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingSink:
    """A minimal HTTP sink that counts events in ``{"events": [...]}`` bodies."""

    def __init__(self, latency: float = 0.0) -> None:
        self.events = 0
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The body goes in a write of its own after the headers: with Nagle's algorithm it
            # waited for the client's delayed ACK, 40 ms a request.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                n = len(json.loads(body).get("events", [None]))
                if latency:
                    time.sleep(latency)  # a receiver's own work (not the network's)
                with sink.lock:
                    sink.events += n
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/events"

    def close(self) -> None:
        self.httpd.shutdown()


def sale(i: int) -> dict[str, Any]:
    return {
        "event_name": "sale",
        "event_id": f"bench-{i}",
        "properties": {"order_id": f"o{i}", "value": 10.0 + i % 50, "currency": "EUR"},
        "user_data": {"email": f"user{i}@example.com"},
        "context": {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 bench"},
    }


def write_rules(path: Path, url: str, batch: bool = True, concurrency: int = 2) -> Path:
    path.write_text(
        "destinations:\n"
        f"  sink: {{type: webhook, url: '{url}', batch: {str(batch).lower()},\n"
        f"         delivery: {{batch_wait: 0.2, timeout: 2, concurrency: {concurrency}}}}}\n"
        "triggers: {all: {event: '*'}}\n"
        "tags: [{name: to_sink, trigger: all, destination: sink}]\n"
    )
    return path


def throughput(
    events: int, batch: bool = True, latency: float = 0.0, concurrency: int = 2
) -> dict[str, Any]:
    """Outbox -> sink throughput in one process (delivery worker threads, batch size 500, or
    one event a request without ``batch``)."""
    sink = CountingSink(latency)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rules(Path(tmp) / "rules.yaml", sink.url, batch, concurrency)
        rules = load_rules(path, interval=0)
        store = SQLiteStore(Path(tmp) / "store.db")
        pipeline = Pipeline(store, rules)
        for start in range(0, events, 100):
            pipeline.accept([sale(i) for i in range(start, min(events, start + 100))])
        worker = DeliveryWorker(store, lambda: rules.container, poll_interval=0.01)
        began = time.perf_counter()
        worker.start()
        deadline = time.time() + 300
        while sink.events < events and time.time() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - began
        worker.stop()
    sink.close()
    size = rules.container.destinations["sink"].adapter.max_batch if batch else 1
    return {
        "events": sink.events,
        "seconds": round(elapsed, 2),
        "events_per_s": round(sink.events / elapsed),
        "batch_size": size,
        "receiver_latency_ms": round(latency * 1000),
        "concurrency": concurrency,
    }


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children, in kB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def memory_with_destination_down(events: int) -> dict[str, Any]:
    """Queue ``events`` behind a dead destination through a real server; watch its memory."""
    dead_url = f"http://127.0.0.1:{free_port()}/events"  # nothing listens there
    with tempfile.TemporaryDirectory() as tmp:
        rules = write_rules(Path(tmp) / "rules.yaml", dead_url)
        port = free_port()
        env = dict(
            os.environ, TAGRELAY_SERVER_KEYS=KEY, TAGRELAY_DATA_DIR=tmp, TAGRELAY_RATE_LIMIT="0"
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "serve",
                "--rules",
                str(rules),
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
            ],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if requests.get(url + "/readyz", timeout=1).ok:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
            session = requests.Session()
            headers = {"Authorization": f"Bearer {KEY}"}
            refused = 0
            samples: list[tuple[int, int]] = []
            began = time.perf_counter()
            for start in range(0, events, 100):
                body = {"events": [sale(i) for i in range(start, start + 100)]}
                r = session.post(url + "/v1/track/batch", json=body, headers=headers, timeout=30)
                if r.status_code != 200 or r.json()["accepted"] != 100:
                    refused += 1
                if start % 10_000 == 0:
                    samples.append((start, rss_kb(proc.pid)))
            elapsed = time.perf_counter() - began
            samples.append((events, rss_kb(proc.pid)))
            metrics = session.get(url + "/metrics", headers=headers, timeout=10).text
            depth = next(
                (
                    line
                    for line in metrics.splitlines()
                    if line.startswith("tagrelay_outbox_depth{")
                ),
                "",
            )
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    warm = samples[1][1] if len(samples) > 2 else samples[0][1]
    return {
        "events": events,
        "refused_requests": refused,
        "intake_events_per_s": round(events / elapsed),
        "rss_mb_after_10k": round(warm / 1024, 1),
        "rss_mb_at_end": round(samples[-1][1] / 1024, 1),
        "rss_growth_mb": round((samples[-1][1] - warm) / 1024, 1),
        "rss_samples_mb": [(n, round(kb / 1024, 1)) for n, kb in samples],
        "outbox_depth": depth,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--only", choices=["throughput", "memory"])
    args = parser.parse_args()
    results: dict[str, Any] = {"nproc": os.cpu_count(), "python": sys.version.split()[0]}
    if args.only in (None, "throughput"):
        results["throughput"] = throughput(5_000 if args.quick else 20_000)
        print("delivery throughput:", json.dumps(results["throughput"]))
        # At 20 ms a request, one request at a time is 50 events/s; four slots sharing the
        # backlog approach 200.
        results["unbatched"] = throughput(400 if args.quick else 1_000, False, 0.02, 4)
        print("unbatched, 4 slots, 20 ms receiver:", json.dumps(results["unbatched"]))
    if args.only in (None, "memory"):
        results["memory"] = memory_with_destination_down(20_000 if args.quick else 100_000)
        print("memory, destination down:", json.dumps(results["memory"]))
    (ROOT / "bench" / "delivery_results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
