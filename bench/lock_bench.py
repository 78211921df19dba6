"""The host's writer lock under contention: what waiting for it costs a write.

    .venv/bin/python bench/lock_bench.py                       # 2x4, 4x1 and 8x1, 3 rounds
    .venv/bin/python bench/lock_bench.py --shape 2x4 --writes 3000 --rounds 5

Processes (each with some threads) write to one SQLite store as fast as they can, one short
write transaction at a time, through the store's own locks (``_Connections._write``), so every
write waits for the host's writer lock while another process holds it. Three ways to wait,
alternated round by round in one run and compared as ratios:

- ``flock``: blocking in ``flock`` itself, the kernel handing the lock over. The cheapest
  possible wait, and the reference; but it cannot give up, so a process stopped while holding
  the lock would hang every writer of the host (why tagrelay does not use it).
- ``hand-over``: every contended wait handed to the process's waiter thread at once.
- ``poll``: tagrelay's lock (``engine/store/sqlite/hostlock.py``): tried again after short
  sleeps for ``POLL_SECONDS``, then handed to the waiter thread.

Reported per way: writes per second (all processes) and CPU per write (user + system of the
writing processes, from ``getrusage``), the median over rounds.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.store.sqlite import hostlock
from engine.store.sqlite.connection import _Connections

WAYS = ("flock", "hand-over", "poll")


def _blocking_acquire(self: hostlock.HostLock, timeout: float) -> None:
    """HostLock.acquire as a plain blocking ``flock`` (no deadline): the reference."""
    if self._pid != os.getpid():
        self._fresh()
    fcntl.flock(self._own_fd(), fcntl.LOCK_EX)


def _use(way: str) -> None:
    if way == "flock":
        hostlock.HostLock.acquire = _blocking_acquire  # type: ignore[method-assign]
    elif way == "hand-over":
        hostlock.POLL_SECONDS = 0.0


def _writer(path: str, way: str, threads: int, writes: int, start: Any) -> None:
    _use(way)
    conn = _Connections(path)

    def run() -> None:
        start.wait()
        for _ in range(writes):
            with conn._write() as db:
                db.execute("INSERT INTO t (v) VALUES (?)", ("x" * 200,))
                sum(range(300))  # a little Python work inside the transaction, as intake has

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def measure(way: str, processes: int, threads: int, writes: int) -> tuple[float, float]:
    """(writes per second, CPU microseconds per write) of one round."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "lock.db")
        setup = _Connections(path)
        with setup._write() as db:
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        setup.close()
        ctx = mp.get_context("fork")
        start = ctx.Event()
        children = [
            ctx.Process(target=_writer, args=(path, way, threads, writes, start))
            for _ in range(processes)
        ]
        for child in children:
            child.start()
        time.sleep(0.5)  # every process started and waiting
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        start.set()
        for child in children:
            child.join()
        wall = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    total = processes * threads * writes
    return total / wall, cpu / total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", action="append", help="PROCESSESxTHREADS (repeatable; default 2x4, 4x1, 8x1)"
    )
    parser.add_argument("--writes", type=int, default=1500, help="writes per thread per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shape or ("2x4", "4x1", "8x1")]
    print(f"host writer lock, {args.writes} writes per thread, median of {args.rounds} rounds")
    print(f"  {'shape':8s} {'way':10s} {'writes/s':>9s} {'CPU us/write':>13s}   vs flock")
    for processes, threads in shapes:
        figures: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                figures[way].append(measure(way, processes, threads, args.writes))
        ref_rate = statistics.median(r for r, _ in figures["flock"])
        ref_cpu = statistics.median(c for _, c in figures["flock"])
        for way in WAYS:
            rate = statistics.median(r for r, _ in figures[way])
            cpu = statistics.median(c for _, c in figures[way])
            print(
                f"  {processes}x{threads:<6d} {way:10s} {rate:9,.0f} {cpu:13.1f}   "
                f"{rate / ref_rate:.2f} throughput, {cpu / ref_cpu:.2f} CPU"
            )


if __name__ == "__main__":
    main()
