"""A full disk: intake answers 503 and loses nothing it acknowledged; writes resume after."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from tests.support.server import LOG_ALL_RULES, ROOT, free_port

# Run in a child process: the file size limit (RLIMIT_FSIZE, which makes a write past it fail
# as a full disk would) is the whole process's.
CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from engine.app import create_app
    from engine.config import ServerKey, Settings
    from engine.pipeline import load_rules

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    rules, data = Path(sys.argv[1]), Path(sys.argv[2])
    settings = Settings(rules=rules, data_dir=data, server_keys=(ServerKey("sk_0123456789"),),
                        deliver=False)
    client = create_app(settings, rules=load_rules(rules, interval=0)).test_client()

    def post(event_id):
        answer = client.post(
            "/v1/track", headers={"Authorization": "Bearer sk_0123456789"},
            json={"event_name": "purchase", "event_id": event_id,
                  "properties": {"note": "x" * 2000}})
        return answer.status_code, answer.get_json(), answer.headers.get("Retry-After")

    post("warm")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    answers = {f"e{i}": post(f"e{i}") for i in range(1000)}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = post("after")
    print(json.dumps({"answers": answers, "after": after}))
    """
)


def test_a_full_disk_refuses_with_503_keeps_every_acknowledged_event_and_recovers(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations: {log: {type: log}}\n"
        "triggers: {all: {event: '*'}}\n"
        "tags: [{name: log_all, trigger: all, destination: log}]\n"
    )
    data = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(rules), str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    answers = result["answers"]

    statuses = {status for status, _, _ in answers.values()}
    assert statuses == {200, 503}  # the limit was reached, and nothing else happened
    refused = next(a for a in answers.values() if a[0] == 503)
    assert refused[1] == {"success": False, "error": "the event store is unavailable; retry"}
    assert refused[2] == "5"  # Retry-After
    assert result["after"][0] == 200  # writes resume once there is room again
    acknowledged = {event_id for event_id, (status, _, _) in answers.items() if status == 200}
    with sqlite3.connect(data / "tagrelay.db") as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert acknowledged <= stored
    assert "Traceback" not in run.stderr


def _private_tmpfs_works() -> bool:
    """Whether this machine lets a process mount a tmpfs of its own (``unshare -rm``)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _private_tmpfs_works(), reason="needs unshare and a private tmpfs mount")
def test_workers_started_on_a_full_disk_answer_instead_of_dying_of_sigbus(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(LOG_ALL_RULES)
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "server.log"
    port = free_port()
    key = "sk_full_0123456789"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGRELAY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(TAGRELAY_SERVER_KEYS=key, TAGRELAY_DATA_DIR=str(data), TAGRELAY_MIN_FREE_MB="0")
    # The data directory is a 4 MB tmpfs of the server's own mount namespace: full when filled,
    # gone when the server is.
    command = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"']
    command += [str(data), sys.executable, "-m", "engine.cli", "serve", "--rules", str(rules)]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        first = requests.post(url + "/v1/track", json={"event_name": "sale"}, headers=auth)
        assert first.status_code == 200, log.read_text()[-3000:]
        # Fill the server's file system, seen through its root (the unshare execs the master).
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/root{data}/filler", "wb") as f:
            while True:
                f.write(bytes(65536))
                f.flush()

        os.kill(proc.pid, signal.SIGHUP)  # a reload: a new worker, whose counts need new files
        time.sleep(2)
        statuses = []
        for n in range(5):
            try:
                answer = requests.post(
                    url + "/v1/track",
                    json={"event_name": "sale", "event_id": f"full-{n}"},
                    headers=auth,
                    timeout=10,
                )
                statuses.append(answer.status_code)
            except requests.ConnectionError:
                statuses.append(0)  # no answer: the worker died with the request
            time.sleep(0.2)

        text = log.read_text()
        assert "SIGBUS" not in text
        assert set(statuses) <= {200, 503}, statuses  # answered: accepted, or "retry"
        assert "metrics cannot be written" in text  # the counts are lost, and said to be
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
