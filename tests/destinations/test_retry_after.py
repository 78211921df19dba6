"""``Retry-After``: delta-seconds and the three HTTP-date forms (RFC 9110 §5.6.7, §10.2.3)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from destinations.base import HttpResponse, Outcome, retry_after_seconds, status_result
from destinations.testkit.server import LoopbackServer, Reply
from tests.delivery.test_delivery import Harness, webhook_rules

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imf_fixdate(when: datetime) -> str:
    day, month = DAYS[when.weekday()], MONTHS[when.month - 1]
    return f"{day}, {when.day:02d} {month} {when.year} {when:%H:%M:%S} GMT"


def rfc850_date(when: datetime) -> str:
    day, month = LONG_DAYS[when.weekday()], MONTHS[when.month - 1]
    return f"{day}, {when.day:02d}-{month}-{when.year % 100:02d} {when:%H:%M:%S} GMT"


def asctime_date(when: datetime) -> str:
    day, month = DAYS[when.weekday()], MONTHS[when.month - 1]
    return f"{day} {month} {when.day:2d} {when:%H:%M:%S} {when.year}"


FORMS = {"imf-fixdate": imf_fixdate, "rfc850": rfc850_date, "asctime": asctime_date}


@pytest.mark.parametrize("form", FORMS.values(), ids=list(FORMS))
def test_an_http_date_in_each_form_is_read_as_utc(form: Callable[[datetime], str]) -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    header = form(later)

    seconds = retry_after_seconds({"Retry-After": header})

    assert seconds is not None and 7200 - 5 <= seconds <= 7200, header


def test_an_asctime_date_with_a_one_digit_day_is_read() -> None:
    now = datetime.now(UTC)
    later = now.replace(year=now.year + 1, month=3, day=3, microsecond=0)
    header = asctime_date(later)
    assert "  3 " in header  # the day padded with a space, as asctime writes it

    seconds = retry_after_seconds({"Retry-After": header})

    assert seconds is not None and abs(seconds - (later - now).total_seconds()) < 5


def test_a_date_with_the_unknown_zone_minus_0000_is_read_as_utc() -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    header = imf_fixdate(later).replace("GMT", "-0000")

    seconds = retry_after_seconds({"Retry-After": header})

    assert seconds is not None and 3600 - 5 <= seconds <= 3600


@pytest.mark.parametrize("form", FORMS.values(), ids=list(FORMS))
def test_a_date_in_the_past_means_now(form: Callable[[datetime], str]) -> None:
    earlier = datetime.now(UTC) - timedelta(days=1)

    assert retry_after_seconds({"Retry-After": form(earlier)}) == 0.0


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), (" 0 ", 0.0), ("007", 7.0)])
def test_delta_seconds_are_read(header: str, seconds: float) -> None:
    assert retry_after_seconds({"retry-after": header}) == seconds


@pytest.mark.parametrize(
    "header",
    [
        "",
        "soon",
        "1.5",  # delta-seconds are whole
        "-5",
        "\u00b2",  # ², a digit to str.isdigit, not to float()
        "\u0661\u0662\u0660",  # Arabic-Indic digits: float() reads 120, HTTP does not
        "\uff11\uff12\uff10",  # full-width digits
        "Mon, 31 Feb 2026 06:45:32 GMT",
        "Mon, 30 Nov 99999 06:45:32 GMT",
        "Mon, 30 Nov 2026 25:45:32 GMT",
        "Mon, 30 Nov 2026 06:45:32 +99999",
        "1 2 3 4 5",
    ],
)
def test_garbage_is_no_retry_after(header: str) -> None:
    assert retry_after_seconds({"Retry-After": header}) is None


def test_no_header_is_no_retry_after() -> None:
    assert retry_after_seconds({"Content-Type": "text/plain"}) is None


def test_a_429_with_an_asctime_retry_after_is_retryable_with_the_wait() -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    response = HttpResponse(429, {"Retry-After": asctime_date(later)}, b"slow down")

    result = status_result(response)

    assert result.outcome is Outcome.RETRYABLE
    assert result.retry_after is not None and result.retry_after > 7000


def test_the_worker_waits_as_an_asctime_retry_after_says(tmp_path: Path) -> None:
    header = asctime_date(datetime.now(UTC) + timedelta(hours=2))
    with LoopbackServer(lambda _: Reply.json({"e": 1}, 429, {"Retry-After": header})) as server:
        h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
        h.accept({"event_name": "lead", "event_id": "e1"})

        h.worker.drain()

    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("pending", 1)
    assert error is not None and "HTTP 429" in error  # not a TypeError in read_response
    delivery = h.store.get_delivery(1)
    assert delivery is not None and delivery.next_attempt_at >= time.time() + 7000
