"""A real ``tagrelay serve`` for end-to-end tests: its own process group, port and data dir.

Master and workers share a process group, so :meth:`TagrelayServer.kill` reaches all of them
(the crash tests' ``kill -9``) and :meth:`stop` is a graceful SIGTERM. The server's output goes
to ``<data_dir>/server.log`` (a pipe nobody reads would block the workers once full), and a
server that does not come up raises with the end of that log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]

# The smallest working container: every event to the log destination.
LOG_ALL_RULES = """
destinations:
  log: {type: log}
triggers:
  all: {event: "*"}
tags:
  - {name: log_all, trigger: all, destination: log}
"""


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TagrelayServer:
    """One ``tagrelay serve`` on 127.0.0.1, configured through the environment."""

    def __init__(
        self,
        rules: Path,
        data_dir: Path,
        key: str,
        env: Mapping[str, str] | None = None,
        workers: int = 2,
    ) -> None:
        self.rules, self.data_dir, self.key = rules, data_dir, key
        self.extra_env = dict(env or {})
        self.workers = workers
        self.port = free_port()
        self.log = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        """The SQLite store's file."""
        return self.data_dir / "tagrelay.db"

    def env(self) -> dict[str, str]:
        """The environment the server runs with: none of the caller's TAGRELAY_* settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAGRELAY_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(TAGRELAY_SERVER_KEYS=self.key, TAGRELAY_DATA_DIR=str(self.data_dir))
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> TagrelayServer:
        """Start and wait until ``/readyz`` answers 200.

        Raises:
            RuntimeError: the server exited or did not become ready (with its log's end).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "engine.cli", "serve", "--rules", str(self.rules)]
        command += ["--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env(),
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tagrelay serve exited early:\n{self.tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"tagrelay serve did not become ready:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group (graceful), then SIGKILL to whatever is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL to master and workers at once (a crash)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def track(self, event: dict[str, Any]) -> dict[str, Any]:
        """POST one event; it must be accepted."""
        answer = requests.post(
            self.url + "/v1/track",
            json=event,
            headers={"Authorization": f"Bearer {self.key.split(',')[0].split(':')[0]}"},
            timeout=10,
        )
        assert answer.status_code == 200, f"{answer.text}\nserver log:\n{self.tail()}"
        body: dict[str, Any] = answer.json()
        return body

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Rows from the store, read-only, beside the running server."""
        if not self.database.exists():
            return []
        db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def stored(self) -> list[dict[str, Any]]:
        """Every stored event, as the pipeline stored it."""
        return [json.loads(r["body"]) for r in self.query("SELECT body FROM events ORDER BY seq")]
