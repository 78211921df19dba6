"""The browser script in real headless Chromium against a real ``tagrelay serve``.

A shop page on its own loopback origin loads ``/tagrelay.js`` from the tagrelay server and
collects page views through ``/v1/collect``. The visitor lands with Google and Meta click IDs in
the URL; later the shop's backend sends the ``sale`` to ``/v1/track`` naming only the visitor
ID the script reports, and the platforms' emulators must receive the click IDs the browser saw.
The rest checks the visitor cookie, single-page-app route changes, the script-tag set-up, and
that a page from an origin the publishable key does not allow gets no CORS allowance.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from destinations.testkit.google_ads import GoogleAdsEmulator
from destinations.testkit.meta import MetaEmulator
from destinations.testkit.server import LoopbackServer, Reply, Request
from tests.support.server import TagrelayServer

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.slow

SERVER_KEY = "sk_browser_test_0123456789"
PUBLISHABLE_KEY = "pk_test"
ANY_ORIGIN_KEY = "pk_other"
WAIT = 30.0
IDENTITY_SECRET = "idsec_browser_tests_0123456789"
_NEEDS_HASH = (
    "user_id needs its user_hash (identity verification is on): the hex HMAC-SHA256 of the "
    "user ID keyed with TAGRELAY_IDENTITY_SECRET, made by your backend"
)


def user_hash(user_id: str) -> str:
    """What the shop's backend renders into the page for a signed-in user."""
    return hmac.new(IDENTITY_SECRET.encode(), user_id.encode(), hashlib.sha256).hexdigest()


GCLID = "TeSt-gclid_123"  # mixed case, '-' and '_': must arrive unchanged
FBCLID = "IwAR-TeSt_fbclid"
FBP = "fb.1.1732100000000.1234567890"  # the _fbp cookie Meta's pixel would have set
GRANTED = {
    "ad_storage": "granted",
    "analytics_storage": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "denied",
}

RULES = """\
destinations:
  meta:
    type: meta_capi
    pixel_id: "{meta.pixel_id}"
    access_token: {meta.access_token}
    endpoint: {meta.url}
    delivery: {{batch_wait: 0.1}}
  gads:
    type: google_ads
    customer_id: "123-456-7890"
    conversion_action: "111111111"
    developer_token: {gads.developer_token}
    client_id: {gads.client_id}
    client_secret: {gads.client_secret}
    refresh_token: "{gads.refresh_token}"
    endpoint: {gads_url}
    token_endpoint: {gads_url}/token
    delivery: {{batch_wait: 0.1}}
triggers:
  sale: {{event: sale}}
tags:
  - {{name: meta_purchase, trigger: sale, destination: meta, event_name: Purchase,
     consent: [ad_storage, ad_user_data]}}
  - {{name: gads_sale, trigger: sale, destination: gads, consent: [ad_storage, ad_user_data]}}
"""


# -- the shop's pages -----------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Trail shoe</title>
<script src="{script}"></script>
<script>
  window.collected = [];
  document.cookie = "_fbp={fbp}; path=/";
  tagrelay.init({{key: "{key}", onResponse: function (a) {{ window.collected.push(a); }}}});
  tagrelay.consent({consent});
  window.firstPageView = tagrelay.page();
</script></head>
<body><h1>Trail shoe</h1></body></html>
"""

# A site on Google's Consent Mode: its consent comes through gtag's commands only.
GTAG_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Gtag</title>
<script src="{script}"></script>
<script>
  window.collected = [];
  tagrelay.init({{key: "{key}", onResponse: function (a) {{ window.collected.push(a); }}}});
  tagrelay.page();
</script></head><body>gtag</body></html>
"""

# The script tag configures itself; consent is queued before the script loads.
AUTO_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Auto</title>
<script>window.tagrelay = [["consent", {consent}]];</script>
<script async src="{script}" data-key="{key}"></script>
</head><body>auto</body></html>
"""

# Queued calls, one of them a mistake, and the same snippet run again once the script is there.
QUEUE_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Queue</title>
<script>
  window.errors = [];
  console.error = function () {{ window.errors.push([].slice.call(arguments).join(" ")); }};
  window.tagrelay = [["consent", {consent}], ["trak", "typo"], ["track", "queued"]];
</script>
<script src="{script}" data-key="{key}"></script>
<script>
  window.tagrelay = window.tagrelay || [];
  tagrelay.push(["track", "pushed_after_load"]);
</script>
</head><body>queue</body></html>
"""

# A new visitor's first events, sent side by side once the page has loaded.
BURST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Burst</title>
<script src="{script}"></script>
<script>
  window.collected = [];
  window.addEventListener("load", function () {{
    tagrelay.init({{key: "{key}", onResponse: function (a) {{ window.collected.push(a); }}}});
    tagrelay.consent({consent});
    window.sent = [tagrelay.page(), tagrelay.track("view_item"), tagrelay.track("scroll")];
  }});
</script></head><body>burst</body></html>
"""


# The shop serves tagrelay under a path of its own domain, through its reverse proxy.
PROXIED_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Proxied</title>
<script>window.tagrelay = [["consent", {consent}]];</script>
<script async src="/t/tagrelay.js?v=3" data-key="{key}"></script>
</head><body>proxied</body></html>
"""

PROXIED_HEADERS = ("content-type", "cookie", "origin", "referer", "user-agent")

# The script without init(): the test configures it.
BARE_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Bare</title>
<script src="{script}"></script>
<script>window.collected = [];</script>
</head><body>bare</body></html>
"""

# localStorage as browsers break it: "throws" on every access (cookies blocked for the site: a
# SecurityError), "full" refuses writes (a full quota; Safari's private mode before 11).
STORAGE_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Storage</title>
<script>
  if (location.search === "?throws") {{
    Object.defineProperty(window, "localStorage", {{get: function () {{
      throw new DOMException("The document is sandboxed", "SecurityError");
    }}}});
  }} else if (location.search === "?full") {{
    Storage.prototype.setItem = function () {{
      throw new DOMException("The quota has been exceeded.", "QuotaExceededError");
    }};
  }}
</script>
<script src="{script}"></script>
<script>
  window.collected = [];
  tagrelay.init({{key: "{key}", onResponse: function (a) {{ window.collected.push(a); }}}});
  tagrelay.consent({consent});
</script></head><body>storage</body></html>
"""


class Site:
    """The shop: ``/page.html`` and SPA routes under ``/app/``, ``/auto.html``; set ``script``.

    ``/t/...`` is a reverse proxy to tagrelay at ``upstream``, as a site serving it under a path
    of its own domain has (nginx's ``location /t/ {proxy_pass http://tagrelay/;}``).
    """

    def __init__(self) -> None:
        self.script = ""
        self.upstream = ""
        self.proxied: list[str] = []
        self.down = 0  # so many requests to /t/v1/collect find tagrelay down: a reset connection

    def proxy(self, request: Request) -> Reply:
        self.proxied.append(f"{request.method} {request.path}")
        if self.down and request.path == "/t/v1/collect":
            self.down -= 1
            return Reply.reset()
        answer = requests.request(
            request.method,
            self.upstream + request.path[len("/t") :],
            params={name: values for name, values in request.query.items()},
            headers={k: v for k, v in request.headers.items() if k in PROXIED_HEADERS},
            data=request.body,
            timeout=10,
        )
        kept = ("content-type", "set-cookie", "retry-after")
        return Reply(
            answer.status_code,
            answer.content,
            {k: answer.headers[k] for k in kept if k in answer.headers},
        )

    def __call__(self, request: Request) -> Reply:
        if request.path.startswith("/t/"):
            return self.proxy(request)
        values = {"script": self.script, "key": PUBLISHABLE_KEY, "consent": json.dumps(GRANTED)}
        if request.path == "/page.html" or request.path.startswith("/app/"):
            html = PAGE.format(fbp=FBP, **values)
        elif request.path == "/auto.html":
            html = AUTO_PAGE.format(**values)
        elif request.path == "/gtag.html":
            html = GTAG_PAGE.format(**values)
        elif request.path == "/burst.html":
            html = BURST_PAGE.format(**values)
        elif request.path == "/queue.html":
            html = QUEUE_PAGE.format(**values)
        elif request.path == "/proxied.html":
            html = PROXIED_PAGE.format(**values)
        elif request.path == "/bare.html":
            html = BARE_PAGE.format(**values)
        elif request.path == "/storage.html":
            html = STORAGE_PAGE.format(**values)
        else:
            return Reply.text("not found", status=404)
        return Reply(200, html.encode(), {"Content-Type": "text/html; charset=utf-8"})


# -- the server -----------------------------------------------------------------------------------


class Server(TagrelayServer):
    """The shared harness, reading stored events by ID."""

    def stored_event(self, event_id: str) -> dict[str, Any] | None:
        return next((e for e in self.stored() if e.get("event_id") == event_id), None)


@dataclass
class Stack:
    """The platforms, the shop on an allowed and on a foreign origin, and tagrelay."""

    meta: MetaEmulator
    gads: GoogleAdsEmulator
    shop: LoopbackServer
    foreign: LoopbackServer
    server: Server
    site: Site


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("browser")
    gads, site = GoogleAdsEmulator(), Site()
    with (
        MetaEmulator() as meta,
        LoopbackServer(gads) as gads_server,
        LoopbackServer(site) as shop,
        LoopbackServer(site) as foreign,  # same pages, an origin no key allows except pk_other
    ):
        rules = tmp / "rules.yaml"
        rules.write_text(RULES.format(meta=meta, gads=gads, gads_url=gads_server.url))
        server = Server(
            rules,
            tmp / "data",
            SERVER_KEY,
            {
                "TAGRELAY_PUBLISHABLE_KEYS": (
                    f"{PUBLISHABLE_KEY}={shop.url}|https://shop.example,{ANY_ORIGIN_KEY}=*"
                ),
                "TAGRELAY_COOKIE_SECURE": "false",  # the test pages are plain http
                "TAGRELAY_IDENTITY_SECRET": IDENTITY_SECRET,
            },
        )
        site.script = server.url + "/tagrelay.js"
        site.upstream = server.url
        try:
            server.start()
            yield Stack(meta, gads, shop, foreign, server, site)
        finally:
            server.stop()


def wait_for(condition: Callable[[], Any], what: str, server: Server) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n--- server log ---\n{server.tail()}")


def collected(browser: WebDriver) -> list[dict[str, Any]]:
    """The /v1/collect answers the page received so far."""
    answers: list[dict[str, Any]] = browser.execute_script("return window.collected || [];")
    return answers


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    """``name=value; Max-Age=1; HttpOnly`` -> ``{"name": "value", "max-age": "1", ...}``."""
    pairs = (part.strip().partition("=") for part in set_cookie.split(";"))
    return {(name if i == 0 else name.lower()): value for i, (name, _, value) in enumerate(pairs)}


# -- the tests ------------------------------------------------------------------------------------


def test_click_ids_seen_in_the_browser_reach_platforms_with_a_later_server_sale(
    stack: Stack, browser: WebDriver
) -> None:
    server = stack.server
    landed_ms = int(time.time() * 1000)

    browser.get(f"{stack.shop.url}/page.html?gclid={GCLID}&fbclid={FBCLID}")
    answer = wait_for(lambda: collected(browser), "the page view to be collected", server)[0]
    visitor = browser.execute_script("return tagrelay.getVisitorId();")
    page_view_id = browser.execute_script("return window.firstPageView;")
    user_agent = browser.execute_script("return navigator.userAgent;")
    seen_ms = int(time.time() * 1000)

    assert answer["success"] is True
    assert answer["event_id"] == page_view_id
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", page_view_id
    )
    assert visitor == answer["visitor_id"]
    # The server's cookie holds the same visitor, out of reach of the page's scripts.
    cookie = browser.get_cookie("tr_vid")
    assert cookie is not None
    # The visitor ID, signed: with TAGRELAY_IDENTITY_SECRET set, a cookie made up is no visitor.
    assert cookie["value"].rpartition(".")[0] == visitor
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["path"] == "/"
    assert cookie["secure"] is False  # TAGRELAY_COOKIE_SECURE=false
    assert "tr_vid" not in browser.execute_script("return document.cookie;")
    stored = server.stored_event(page_view_id)
    assert stored is not None
    assert stored["event_name"] == "page_view"
    assert stored["visitor_id"] == visitor
    assert stored["consent"] == GRANTED
    assert stored["properties"]["title"] == "Trail shoe"
    context = stored["context"]
    assert context["page_url"] == f"{stack.shop.url}/page.html?gclid={GCLID}&fbclid={FBCLID}"
    assert context["gclid"] == GCLID
    assert context["fbclid"] == FBCLID
    assert context["fbp"] == FBP  # read from the _fbp cookie by the script
    assert context["user_agent"] == user_agent
    assert context["ip"] == "127.0.0.1"

    # Script storage lost (as ITP does to it): the server's cookie brings the visitor back.
    browser.execute_script("localStorage.clear();")
    browser.get(f"{stack.shop.url}/page.html")
    again = wait_for(lambda: collected(browser), "the second page view", server)[0]
    assert again["visitor_id"] == visitor
    assert browser.execute_script("return tagrelay.getVisitorId();") == visitor

    # Act: the backend confirms the sale, naming only the visitor (no click IDs, no cookies).
    sale = {
        "event_name": "sale",
        "event_id": "ord_browser_1",
        "visitor_id": visitor,
        "properties": {"order_id": "ord_browser_1", "value": 59.0, "currency": "EUR"},
        "context": {"page_url": "https://shop.example/checkout/complete"},
        "consent": GRANTED,
    }
    assert server.track(sale)["fired"] == ["meta_purchase", "gads_sale"]
    wait_for(
        lambda: stack.gads.conversions and stack.meta.events,
        "the sale at Google Ads and Meta",
        server,
    )

    conversion = stack.gads.conversions[0]
    assert conversion["gclid"] == GCLID
    assert conversion["orderId"] == "ord_browser_1"
    assert conversion["conversionValue"] == 59.0
    purchase = stack.meta.events[0]
    assert purchase["event_name"] == "Purchase"
    assert purchase["event_id"] == "ord_browser_1"
    user_data = purchase["user_data"]
    match = re.fullmatch(rf"fb\.1\.(\d{{13}})\.{re.escape(FBCLID)}", user_data["fbc"])
    assert match, user_data["fbc"]  # fbclid unchanged, case kept
    assert landed_ms - 1000 <= int(match.group(1)) <= seen_ms + 1000  # when the click was seen
    assert user_data["fbp"] == FBP
    assert user_data["client_user_agent"] == user_agent  # remembered from the browser
    assert stack.meta.server.errors == []


def test_single_page_app_route_changes_send_page_views(stack: Stack, browser: WebDriver) -> None:
    server = stack.server
    browser.get(f"{stack.shop.url}/app/home")
    wait_for(lambda: collected(browser), "the first page view", server)

    # The app renders the route, and sets its title, after it has changed the URL.
    browser.execute_script(
        "history.pushState({}, '', '/app/cart');"
        "setTimeout(function () { document.title = 'Your cart'; }, 150);"
    )
    cart = wait_for(lambda: collected(browser)[1:], "a page view for the pushState", server)[0]
    browser.execute_script("history.replaceState({}, '', '/app/cart#reviews');")  # same route
    browser.execute_script("history.back();")  # popstate back to /app/home
    back = wait_for(lambda: collected(browser)[2:], "a page view for popstate", server)[0]
    browser.execute_script("return tagrelay.flush();")
    time.sleep(0.5)

    assert len(collected(browser)) == 3  # the hash-only replaceState sent nothing
    cart_view = server.stored_event(cart["event_id"])
    assert cart_view is not None
    assert cart_view["event_name"] == "page_view"
    assert cart_view["context"]["page_url"] == f"{stack.shop.url}/app/cart"
    assert cart_view["context"]["referrer"] == f"{stack.shop.url}/app/home"
    assert cart_view["properties"] == {"title": "Your cart"}  # not the previous route's
    back_view = server.stored_event(back["event_id"])
    assert back_view is not None
    assert back_view["context"]["page_url"] == f"{stack.shop.url}/app/home"
    assert back_view["properties"] == {"title": "Your cart"}  # unchanged: sent all the same

    # track() and identify() return the event IDs they sent; user data only as the page gave it.
    order_id = browser.execute_script(
        "return tagrelay.track('add_to_cart', {value: 19.9, currency: 'EUR'});"
    )
    # The user ID's hash, as the shop's backend renders it into the page.
    identify_id = browser.execute_script(
        "return tagrelay.identify('cust_9', {email: 'ada@example.com', plan: 'pro'},"
        f" {{user_hash: '{user_hash('cust_9')}'}});"
    )
    wait_for(lambda: len(collected(browser)) == 5, "track and identify", server)
    added = server.stored_event(order_id)
    assert added is not None
    assert added["event_name"] == "add_to_cart"
    assert added["properties"] == {"value": 19.9, "currency": "EUR"}
    assert "user_data" not in added
    identified = server.stored_event(identify_id)
    assert identified is not None
    assert identified["event_name"] == "identify"
    assert identified["user_id"] == "cust_9"
    assert identified["user_data"] == {"email": "ada@example.com"}
    assert identified["properties"] == {"plan": "pro"}
    assert "user_hash" not in identified  # checked, not kept
    # Later events carry the user and its hash; after reset(), neither.
    later = browser.execute_script("return tagrelay.track('wishlist');")
    wait_for(lambda: len(collected(browser)) == 6, "an identified event", server)
    assert (server.stored_event(later) or {}).get("user_id") == "cust_9"
    browser.execute_script("tagrelay.reset();")
    anonymous = browser.execute_script("return tagrelay.track('wishlist');")
    wait_for(lambda: len(collected(browser)) == 7, "an anonymous event", server)
    after = server.stored_event(anonymous) or {}
    # The page said nobody is signed in ("user_id": null): none, nor one added from the visitor.
    assert "user_id" not in after
    assert "user_id" not in after.get("enriched", [])


def test_an_event_right_after_a_route_change_follows_that_routes_page_view(
    stack: Stack, browser: WebDriver
) -> None:
    # The route's page view waits for the route's title, but never behind the route's events.
    server = stack.server
    browser.get(f"{stack.shop.url}/app/start")
    wait_for(lambda: collected(browser), "the first page view", server)

    begun = browser.execute_script(
        "history.pushState({}, '', '/app/checkout');"
        "document.title = 'Checkout';"
        "return tagrelay.track('begin_checkout');"
    )
    wait_for(lambda: len(collected(browser)) == 3, "the page view and the event", server)

    on_route = [e for e in server.stored() if e["context"]["page_url"].endswith("/app/checkout")]
    view = next(e for e in on_route if e["event_name"] == "page_view")
    assert view["properties"] == {"title": "Checkout"}
    assert view["timestamp"] <= (server.stored_event(begun) or {})["timestamp"]


def test_a_site_proxying_tagrelay_under_a_path_of_its_own_is_answered_there(
    stack: Stack, browser: WebDriver
) -> None:
    # <script src="/t/tagrelay.js">: the script sends to /t/v1/collect, where the proxy is.
    server = stack.server
    stack.site.proxied.clear()
    browser.get(f"{stack.shop.url}/proxied.html")

    def page_view() -> dict[str, Any] | None:
        url = f"{stack.shop.url}/proxied.html"
        return next((e for e in server.stored() if e["context"].get("page_url") == url), None)

    stored = wait_for(page_view, "the page view, through the proxy", server)
    assert stored["properties"] == {"title": "Proxied"}
    assert stack.site.proxied == ["GET /t/tagrelay.js", "POST /t/v1/collect"]


def test_a_page_cannot_name_a_user_without_the_backends_hash(
    stack: Stack, browser: WebDriver
) -> None:
    # Any page can claim any user ID: with TAGRELAY_IDENTITY_SECRET set, only the site's
    # backend can vouch for one, so a browser cannot tie its click IDs to someone else.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)
    answers = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const post = (body) => fetch(arguments[0], {method: "POST", body: JSON.stringify(body)})
          .then(async (r) => [r.status, (await r.json()).error]);
        Promise.all([
          post({event_name: "identify", user_id: "victim_42"}),
          post({event_name: "identify", user_id: "victim_42", user_hash: arguments[1]}),
          post({event_name: "identify", user_id: "victim_42", user_hash: arguments[2]}),
        ]).then(done);""",
        f"{server.url}/v1/collect?key={PUBLISHABLE_KEY}",
        user_hash("someone_else"),
        user_hash("victim_42"),
    )

    assert answers[0] == [403, _NEEDS_HASH]
    assert answers[1] == [403, "user_hash does not match user_id"]
    assert answers[2][0] == 200


def test_beacon_carries_events_without_fetch_and_after_pagehide(
    stack: Stack, browser: WebDriver
) -> None:
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    visitor = wait_for(lambda: collected(browser), "the page view", server)[0]["visitor_id"]
    browser.execute_script(
        """window.beacons = 0;
        const send = navigator.sendBeacon.bind(navigator);
        navigator.sendBeacon = (url, data) => { window.beacons += 1; return send(url, data); };"""
    )

    after_pagehide = browser.execute_script(
        "window.dispatchEvent(new PageTransitionEvent('pagehide'));"
        "return tagrelay.track('left_page');"
    )
    without_fetch = browser.execute_script(
        "window.dispatchEvent(new PageTransitionEvent('pageshow'));"
        "window.fetch = undefined; return tagrelay.track('old_browser');"
    )

    assert browser.execute_script("return window.beacons;") == 2
    for event_id in (after_pagehide, without_fetch):
        stored = wait_for(
            lambda event_id=event_id: server.stored_event(event_id), "a beaconed event", server
        )
        assert stored["visitor_id"] == visitor
        assert stored["consent"] == GRANTED


def test_consent_takes_gtags_form_too(stack: Stack, browser: WebDriver) -> None:
    # consent("update", {...}), as pages call gtag: the string's characters were read as
    # purposes "0", "1", ... and the update itself was lost.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)

    event_id = browser.execute_script(
        'tagrelay.consent("update", {ad_storage: "denied", ad_user_data: "denied"});'
        'return tagrelay.track("after_update");'
    )

    stored = wait_for(lambda: server.stored_event(event_id), "the event", server)
    assert stored["consent"] == {**GRANTED, "ad_storage": "denied", "ad_user_data": "denied"}


def test_gtags_wait_for_update_and_region_are_no_purposes(stack: Stack, browser: WebDriver) -> None:
    # Google's documented default, wait_for_update: 500, was sent as a purpose: the server
    # refused every later event (consent.wait_for_update must be 'granted', ...).
    server = stack.server
    browser.get(f"{stack.shop.url}/gtag.html")
    wait_for(lambda: collected(browser), "the page view", server)

    event_id = browser.execute_script(
        'tagrelay.consent("default", {ad_storage: "denied", wait_for_update: 500});'
        'tagrelay.consent("default", {analytics_storage: "denied", ad_user_data: "granted",'
        '                             region: ["US-CA"]});'
        'tagrelay.consent("default", {ad_user_data: "granted", ad_personalization: "granted"});'
        'return tagrelay.track("after_default");'
    )

    stored = wait_for(lambda: server.stored_event(event_id), "the event", server)
    # A region's state denies, never grants: the script cannot know the visitor's region.
    assert stored["consent"] == {
        "ad_storage": "denied",
        "analytics_storage": "denied",
        "ad_user_data": "granted",
        "ad_personalization": "granted",
    }


def test_a_default_never_overrides_the_visitors_choice(stack: Stack, browser: WebDriver) -> None:
    # gtag's default is what holds until the visitor decides. A page whose default snippet ran
    # after its consent platform restored a refusal (consent("update", ...) or consent({...}))
    # granted what the visitor had refused: the default overwrote the update.
    server = stack.server
    browser.get(f"{stack.shop.url}/gtag.html")
    wait_for(lambda: collected(browser), "the page view", server)

    event_id = browser.execute_script(
        'tagrelay.consent("update", {ad_storage: "denied", ad_user_data: "denied"});'
        'tagrelay.consent({ad_personalization: "denied"});'
        'tagrelay.consent("default", {ad_storage: "granted", ad_user_data: "granted",'
        '                             ad_personalization: "granted",'
        '                             analytics_storage: "granted"});'
        'return tagrelay.track("after_late_default");'
    )
    refused = browser.execute_script(
        'tagrelay.consent("update", {analytics_storage: "denied"});'
        'return tagrelay.track("after_second_update");'
    )

    stored = wait_for(lambda: server.stored_event(event_id), "the event", server)
    assert stored["consent"] == {
        "ad_storage": "denied",
        "ad_user_data": "denied",
        "ad_personalization": "denied",
        "analytics_storage": "granted",  # the default, for what the visitor did not decide
    }
    stored = wait_for(lambda: server.stored_event(refused), "the second event", server)
    assert stored["consent"]["analytics_storage"] == "denied"


@pytest.mark.parametrize(("refusals", "kept"), [(2, True), (4, False)])
def test_an_event_answered_503_or_429_is_sent_again_a_few_times(
    stack: Stack, browser: WebDriver, refusals: int, kept: bool
) -> None:
    # The store unavailable (a restart, a full disk) or a rate limit: the event was lost.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)

    event_id = browser.execute_script(
        """const real = window.fetch, refusals = arguments[0];
        window.tries = 0;
        window.fetch = (url, init) => {
          window.tries += 1;
          if (window.tries > refusals) return real(url, init);
          const status = window.tries % 2 ? 503 : 429;
          return Promise.resolve(new Response('{"success": false}',
            {status: status, headers: {"Retry-After": "0"}}));
        };
        return tagrelay.track("after_outage");""",
        refusals,
    )
    browser.execute_script("return tagrelay.flush();")

    tries = browser.execute_script("return window.tries;")
    if kept:
        assert wait_for(lambda: server.stored_event(event_id), "the event, tried again", server)
        assert tries == refusals + 1
    else:
        assert tries == 4  # the first try and three more, then it gives up
        time.sleep(0.5)
        assert server.stored_event(event_id) is None


def test_an_event_answered_408_is_sent_again(stack: Stack, browser: WebDriver) -> None:
    # The server answers 408 to a body that stopped arriving (TAGRELAY_READ_TIMEOUT): nothing
    # was accepted, and the README says to retry. The script took it as final, and the event
    # (of a page on a network that stalled a moment) was lost.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)

    event_id = browser.execute_script(
        """const real = window.fetch;
        window.tries = 0;
        window.fetch = (url, init) => {
          window.tries += 1;
          if (window.tries > 1) return real(url, init);
          return Promise.resolve(new Response('{"success": false}', {status: 408}));
        };
        return tagrelay.track("after_stall");"""
    )
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    assert wait_for(lambda: server.stored_event(event_id), "the event, tried again", server)
    assert browser.execute_script("return window.tries;") == 2


def test_an_event_that_finds_the_server_down_is_sent_again(
    stack: Stack, browser: WebDriver
) -> None:
    # No answer at all (tagrelay restarting, the connection lost): the event went by beacon at
    # once, to the same server, and was lost; a 503 would have been tried again.
    server, site = stack.server, stack.site
    browser.get(f"{stack.shop.url}/proxied.html")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )
    site.proxied.clear()
    site.down = 4  # the fetch, the fetch without keepalive, a second try and its fallback

    event_id = browser.execute_script("return tagrelay.track('while_restarting');")

    assert wait_for(lambda: server.stored_event(event_id), "the event, sent again", server)
    assert site.proxied.count("POST /t/v1/collect") == 5
    assert site.down == 0


def test_an_event_waiting_to_be_sent_again_goes_by_beacon_when_the_page_is_left(
    stack: Stack, browser: WebDriver
) -> None:
    # A timer set on a page never fires once it is left: the event waiting for it was lost.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)

    event_id = browser.execute_script(
        """window.fetch = () => Promise.resolve(new Response('{"success": false}',
          {status: 503, headers: {"Retry-After": "30"}}));
        return tagrelay.track("before_leaving");"""
    )
    time.sleep(0.3)  # answered 503, waiting 30 s
    assert server.stored_event(event_id) is None
    browser.get(f"{stack.shop.url}/page.html?next")

    assert wait_for(lambda: server.stored_event(event_id), "the event, by beacon", server)


def test_events_beyond_the_browsers_keepalive_allowance_are_sent_all_the_same(
    stack: Stack, browser: WebDriver
) -> None:
    # Chromium allows 64 KB in all to keepalive requests and beacons in flight: of ten 12 KB
    # events sent together, fetch refused the sixth and later, so did sendBeacon, and they were
    # lost without a word.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)

    sent = browser.execute_script(
        """const text = "x".repeat(12000), sent = [];
        for (let i = 0; i < 10; i++) sent.push(tagrelay.track("configured", {text: text}));
        return sent;"""
    )
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    assert len(collected(browser)) == 11
    assert all(server.stored_event(event_id) for event_id in sent)


def test_text_cut_in_the_middle_of_an_emoji_is_sent_all_the_same(
    stack: Stack, browser: WebDriver
) -> None:
    # A name cut to length with slice() can end in half an emoji, a lone UTF-16 surrogate:
    # JSON.stringify wrote it as "\ud83d", which the server refuses, and the event was lost.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the page view", server)

    sent = browser.execute_script(
        r"""const name = "Trail shoe \ud83d\udc5f".slice(0, -1);  // half of the shoe emoji
        document.title = name;
        const sent = [tagrelay.track("view_item", {name: name}), tagrelay.page()];
        delete String.prototype.toWellFormed;  // browsers before 2023
        sent.push(tagrelay.track("view_item", {name: name + " \udc5f \u00fc \ud83d\udc5f"}));
        return sent;"""
    )
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    stored = [wait_for(lambda i=i: server.stored_event(i), "the event", server) for i in sent]
    assert stored[0]["properties"] == {"name": "Trail shoe \ufffd"}
    assert stored[1]["properties"] == {"title": "Trail shoe \ufffd"}
    assert stored[2]["properties"] == {"name": "Trail shoe \ufffd \ufffd \u00fc \U0001f45f"}


def test_script_tag_attributes_configure_it_and_send_the_first_page_view(
    stack: Stack, browser: WebDriver
) -> None:
    server = stack.server
    browser.get(f"{stack.shop.url}/auto.html")

    def auto_page_view() -> dict[str, Any] | None:
        url = f"{stack.shop.url}/auto.html"
        return next((e for e in server.stored() if e["context"].get("page_url") == url), None)

    stored = wait_for(auto_page_view, "the automatic page view", server)
    assert stored["event_name"] == "page_view"
    assert stored["consent"] == GRANTED  # the queued consent() ran before the page view
    # Once the answer is in: the server stores the event before the browser has its answer,
    # and until then the script knows only the visitor ID it made up itself.
    answered = "return tagrelay.flush().then(function () { return tagrelay.getVisitorId(); });"
    assert stored["visitor_id"] == browser.execute_script(answered)


def test_queued_calls_survive_a_bad_one_and_push_works_after_load(
    stack: Stack, browser: WebDriver
) -> None:
    server = stack.server
    url = f"{stack.shop.url}/queue.html"
    browser.get(url)

    def sent() -> list[str] | None:
        names = [e["event_name"] for e in server.stored() if e["context"].get("page_url") == url]
        return names if len(names) >= 3 else None

    names = wait_for(sent, "the queued, pushed and automatic events", server)
    assert sorted(names) == ["page_view", "pushed_after_load", "queued"]
    errors = browser.execute_script("return window.errors;")
    assert errors == ["tagrelay: Error: not a tagrelay method: trak"]


def test_a_new_visitors_first_events_sent_together_are_one_visitor(
    stack: Stack, browser: WebDriver
) -> None:
    # With identity verification on, the server takes the visitor from its cookie alone: the
    # events a new browser sends before the first answer must not each get a visitor of their own.
    server = stack.server
    browser.get(f"{stack.shop.url}/burst.html?gclid={GCLID}")
    wait_for(lambda: browser.execute_script("return window.sent;"), "the page's events", server)
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    assert len(collected(browser)) == 3  # flush() waited for every one of them
    cookie = browser.get_cookie("tr_vid")
    assert cookie is not None
    stored = [server.stored_event(i) for i in browser.execute_script("return window.sent;")]
    visitor = cookie["value"].rpartition(".")[0]  # signed (TAGRELAY_IDENTITY_SECRET)
    assert [e and e["visitor_id"] for e in stored] == [visitor] * 3
    assert {a["visitor_id"] for a in collected(browser)} == {visitor}


def test_a_browser_whose_clock_is_ahead_has_its_events_taken_at_the_servers_time(
    stack: Stack, browser: WebDriver
) -> None:
    # A visitor's clock two hours ahead (a wrong time zone): every event it sent was refused,
    # 400 "timestamp is more than an hour in the future", and lost.
    server = stack.server
    browser.get(f"{stack.shop.url}/bare.html")
    browser.execute_script(
        """const iso = Date.prototype.toISOString, ahead = 2 * 3600 * 1000;
        Date.prototype.toISOString = function () {
          return iso.call(new Date(this.getTime() + ahead));
        };
        tagrelay.init({key: arguments[0], consent: arguments[1],
                       onResponse: function (a) { window.collected.push(a); }});""",
        PUBLISHABLE_KEY,
        GRANTED,
    )

    event_id = browser.execute_script("return tagrelay.track('clock_ahead');")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    assert [a.get("event_id") for a in collected(browser)] == [event_id]
    stored = wait_for(lambda: server.stored_event(event_id), "the event", server)
    when = datetime.fromisoformat(stored["timestamp"])
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_an_init_without_a_key_leaves_the_script_to_a_later_init_with_one(
    stack: Stack, browser: WebDriver
) -> None:
    # init() threw for the missing key, but had configured the script: the later init() with
    # the key was ignored (once per page), and every event went out with ?key=undefined.
    server = stack.server
    browser.get(f"{stack.shop.url}/bare.html")

    error = browser.execute_script(
        "try { tagrelay.init({key: window.notYetSet}); } catch (e) { return e.message; }"
    )
    before = browser.execute_script("return tagrelay.track('before_init');")
    browser.execute_script(
        "tagrelay.init({key: arguments[0], consent: arguments[1],"
        "               onResponse: function (a) { window.collected.push(a); }});",
        PUBLISHABLE_KEY,
        GRANTED,
    )
    after = browser.execute_script("return tagrelay.track('after_init');")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    assert error == "tagrelay.init: a publishable key is required"
    assert [a["event_id"] for a in collected(browser)] == [before, after]
    assert wait_for(lambda: server.stored_event(after), "the event after init()", server)


def test_a_page_without_usable_local_storage_keeps_its_visitor_and_user(
    stack: Stack, browser: WebDriver
) -> None:
    # localStorage that throws on every access was read as nothing at all: each call made a new
    # visitor ID and identify()'s user ID was never sent, not even with the identify event.
    server = stack.server
    browser.get(f"{stack.shop.url}/storage.html?throws")
    first = browser.execute_script("return tagrelay.getVisitorId();")
    assert browser.execute_script("return tagrelay.getVisitorId();") == first
    identified = browser.execute_script(
        "return tagrelay.identify('cust_21', {}, {user_hash: arguments[0]});", user_hash("cust_21")
    )
    later = browser.execute_script("return tagrelay.track('after_identify');")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    visitor = browser.execute_script("return tagrelay.getVisitorId();")
    assert visitor == collected(browser)[0]["visitor_id"]  # the server's, once it has answered
    for event_id in (identified, later):
        stored = wait_for(lambda i=event_id: server.stored_event(i), "the event", server)
        assert stored["user_id"] == "cust_21"
        assert stored["visitor_id"] == visitor


def test_a_page_whose_local_storage_refuses_writes_sends_the_user_it_was_given(
    stack: Stack, browser: WebDriver
) -> None:
    # A full localStorage still held the previous user: identify() could not replace it, and the
    # new user's events went out as the previous one's.
    server = stack.server
    browser.get(f"{stack.shop.url}/storage.html")
    browser.execute_script(
        "tagrelay.identify('cust_old', {}, {user_hash: arguments[0]});", user_hash("cust_old")
    )
    browser.get(f"{stack.shop.url}/storage.html?full")
    assert browser.execute_script("return localStorage.getItem('tr_uid');") == "cust_old"
    identified = browser.execute_script(
        "return tagrelay.identify('cust_new', {}, {user_hash: arguments[0]});",
        user_hash("cust_new"),
    )
    later = browser.execute_script("return tagrelay.track('after_identify');")
    browser.execute_script("tagrelay.reset();")
    anonymous = browser.execute_script("return tagrelay.track('after_reset');")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )

    for event_id in (identified, later):
        stored = wait_for(lambda i=event_id: server.stored_event(i), "the event", server)
        assert stored["user_id"] == "cust_new"
    after = wait_for(lambda: server.stored_event(anonymous), "the event after reset()", server)
    assert "user_id" not in after  # reset() kept in memory: the page says nobody is signed in


def test_a_page_from_an_origin_the_key_does_not_allow_reads_the_refusal_and_stops(
    stack: Stack, browser: WebDriver
) -> None:
    # The refusal was unreadable, which the script took for no answer: each event was sent
    # again, some nine requests, all refused.
    server = stack.server
    page_url = f"{stack.foreign.url}/page.html?gclid=foreign"
    browser.get(page_url)
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )
    answer = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", body: '{"event_name": "probe"}',
                             headers: {"Content-Type": "text/plain"}, credentials: "include"})
          .then(r => r.json().then(j => done([r.status, j.error])), e => done(e.name));""",
        f"{server.url}/v1/collect?key={PUBLISHABLE_KEY}",
    )
    browser.execute_script(
        """const real = window.fetch;
        window.tries = 0;
        window.fetch = (url, init) => { window.tries += 1; return real(url, init); };
        window.beacons = 0;
        const beacon = navigator.sendBeacon.bind(navigator);
        navigator.sendBeacon = (url, data) => { window.beacons += 1; return beacon(url, data); };
        tagrelay.track("refused");"""
    )
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )
    time.sleep(0.5)  # a try after the first, had there been one, is made by now

    assert answer == [403, "this page's origin is not allowed for the publishable key"]
    assert browser.execute_script("return [window.tries, window.beacons];") == [1, 0]
    assert collected(browser) == []
    assert not [e for e in server.stored() if e["context"].get("page_url") == page_url]
    assert not [e for e in server.stored() if e["event_name"] in ("probe", "refused")]


def test_collect_answers_cors_and_sets_the_visitor_cookie(stack: Stack, tmp_path: Path) -> None:
    server, allowed, foreign = stack.server, stack.shop.url, stack.foreign.url
    url = f"{server.url}/v1/collect?key={PUBLISHABLE_KEY}"
    body = json.dumps({"event_name": "page_view", "context": {"page_url": allowed + "/x"}})

    preflight = requests.options(
        url,
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=5,
    )
    answer = requests.post(
        url, data=body, headers={"Origin": allowed, "Content-Type": "text/plain"}, timeout=5
    )
    as_json = requests.post(
        url, data=body, headers={"Origin": allowed, "Content-Type": "application/json"}, timeout=5
    )
    foreign_preflight = requests.options(
        url, headers={"Origin": foreign, "Access-Control-Request-Method": "POST"}, timeout=5
    )
    foreign_post = requests.post(
        url, data=body, headers={"Origin": foreign, "Content-Type": "text/plain"}, timeout=5
    )
    any_origin = requests.post(
        f"{server.url}/v1/collect?key={ANY_ORIGIN_KEY}",
        data=body,
        headers={"Origin": foreign, "Content-Type": "text/plain"},
        timeout=5,
    )

    assert preflight.status_code in (200, 204)
    assert preflight.headers["Access-Control-Allow-Origin"] == allowed
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "content-type" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert answer.status_code == 200, answer.text
    assert answer.json()["success"] is True
    assert answer.headers["Access-Control-Allow-Origin"] == allowed
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert answer.headers["Access-Control-Expose-Headers"] == "Retry-After"  # see tagrelay.js
    assert "Origin" in answer.headers.get("Vary", "")
    cookie = cookie_attributes(answer.headers["Set-Cookie"])
    assert cookie["tr_vid"].rpartition(".")[0] == answer.json()["visitor_id"]  # signed
    assert 0 < int(cookie["max-age"]) <= 400 * 86400
    assert cookie["path"] == "/"
    assert cookie["samesite"] == "Lax"
    assert "httponly" in cookie
    assert "secure" not in cookie  # TAGRELAY_COOKIE_SECURE=false
    assert as_json.status_code == 200, as_json.text
    # An origin the key does not allow: no allowance, and the event is refused.
    assert "Access-Control-Allow-Origin" not in foreign_preflight.headers
    assert foreign_post.status_code == 403, foreign_post.text
    assert foreign_post.headers["Access-Control-Allow-Origin"] == foreign  # to read the refusal
    assert "Set-Cookie" not in foreign_post.headers
    # A key allowing any origin still echoes the exact origin (credentials forbid "*").
    assert any_origin.status_code == 200, any_origin.text
    assert any_origin.headers["Access-Control-Allow-Origin"] == foreign

    # By default the cookie is Secure (a deployment serves tagrelay over https).
    secure_server = Server(
        server.rules,
        tmp_path / "secure",
        SERVER_KEY,
        {"TAGRELAY_PUBLISHABLE_KEYS": f"{PUBLISHABLE_KEY}={allowed}"},
    )
    try:
        secure_server.start()
        secure = requests.post(
            f"{secure_server.url}/v1/collect?key={PUBLISHABLE_KEY}",
            data=body,
            headers={"Origin": allowed, "Content-Type": "text/plain"},
            timeout=5,
        )
    finally:
        secure_server.stop()
    assert secure.status_code == 200, secure.text
    assert "secure" in cookie_attributes(secure.headers["Set-Cookie"])


def test_after_reset_the_pages_events_and_a_guests_sale_on_that_browser_name_no_user(
    stack: Stack, browser: WebDriver
) -> None:
    # A shared computer: after the user's logout (reset()), enrichment put their user ID back
    # on the page's events and on a guest's sale naming only that visitor (Meta's external_id
    # beside the guest's own e-mail), for the visitor was still taken to be theirs.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the first page view", server)
    visitor = browser.execute_script("return tagrelay.getVisitorId();")
    signed_in = browser.execute_script(
        "return tagrelay.identify('cust_shared', {}, {user_hash: arguments[0]});",
        user_hash("cust_shared"),
    )
    identified = wait_for(lambda: server.stored_event(signed_in), "identify", server)
    assert identified["user_id"] == "cust_shared"

    browser.execute_script("tagrelay.reset();")
    assert browser.execute_script("return localStorage.getItem('tr_out');") == "1"
    browser.get(f"{stack.shop.url}/page.html")  # the logout's next page: a new page load
    wait_for(lambda: collected(browser), "the page view after logout", server)
    page_view = browser.execute_script("return window.firstPageView;")
    stored = wait_for(lambda: server.stored_event(page_view), "the page view", server)
    assert stored["visitor_id"] == visitor
    assert "user_id" not in stored
    assert "user_id" not in stored.get("enriched", [])

    sale = {
        "event_name": "sale",
        "event_id": "ord_guest_after_logout",
        "visitor_id": visitor,
        "user_data": {"email": "guest@example.com"},
        "properties": {"order_id": "ord_guest_after_logout", "value": 12.0, "currency": "EUR"},
        "context": {"page_url": "https://shop.example/checkout/complete"},
        "consent": GRANTED,
    }
    answer = server.track(sale)
    assert "meta_purchase" in answer["fired"], (answer, server.stored_event(sale["event_id"]))
    purchase = wait_for(
        lambda: next(
            (e for e in stack.meta.events if e["event_id"] == "ord_guest_after_logout"), None
        ),
        "the guest's sale at Meta",
        server,
    )
    assert "external_id" not in purchase["user_data"]  # not the previous user's
    assert "em" in purchase["user_data"]  # the guest's own e-mail
    assert "user_id" not in (server.stored_event("ord_guest_after_logout") or {"user_id": "?"})

    # The next user to sign in is named again, and the page's events carry them.
    browser.execute_script(
        "tagrelay.identify('cust_next', {}, {user_hash: arguments[0]});", user_hash("cust_next")
    )
    later = browser.execute_script("return tagrelay.track('after_next_login');")
    next_user = wait_for(lambda: server.stored_event(later), "the next user's event", server)
    assert next_user["user_id"] == "cust_next"
    assert browser.execute_script("return localStorage.getItem('tr_out');") is None


def test_identify_of_a_javascript_non_value_after_reset_keeps_the_sign_out(
    stack: Stack, browser: WebDriver
) -> None:
    # identify(String(user.id)) on a page with no user is identify("undefined"), which the
    # server takes for no user ID: it ended reset()'s sign-out, and the page's events then got
    # the last user's ID added back by enrichment.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the first page view", server)
    signed_in = browser.execute_script(
        "return tagrelay.identify('cust_gone', {}, {user_hash: arguments[0]});",
        user_hash("cust_gone"),
    )
    wait_for(lambda: server.stored_event(signed_in), "identify", server)

    browser.execute_script("tagrelay.reset(); tagrelay.identify(String(undefined));")
    assert browser.execute_script("return localStorage.getItem('tr_uid');") is None
    later = browser.execute_script("return tagrelay.track('after_logout', {}, {user_id: 'null'});")
    stored = wait_for(lambda: server.stored_event(later), "the event after logout", server)
    assert "user_id" not in stored
    assert "user_id" not in stored.get("enriched", [])


def test_a_site_that_links_its_users_from_its_backend_is_signed_out_once_by_reset(
    stack: Stack, browser: WebDriver
) -> None:
    # A site that never calls identify() (its backend links the user) but calls reset() on
    # logout: every later page view said "user_id": null until an identify() that never came,
    # and signed out the next user its backend linked to that browser.
    server = stack.server
    browser.get(f"{stack.shop.url}/page.html")
    wait_for(lambda: collected(browser), "the first page view", server)
    visitor = browser.execute_script("return tagrelay.getVisitorId();")
    browser.execute_script("tagrelay.reset();")
    signed_out = browser.execute_script("return tagrelay.track('after_logout');")
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; tagrelay.flush().then(done, done);"
    )
    wait_for(lambda: server.stored_event(signed_out), "the sign-out", server)
    assert browser.execute_script("return localStorage.getItem('tr_out');") is None

    login = {"event_name": "login", "visitor_id": visitor, "user_id": "cust_b", "consent": GRANTED}
    server.track(login)
    later = browser.execute_script("return tagrelay.track('browsing');")
    stored = wait_for(lambda: server.stored_event(later), "a page event after the login", server)
    sale = {"event_name": "note", "event_id": "after_backend_login", "visitor_id": visitor}
    server.track({**sale, "consent": GRANTED})

    assert "user_id" not in stored or stored["user_id"] == "cust_b"
    assert server.stored_event("after_backend_login")["user_id"] == "cust_b"
