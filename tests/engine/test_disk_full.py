"""A full disk: intake answers 503 and loses nothing it acknowledged; writes resume after."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

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
