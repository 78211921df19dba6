"""Fixtures of the tagrelay-slack tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_slack_webhook import FakeSlack, serve


@pytest.fixture
def slack_webhook() -> Iterator[FakeSlack]:
    """A fake Slack incoming webhook on an ephemeral loopback port."""
    with serve() as fake:
        yield fake
