"""A real `tagrelay serve`: the server key it prints, its metrics directory, and several
instances on one data directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from destinations.testkit.server import LoopbackServer
from destinations.testkit.sink import FaultySink
from tests.support.server import LOG_ALL_RULES, ROOT, TagrelayServer, free_port

pytestmark = pytest.mark.slow

KEY = "sk_ops_0123456789"
RULES = LOG_ALL_RULES


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def accepted(server: TagrelayServer) -> float:
    """The server's count of accepted events, from /metrics."""
    auth = {"Authorization": f"Bearer {server.key}"}
    text = requests.get(server.url + "/metrics", headers=auth, timeout=10).text
    match = re.search(r'^tagrelay_events_total\{outcome="accepted"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_the_generated_server_key_is_printed_once(tmp_path: Path, rules: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):
        server = TagrelayServer(rules, data, KEY, env={"TAGRELAY_SERVER_KEYS": ""}, workers=1)
        server.start()
        server.stop()

    key = (data / "server_key").read_text().strip()
    log = (data / "server.log").read_text()
    assert log.count(key) == 1
    assert f"tagrelay: generated a server key (kept in {data / 'server_key'}): {key}" in log
    assert f"tagrelay: server key kept in {data / 'server_key'}\n" in log
    assert "(1 worker, delivering, store " in log  # not "1 workers"


def test_a_metrics_directory_that_does_not_exist_yet_is_created_and_events_are_accepted(
    tmp_path: Path, rules: Path
) -> None:
    multiproc = tmp_path / "not" / "yet" / "there"
    server = TagrelayServer(
        rules, tmp_path / "data", KEY, env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}, workers=1
    )
    server.start()
    try:
        answer = server.track({"event_name": "sale", "event_id": "m1"})

        assert answer["success"] is True
        assert multiproc.is_dir()
    finally:
        server.stop()


def test_instances_sharing_a_data_directory_do_not_wipe_each_others_metrics(
    tmp_path: Path, rules: Path
) -> None:
    data = tmp_path / "data"
    first = TagrelayServer(rules, data, KEY, workers=1).start()
    try:
        first.track({"event_name": "sale", "event_id": "a1"})
        second = TagrelayServer(rules, data, KEY, workers=1).start()
        try:
            second.track({"event_name": "sale", "event_id": "b1"})
            second.track({"event_name": "sale", "event_id": "b2"})

            assert (accepted(first), accepted(second)) == (1.0, 2.0)
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_metrics_directory_removed_under_a_running_server_never_fails_a_request(
    tmp_path: Path, rules: Path
) -> None:
    multiproc = tmp_path / "multiproc"
    server = TagrelayServer(
        rules, tmp_path / "data", KEY, env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}, workers=1
    )
    server.start()
    try:
        shutil.rmtree(multiproc)  # before the worker wrote a single count

        answer = server.track({"event_name": "sale", "event_id": "gone1"})
        refused = requests.post(server.url + "/v1/track", json={"event_name": "x"}, timeout=10)
        auth = {"Authorization": f"Bearer {KEY}"}
        page = requests.get(server.url + "/metrics", headers=auth, timeout=10)

        assert answer["success"] is True
        assert refused.status_code == 401
        assert page.status_code == 503
        assert page.json() == {
            "success": False,
            "error": (
                "metrics unavailable: the directory the workers write their counts to is missing"
            ),
        }
        time.sleep(1.5)  # the tally's timer flush runs, and must not die with a traceback
        assert "Traceback" not in server.tail(200)
        assert "metrics cannot be written" in server.tail(200)
    finally:
        server.stop()


def test_a_master_upgraded_with_usr2_keeps_its_metrics_directory_and_counts(
    tmp_path: Path, rules: Path
) -> None:
    data = tmp_path / "data"
    server = TagrelayServer(rules, data, KEY, workers=1).start()
    assert server.proc is not None
    old_master = server.proc.pid
    try:
        server.track({"event_name": "sale", "event_id": "before"})
        os.kill(old_master, signal.SIGUSR2)  # gunicorn re-executes the master beside the old one
        wait_for(lambda: server.log.read_text().count("Listening at") == 2)
        os.kill(old_master, signal.SIGTERM)  # the upgrade done: the old master leaves
        server.proc.wait(timeout=30)
        # Another instance on the same data directory cleans up after stopped instances.
        other = TagrelayServer(rules, data, KEY, workers=1).start()
        other.stop()

        answer = server.track({"event_name": "sale", "event_id": "after"})
        refused = requests.post(server.url + "/v1/track", json={"event_name": "x"}, timeout=10)

        assert answer["success"] is True
        assert refused.status_code == 401
        assert accepted(server) == 2.0
        assert "Exception during worker exit" not in server.log.read_text()
    finally:
        server.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def scrape(port: int) -> str:
    """The metrics page on ``port``; empty while nothing answers there yet."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except requests.ConnectionError:
        return ""


def delivered(page: str) -> float:
    found = r'^tagrelay_deliveries_total\{destination="hook",outcome="delivered"\} (\S+)$'
    match = re.search(found, page, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_tagrelay_worker_serves_the_metrics_of_its_deliveries(tmp_path: Path) -> None:
    # Intake in `serve` (delivery off), delivery in a `tagrelay worker`: the worker's own
    # counts are served on its --metrics-bind, since no serve process sees them.
    sink = FaultySink("ok")
    with LoopbackServer(sink) as hook:
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            "destinations:\n"
            f"  hook: {{type: webhook, url: '{hook.url}/in'}}\n"
            "triggers:\n  all: {event: '*'}\n"
            "tags:\n  - {name: t, trigger: all, destination: hook}\n"
        )
        server = TagrelayServer(
            rules, tmp_path / "data", KEY, env={"TAGRELAY_DELIVER": "false"}, workers=1
        ).start()
        port = free_port()
        worker = None
        try:
            for i in range(3):
                server.track({"event_name": "sale", "event_id": f"e{i}"})
            command = [sys.executable, "-m", "engine.cli", "worker", "--rules", str(rules)]
            command += ["--metrics-bind", f"127.0.0.1:{port}"]
            # One environment for serve and worker may name a multiprocess directory.
            shared = tmp_path / "multiproc"
            shared.mkdir()
            env = {**server.env(), "PROMETHEUS_MULTIPROC_DIR": str(shared)}
            with (tmp_path / "worker.log").open("wb") as log:
                worker = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + 20
            while delivered(page := scrape(port)) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            missing = requests.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=30)
            server.stop()
    assert len(sink.received) == 3
    assert delivered(page) == 3
    assert "# TYPE tagrelay_outbox_depth gauge" in page  # read from the store, as serve's
    # Nothing waiting is a 0, not a missing series (an alert on the depth needs one).
    assert 'tagrelay_outbox_depth{destination="hook"} 0.0' in page
    assert list(shared.iterdir()) == []  # the worker's counts are its own, not mixed in there
    assert missing == 404
    assert "GET /metrics" not in (tmp_path / "worker.log").read_text()  # scrapes are not logged


def readiness(server: TagrelayServer) -> dict[str, Any]:
    """The ``checks.rules`` part of ``/readyz``."""
    checks: dict[str, Any] = requests.get(server.url + "/readyz", timeout=10).json()["checks"]
    return checks["rules"]


def test_a_worker_forked_again_serves_the_last_good_rules_not_those_of_the_start(
    tmp_path: Path, rules: Path
) -> None:
    # Rules v1 at start, v2 (good) reloaded, then a bad edit: a worker gunicorn forks again
    # (SIGHUP here; a crash or a timeout alike) starts from the master's rules, which were v1.
    server = TagrelayServer(rules, tmp_path / "data", KEY, workers=1).start()
    assert server.proc is not None
    try:
        first = readiness(server)["fingerprint"]
        rules.write_text(RULES.replace("log_all", "log_everything"))
        wait_for(lambda: readiness(server)["fingerprint"] != first)
        good = readiness(server)["fingerprint"]
        time.sleep(3)  # the master's loop has seen them too
        rules.write_text(RULES + "tags: [\n")
        wait_for(lambda: "reload_error" in readiness(server))

        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: server.log.read_text().count("Booting worker") == 2)
        time.sleep(1)
        seen = {readiness(server)["fingerprint"] for _ in range(5)}

        assert seen == {good}
        assert "reload_error" in readiness(server)
        assert "Exception during worker exit" not in server.log.read_text()
    finally:
        server.stop()


def test_sighup_makes_a_tagrelay_worker_check_its_rules_and_carry_on(
    tmp_path: Path, rules: Path
) -> None:
    # As `systemctl reload` sends it: unhandled, it ended the worker on the spot, unlogged.
    server = TagrelayServer(rules, tmp_path / "data", KEY, workers=1)  # its environment only
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "engine.cli", "worker", "--rules", str(rules)]
    command += ["--data-dir", str(server.data_dir)]
    with log.open("wb") as out:
        worker = subprocess.Popen(
            command, cwd=ROOT, env=server.env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "tagrelay worker: delivering from" in log.read_text())
        rules.write_text(RULES.replace("log_all", "log_everything"))

        worker.send_signal(signal.SIGHUP)
        wait_for(lambda: "rules reloaded" in log.read_text(), timeout=10)
        assert worker.poll() is None
    finally:
        worker.terminate()
        code = worker.wait(timeout=30)
    assert code == 0
    assert "delivery worker stopped" in log.read_text()


def listeners(socket: Path) -> list[str]:
    """What the master behind a control socket listens on, asked as `gunicornc` asks."""
    from gunicorn.ctl.client import ControlClient

    with ControlClient(str(socket), timeout=10) as client:
        return [item["address"] for item in client.send_command("show listeners")["listeners"]]


def test_instances_sharing_a_data_directory_keep_their_own_control_sockets(
    rules: Path,
) -> None:
    # gunicorn removes whatever is at its control socket's path when it starts and when it
    # stops: with one path per data directory, the second instance took the first's socket
    # and removed it when it stopped. (A short data directory: a unix socket's path is short.)
    data = Path(tempfile.mkdtemp(prefix="tr", dir="/tmp"))
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (data / f"gunicorn-{dead.pid}.ctl").touch()  # a master killed before it removed its own
        first = TagrelayServer(rules, data, KEY, workers=1)
        second = TagrelayServer(rules, data, KEY, workers=1)
        try:
            first.start()
            second.start()
            assert first.proc is not None and second.proc is not None
            own = data / f"gunicorn-{first.proc.pid}.ctl", data / f"gunicorn-{second.proc.pid}.ctl"
            wait_for(lambda: all(path.exists() for path in own))

            assert sorted(data.glob("gunicorn-*.ctl")) == sorted(own)
            assert listeners(own[0]) == [f"http://127.0.0.1:{first.port}"]
            assert listeners(own[1]) == [f"http://127.0.0.1:{second.port}"]
            second.stop()
            assert listeners(own[0]) == [f"http://127.0.0.1:{first.port}"]
            assert not own[1].exists()
        finally:
            second.stop()  # a failed test leaves no server running either
            first.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_a_data_directory_too_deep_for_a_control_socket_serves_without_one(
    tmp_path: Path, rules: Path
) -> None:
    data = tmp_path / ("d" * 60) / ("e" * 60)
    server = TagrelayServer(rules, data, KEY, workers=1).start()
    try:
        assert server.track({"event_name": "sale", "event_id": "deep"})["success"] is True
        assert "no control socket for gunicornc" in server.tail(200)
        assert "Control server error" not in server.tail(200)
        assert not list(data.glob("gunicorn-*.ctl"))
    finally:
        server.stop()


def test_control_sockets_are_told_live_or_stale_by_asking_them_not_by_their_pid() -> None:
    # Masters in containers sharing a data directory each see their own PIDs: another's PID
    # can be unknown here (its live socket was removed as stale) or be this master's own (its
    # socket was taken over).
    import socket

    from engine.server import control_socket

    data = Path(tempfile.mkdtemp(prefix="tr", dir="/tmp"))
    listeners = []
    try:
        for name in (f"gunicorn-{os.getpid()}.ctl", "gunicorn-999999999.ctl"):
            live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            live.bind(str(data / name))
            live.listen()
            listeners.append(live)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(data / "gunicorn-12.ctl"))  # its master killed: nothing listens
        (data / "gunicorn.ctl").touch()  # an earlier version's, left behind

        path = control_socket(data)

        assert path == data / f"gunicorn-{os.getpid()}-2.ctl"
        assert sorted(p.name for p in data.iterdir()) == sorted(
            [f"gunicorn-{os.getpid()}.ctl", "gunicorn-999999999.ctl"]
        )
    finally:
        for live in listeners:
            live.close()
        shutil.rmtree(data, ignore_errors=True)


def test_a_new_serve_binds_at_once_after_its_predecessors_master_was_killed(
    tmp_path: Path, rules: Path
) -> None:
    # kill -9 of the master alone: its workers finish the connections they have, up to the
    # graceful timeout while clients keep sending, and held the listening socket meanwhile.
    old = TagrelayServer(rules, tmp_path / "old", KEY, workers=1).start()
    assert old.proc is not None
    sending = threading.Event()
    sending.set()

    def keep_sending() -> None:
        with requests.Session() as session:  # one kept-alive connection
            while sending.is_set():
                with contextlib.suppress(requests.RequestException):
                    session.get(old.url + "/healthz", timeout=2)
                time.sleep(0.05)

    client = threading.Thread(target=keep_sending, daemon=True)
    client.start()
    new = TagrelayServer(rules, tmp_path / "new", KEY, workers=1)
    new.port = old.port
    try:
        time.sleep(0.5)
        os.kill(old.proc.pid, signal.SIGKILL)  # the master alone
        old.proc.wait(timeout=10)
        time.sleep(2)  # the orphaned worker has seen its parent go

        new.start(timeout=20)

        assert new.track({"event_name": "sale", "event_id": "after-kill"})["success"] is True
    finally:
        sending.clear()
        client.join(timeout=5)
        new.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.proc.pid, signal.SIGKILL)  # the orphan, if still there
