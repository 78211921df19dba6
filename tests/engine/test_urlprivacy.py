"""Personal data in page URLs is redacted at intake, before it is stored or forwarded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from engine.event import normalize
from engine.urlprivacy import redact_personal_data

SHOP = "https://shop.example"
DIGEST = "a" * 64


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # a form sent by GET: fields named like personal data, whatever their values
        (
            f"{SHOP}/thanks?email=ada%40example.com&phone=%2B4915112345678&utm_source=news",
            f"{SHOP}/thanks?email=(redacted)&phone=(redacted)&utm_source=news",
        ),
        (f"{SHOP}/s?billing_first_name=Ada&lastName=Lovelace&tel=0151",
         f"{SHOP}/s?billing_first_name=(redacted)&lastName=(redacted)&tel=(redacted)"),
        # an e-mail address under any name, encoded or not
        (f"{SHOP}/search?q=ada@example.com", f"{SHOP}/search?q=(redacted)"),
        (f"{SHOP}/search?q=ada%40example.com&page=2", f"{SHOP}/search?q=(redacted)&page=2"),
        # in the fragment's query (single-page apps), and in a path segment
        (f"{SHOP}/#/signup?first_name=Ada&gclid=G",
         f"{SHOP}/#/signup?first_name=(redacted)&gclid=G"),
        (f"{SHOP}/#email=ada@example.com", f"{SHOP}/#email=(redacted)"),
        (f"{SHOP}/users/ada%40example.com/orders?x=1", f"{SHOP}/users/(redacted)/orders?x=1"),
        ("/users/ada@example.com", "/users/(redacted)"),
        # a fragment route, a redirect's own query (encoded once more), "+" in an address,
        # several addresses, an address inside a longer value
        (f"{SHOP}/#/users/ada@example.com", f"{SHOP}/#/users/(redacted)"),
        (f"{SHOP}/login?next=/account?email=ada@example.com", f"{SHOP}/login?next=(redacted)"),
        (f"{SHOP}/login?next=%2Faccount%3Femail%3Dada%2540example.com&x=1",
         f"{SHOP}/login?next=(redacted)&x=1"),
        (f"{SHOP}/welcome?ref=ada+news@example.com", f"{SHOP}/welcome?ref=(redacted)"),
        (f"{SHOP}/share?to=ada@example.com,bob@example.com", f"{SHOP}/share?to=(redacted)"),
        (f"{SHOP}/search?q=ada@example.com+order", f"{SHOP}/search?q=(redacted)"),
    ],
)  # fmt: skip
def test_personal_data_in_a_url_is_redacted_and_the_rest_kept_as_sent(
    url: str, expected: str
) -> None:
    assert redact_personal_data(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"{SHOP}/p/blue-shirt?utm_source=news&gclid=G&fbclid=F&q=shirt",  # campaign and click IDs
        f"{SHOP}/?email_sha256={DIGEST}&em={DIGEST}",  # digests are what platforms take
        f"{SHOP}/img/hero@2x.jpg",  # a file name, not an address
        "https://user:secret@shop.example/x",  # the host's user is no e-mail address
        f"{SHOP}/?email=&phone",  # nothing to redact
        f"{SHOP}/?phone_verified=1&email_opt_in=yes",  # names that hold no personal data
        f"{SHOP}/#reviews",
        f"{SHOP}/?ln=en&fn=search&db=main&ph=2",  # two-letter names say nothing in a URL
    ],
)
def test_a_url_without_personal_data_is_left_exactly_as_sent(url: str) -> None:
    assert redact_personal_data(url) == url


def test_intake_stores_and_forwards_page_url_and_referrer_redacted() -> None:
    raw: dict[str, Any] = {
        "event_name": "sign_up",
        "context": {
            "page_url": f"{SHOP}/thanks?email=ada%40example.com&utm_campaign=spring",
            "referrer": f"{SHOP}/signup?phone=%2B4915112345678",
            "user_agent": "Mozilla/5.0",
        },
    }

    event = normalize(raw, datetime.now(UTC))

    assert event["context"] == {
        "page_url": f"{SHOP}/thanks?email=(redacted)&utm_campaign=spring",
        "referrer": f"{SHOP}/signup?phone=(redacted)",
        "user_agent": "Mozilla/5.0",
    }
    assert raw["context"]["page_url"].endswith("ada%40example.com&utm_campaign=spring")  # as sent
