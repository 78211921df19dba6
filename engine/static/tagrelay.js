/*! tagrelay.js — browser collection for a tagrelay server. No build step, no dependencies.
 *
 * Either let the script tag configure itself (it then sends the first page view):
 *
 *   <script async src="https://t.shop.example/tagrelay.js" data-key="pk_live_..."></script>
 *
 * or call init() yourself (needed when consent must be known before the first event):
 *
 *   <script src="https://t.shop.example/tagrelay.js"></script>
 *   <script>
 *     tagrelay.init({key: "pk_live_...", spa: true});
 *     tagrelay.consent({ad_storage: "granted", analytics_storage: "granted",
 *                       ad_user_data: "granted", ad_personalization: "denied"});
 *     tagrelay.page();
 *     var eventId = tagrelay.track("add_to_cart", {value: 19.9, currency: "EUR"});
 *   </script>
 *
 * Calls made before the script has loaded can be queued as arrays:
 *   window.tagrelay = window.tagrelay || []; tagrelay.push(["track", "signup", {}]);
 *
 * Every event gets an event_id made here and returned by track()/page()/identify(): hand it to
 * your backend so the browser's and the server's copies of an event deduplicate. The server
 * answers with the visitor ID it keeps in its own HttpOnly cookie (tr_vid); this script keeps
 * a copy in localStorage so every event, and your page via getVisitorId(), can name the visitor.
 */
(function (window, document) {
  "use strict";

  var STORAGE_VISITOR = "tr_vid";
  var STORAGE_USER = "tr_uid";
  var STORAGE_USER_HASH = "tr_uhash"; // the user ID's hash, when the server verifies user IDs
  var STORAGE_SIGNED_OUT = "tr_out"; // reset() was called: events say no user is signed in
  var STORAGE_ANSWERED = "tr_answered"; // the server has answered, so its visitor cookie is set
  // user_data fields of the canonical event; other identify() traits go under properties.
  var USER_DATA_KEYS = ["email", "phone", "first_name", "last_name", "date_of_birth", "gender",
    "city", "state", "postal_code", "country", "external_id"];
  // Platform cookies set by the platforms' own pixels -> canonical context fields.
  var PLATFORM_COOKIES = {_fbp: "fbp", _fbc: "fbc", _ttp: "ttp", _ga: "ga_client_id"};

  var queued = Array.isArray(window.tagrelay) ? window.tagrelay : [];
  if (window.tagrelay && !Array.isArray(window.tagrelay)) return; // loaded twice: keep the first

  var script = document.currentScript;
  var config = null; // {endpoint, key, spa}
  // Consent Mode v2 purposes, sent with every event once set: gtag's "default" ones, and over
  // them what consent() and gtag's "update" set, which a later "default" never overrides (a
  // page whose default ran after its consent platform's update would otherwise grant what
  // the visitor had refused), as in gtag.
  var consentDefaults = null;
  var consentState = null;
  var beforeInit = []; // events made before init(), sent once it is called
  var inFlight = []; // promises of requests not yet answered (see flush())
  var held = null; // bodies waiting for the server's first answer to this browser (see send())
  var waiting = []; // events waiting to be sent again: {body, timer, resolve} (see attempt())
  var unloading = false; // after pagehide, only sendBeacon reliably leaves the page
  var lastPage = null; // URL of the last page view (SPA route changes compare against it)
  var pendingView = null; // an SPA route's page view waiting for the route's title (routeChanged)
  var memory = {}; // storage when localStorage is unavailable (private mode, sandboxes)

  // -- small helpers ---------------------------------------------------------------------------

  // What localStorage refused is kept in memory and read from there first. Read from
  // localStorage first, a localStorage that throws on every access (cookies blocked) made a new
  // visitor ID at each call and lost identify()'s user, and one refusing writes (a full quota)
  // gave back the previous user in place of the one it could not store.
  function store(name, value) {
    if (value === undefined) {
      if (Object.prototype.hasOwnProperty.call(memory, name)) return memory[name];
      try { return window.localStorage.getItem(name); } catch (e) { return null; }
    }
    try {
      if (value === null) window.localStorage.removeItem(name);
      else window.localStorage.setItem(name, value);
      delete memory[name];
    } catch (e) {
      memory[name] = value; // storage disabled: keep it for this page only
    }
    return value;
  }

  // What String() makes of a missing value, or blank: the server takes such a user ID for none
  // (README, The event), so it signs no one in, nor ends a reset()'s sign-out.
  function noValue(text) {
    return /^(undefined|null|NaN|\[object Object\])$/.test(text) || !/\S/.test(text);
  }

  function uuid() {
    var c = window.crypto;
    if (c && typeof c.randomUUID === "function") return c.randomUUID(); // secure contexts only
    var b = new Uint8Array(16);
    if (c && c.getRandomValues) c.getRandomValues(b);
    else for (var i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); });
    return h.slice(0, 4).join("") + "-" + h.slice(4, 6).join("") + "-" + h.slice(6, 8).join("") +
      "-" + h.slice(8, 10).join("") + "-" + h.slice(10).join("");
  }

  function readCookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) {
        try { return decodeURIComponent(parts[i].slice(eq + 1)); } catch (e) { return null; }
      }
    }
    return null;
  }

  // A lone UTF-16 surrogate (a title or a name cut in the middle of an emoji) is no Unicode:
  // JSON.stringify writes it as "\ud83d", and the server refused the whole event. It goes as
  // U+FFFD, as the browser's own UTF-8 encoding would write it.
  function wellFormed(key, value) {
    if (typeof value !== "string" || !/[\ud800-\udfff]/.test(value)) return value;
    if (typeof value.toWellFormed === "function") return value.toWellFormed();
    var text = "";
    for (var i = 0; i < value.length; i++) {
      var unit = value.charCodeAt(i);
      if (unit >= 0xd800 && unit <= 0xdbff && (value.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
        text += value.slice(i, i + 2);
        i++;
      } else {
        text += (unit & 0xf800) === 0xd800 ? "\ufffd" : value.charAt(i);
      }
    }
    return text;
  }

  function assign(target, source) {
    for (var k in source) {
      if (Object.prototype.hasOwnProperty.call(source, k)) target[k] = source[k];
    }
    return target;
  }

  function pageKey(href) {
    // A route is its path and query; hash changes (anchors) are not page views.
    return href.split("#")[0];
  }

  // -- the visitor ---------------------------------------------------------------------------

  function visitorId() {
    // Made here on the very first event so concurrent first events agree; the server prefers
    // its own cookie and answers with the ID it kept, which replaces this one.
    return store(STORAGE_VISITOR) || store(STORAGE_VISITOR, "v_" + uuid().replace(/-/g, ""));
  }

  // -- building and sending events -------------------------------------------------------------

  function build(name, properties, options) {
    options = options || {};
    var context = {
      page_url: window.location.href,
      referrer: options.referrer || document.referrer || null
    };
    for (var cookie in PLATFORM_COOKIES) {
      var value = readCookie(cookie);
      if (value) context[PLATFORM_COOKIES[cookie]] = value;
    }
    var event = {
      event_name: name,
      event_id: String(options.event_id || uuid()),
      timestamp: new Date().toISOString(),
      visitor_id: visitorId(),
      properties: assign({}, properties || {}),
      context: context
    };
    var userId = options.user_id || store(STORAGE_USER);
    if (userId && !noValue(String(userId))) {
      event.user_id = String(userId);
      var userHash = options.user_id ? options.user_hash : store(STORAGE_USER_HASH);
      if (userHash) event.user_hash = String(userHash);
    } else if (store(STORAGE_SIGNED_OUT)) {
      // After reset(): null says nobody is signed in, so the server forgets the visitor's last
      // user and adds it to no event (no user_id at all is a page that never names its user).
      event.user_id = null;
    }
    if (options.user_data) event.user_data = options.user_data;
    if (consentDefaults || consentState) {
      event.consent = assign(assign({}, consentDefaults), consentState);
    }
    return event;
  }

  function enqueue(event) {
    sendPendingView(); // the route's page view goes first
    if (config) send(event);
    else beforeInit.push(event);
    return event.event_id;
  }

  function collectUrl() {
    return config.endpoint + "/v1/collect?key=" + encodeURIComponent(config.key);
  }

  function beacon(body) {
    // text/plain needs no CORS preflight; the browser sends the visitor cookie with it.
    return !!(navigator.sendBeacon &&
      navigator.sendBeacon(collectUrl(), new Blob([body], {type: "text/plain"})));
  }

  function remember(answer) {
    if (answer && typeof answer.visitor_id === "string") {
      store(STORAGE_VISITOR, answer.visitor_id);
      store(STORAGE_ANSWERED, "1");
    }
    if (config.onResponse) config.onResponse(answer);
    return answer;
  }

  function send(event) {
    var body = JSON.stringify(event, wellFormed);
    if (unloading || typeof window.fetch !== "function") {
      if (!beacon(body) && config.debug) console.warn("tagrelay: could not send", event.event_name);
      return;
    }
    if (held) {
      held.push(body);
      return;
    }
    // A browser the server has not answered yet has no visitor cookie, and events sent side by
    // side would each get a new visitor (the server does not take the page's word for one when
    // it verifies user IDs). The first goes alone; the others follow once it has the cookie.
    if (!store(STORAGE_ANSWERED)) held = [];
    post(body);
  }

  // A page left while events wait to be sent again: its timers never fire, so they go now.
  function leaving() {
    unloading = true;
    sendPendingView();
    waiting.splice(0).forEach(function (entry) {
      window.clearTimeout(entry.timer);
      beacon(entry.body);
      entry.resolve(true);
    });
    release();
  }

  function release() {
    var bodies = held || [];
    held = null;
    bodies.forEach(unloading ? beacon : post);
  }

  // A 408, 429 or 5xx (the body stalled, the store unavailable: disk full, a restart), or no
  // answer at all (the server down, the connection lost), is tried again, after the server's
  // Retry-After or 1, 2, 4 s, up to RETRIES times while the page stays; a page left meanwhile
  // sends it by beacon. The event_id makes a repeat a duplicate, never a second event.
  var RETRIES = 3;
  var LONGEST_WAIT = 30; // seconds

  // 408: the server stopped waiting for the body (its read timeout); nothing was accepted.
  function retryable(status) {
    return status === 408 || status === 429 || status >= 500;
  }

  function waitBeforeRetry(response, attempt) {
    var told = Number(response.headers.get("Retry-After"));
    var seconds = told >= 0 && response.headers.get("Retry-After") !== null ? told : Math.pow(2, attempt);
    return Math.min(seconds, LONGEST_WAIT) * 1000;
  }

  function attempt(body, tries, keepalive) {
    return window.fetch(collectUrl(), {
      method: "POST",
      body: body,
      headers: {"Content-Type": "text/plain"}, // a "simple" request: no preflight
      credentials: "include", // send and receive the server's visitor cookie
      keepalive: keepalive !== false, // finishes even when the page is closed meanwhile
      mode: "cors"
    }).then(function (response) {
      if (retryable(response.status) && tries < RETRIES) {
        return again(body, tries, waitBeforeRetry(response, tries), response.status);
      }
      return response.json().catch(function () { return null; }).then(function (answer) {
        if (!response.ok && config.debug) console.warn("tagrelay:", response.status, answer);
        if (response.ok && store(STORAGE_SIGNED_OUT) && JSON.parse(body).user_id === null) {
          // The server has the sign-out: later events name no user, as a page that never names
          // its user does, so a user the site's backend links next is not signed out again.
          store(STORAGE_SIGNED_OUT, null);
        }
        return response.ok ? remember(answer) : answer;
      });
    }, function () {
      // Refused before it left, maybe: the browser allows 64 KB in all to keepalive requests
      // and beacons in flight, which a burst of events or a large one uses up. Without
      // keepalive it goes; failing that too, it had no answer, and is tried again as a 503 is,
      // then by beacon (the server down so long, or the origin not allowed).
      if (keepalive !== false && !unloading) return attempt(body, tries, false);
      if (tries < RETRIES && !unloading) return again(body, tries, Math.pow(2, tries) * 1000);
      beacon(body);
      return null;
    });
  }

  /** Send body again after wait ms, or by beacon when the page is left meanwhile. */
  function again(body, tries, wait, status) {
    if (config.debug) console.warn("tagrelay:", status || "no answer", "trying again in", wait, "ms");
    return new Promise(function (resolve) {
      var entry = {body: body, resolve: resolve};
      entry.timer = window.setTimeout(function () {
        waiting.splice(waiting.indexOf(entry), 1);
        resolve(false);
      }, wait);
      waiting.push(entry);
    }).then(function (beaconed) {
      if (beaconed) return null;
      if (!unloading) return attempt(body, tries + 1);
      beacon(body);
      return null;
    });
  }

  function post(body) {
    var request = attempt(body, 0).then(function (answer) {
      release(); // answered or not, the events held behind this one go now
      return answer;
    }, function (error) {
      release(); // onResponse threw
      throw error;
    });
    inFlight.push(request);
    var done = function () { inFlight.splice(inFlight.indexOf(request), 1); };
    request.then(done, done);
  }

  /** The purposes of gtag's consent state: without its wait_for_update and region (not
   *  purposes; the server refuses an event whose consent holds them, and every later event was
   *  lost). A state for some regions only is not known to apply here: it denies, never grants. */
  function gtagPurposes(state) {
    var purposes = {};
    for (var name in state || {}) {
      if (name === "wait_for_update" || name === "region") continue;
      if (state.region && state[name] !== "denied") continue;
      purposes[name] = state[name];
    }
    return purposes;
  }

  // -- single-page apps ----------------------------------------------------------------------

  // An app changes the route (pushState) before it renders the route and sets its title, so a
  // page view sent from inside pushState carried the previous route's title. The view is made
  // then (its URL, referrer and time), and sent once the title changes, after TITLE_WAIT at
  // the latest (a route with the same title), or before anything else is sent, the page is
  // left or flush() is called.
  var TITLE_WAIT = 500; // ms

  function routeChanged() {
    var previous = lastPage;
    if (previous !== null && pageKey(previous) === pageKey(window.location.href)) return;
    sendPendingView();
    lastPage = window.location.href;
    // In an SPA the referrer of a route is the previous route, not the document's referrer.
    var pending = {event: build("page_view", {}, previous === null ? {} : {referrer: previous})};
    var title = document.title;
    pendingView = pending;
    pending.timer = window.setTimeout(sendPendingView, TITLE_WAIT);
    if (typeof window.MutationObserver === "function") {
      pending.observer = new window.MutationObserver(function () {
        if (document.title !== title) sendPendingView();
      });
      pending.observer.observe(document.head || document.documentElement,
        {childList: true, subtree: true, characterData: true});
    }
  }

  function sendPendingView() {
    var pending = pendingView;
    if (!pending) return;
    pendingView = null;
    window.clearTimeout(pending.timer);
    if (pending.observer) pending.observer.disconnect();
    pending.event.properties.title = document.title;
    send(pending.event);
  }

  function watchHistory() {
    ["pushState", "replaceState"].forEach(function (method) {
      var original = window.history[method];
      window.history[method] = function () {
        var result = original.apply(this, arguments);
        routeChanged();
        return result;
      };
    });
    window.addEventListener("popstate", routeChanged);
  }

  /** Where this script came from, with the path it was served under: a site that proxies
   *  tagrelay under a path of its own (/t/tagrelay.js) is answered there (/t/v1/collect). */
  function scriptBase() {
    if (!script || !script.src) return "";
    var url = new URL(script.src, window.location.href);
    return url.origin + url.pathname.replace(/\/[^\/]*$/, "");
  }

  // -- the API -------------------------------------------------------------------------------

  var api = {
    /** Configure: {key, endpoint (default: where this script came from, its path included),
     *  spa, debug, consent, onResponse(answer)}. Events made before init() are sent now. */
    init: function (options) {
      options = options || {};
      if (config) return api; // once per page
      // Checked before the page is configured: a call without a key configured it all the same,
      // and every event, those of a later init() with the key too, went out with "key=undefined".
      if (!options.key) throw new Error("tagrelay.init: a publishable key is required");
      config = {
        key: options.key,
        endpoint: String(options.endpoint || scriptBase()).replace(/\/+$/, ""),
        spa: options.spa !== false,
        debug: !!options.debug,
        onResponse: options.onResponse
      };
      if (options.consent) api.consent(options.consent);
      if (config.spa) watchHistory();
      window.addEventListener("pagehide", leaving);
      window.addEventListener("pageshow", function () { unloading = false; }); // back/forward cache
      beforeInit.splice(0).forEach(send);
      return api;
    },

    /** Send an event; returns its event_id (pass it to your backend for deduplication).
     *  options: {event_id, user_id, user_hash, user_data} — user_data only if your page has
     *  it; user_hash with user_id when the server verifies user IDs. */
    track: function (eventName, properties, options) {
      if (!eventName) throw new Error("tagrelay.track: an event name is required");
      return enqueue(build(String(eventName), properties, options));
    },

    /** A page view of the current URL; returns its event_id. */
    page: function (properties, options) {
      lastPage = window.location.href;
      var props = assign({title: document.title}, properties || {});
      return enqueue(build("page_view", props, options));
    },

    /** Name the visitor: later events carry user_id. Traits that are user_data fields (email,
     *  phone, names, address, external_id) go under user_data, others under properties.
     *  options.user_hash: the user ID's hash from your backend, when the server verifies user
     *  IDs (TAGRELAY_IDENTITY_SECRET); later events carry it too. */
    identify: function (userId, traits, options) {
      if (userId && !noValue(String(userId))) {
        store(STORAGE_USER, String(userId));
        var hash = options && options.user_hash;
        store(STORAGE_USER_HASH, hash ? String(hash) : null);
        store(STORAGE_SIGNED_OUT, null);
      }
      var userData = {}, properties = {}, any = false;
      for (var k in traits || {}) {
        if (USER_DATA_KEYS.indexOf(k) >= 0) { userData[k] = traits[k]; any = true; }
        else properties[k] = traits[k];
      }
      return enqueue(build("identify", properties, any ? {user_data: userData} : {}));
    },

    /** Consent Mode v2 purposes ({ad_storage, analytics_storage, ad_user_data,
     *  ad_personalization}: "granted"/"denied"/boolean), sent with every later event; or
     *  gtag's form, consent("default" | "update", {...}): a default never overrides what
     *  consent() or an update set. */
    consent: function (state, gtagState) {
      // gtag's form too: consent("default" | "update", {...}), as pages call it for Google's
      // Consent Mode; a string's characters were read as purposes "0", "1", ...
      if (state === "default") {
        consentDefaults = assign(consentDefaults || {}, gtagPurposes(gtagState));
        return api;
      }
      if (typeof state === "string") state = gtagPurposes(gtagState);
      consentState = assign(consentState || {}, state || {});
      return api;
    },

    /** The visitor ID (the server's, once it has answered). */
    getVisitorId: function () {
      return visitorId();
    },

    /** Forget the user (on logout): later events carry "user_id": null until the server has
     *  answered one (or identify()), and it stops taking this browser for that user's (see
     *  README, Enrichment). */
    reset: function () {
      store(STORAGE_USER, null);
      store(STORAGE_USER_HASH, null);
      store(STORAGE_SIGNED_OUT, "1");
      return api;
    },

    /** A promise settled when every request sent so far is answered (tests, before navigation). */
    flush: function () {
      sendPendingView();
      var settled = inFlight.map(function (p) { return p.catch(function () {}); });
      return Promise.all(settled).then(function () {
        return inFlight.length ? api.flush() : undefined; // the held ones sent meanwhile
      });
    }
  };

  /** Run one queued call (["track", "signup", {}]): a call that names no method, or throws, is
   *  reported on the console and the calls after it still run. */
  function run(call) {
    try {
      var method = call && api[call[0]];
      if (typeof method !== "function" || call[0] === "push") {
        throw new Error("not a tagrelay method: " + (call && call[0]));
      }
      method.apply(api, Array.prototype.slice.call(call, 1));
    } catch (e) {
      if (window.console) console.error("tagrelay:", e);
    }
  }

  /** The queue's push(), after the script has loaded too: the snippet
   *  `window.tagrelay = window.tagrelay || []; tagrelay.push([...])` works whenever it runs. */
  api.push = function () {
    for (var i = 0; i < arguments.length; i++) run(arguments[i]);
  };

  window.tagrelay = api;

  // Self-configuration from the script tag: data-key, data-endpoint, data-spa="false". Calls
  // queued before the script loaded run next, in order (so a queued consent() precedes the
  // automatic first page view).
  var selfConfigured = !!(script && script.getAttribute("data-key"));
  if (selfConfigured) {
    api.init({
      key: script.getAttribute("data-key"),
      endpoint: script.getAttribute("data-endpoint") || undefined,
      spa: script.getAttribute("data-spa") !== "false"
    });
  }
  queued.forEach(run);
  if (selfConfigured && lastPage === null) api.page();
})(window, document);
