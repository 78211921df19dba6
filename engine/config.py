"""Server settings: from the environment (``TAGRELAY_*``), an optional YAML file, and the CLI.

Precedence, highest first: command-line flags, environment variables, the file named by
``TAGRELAY_CONFIG``, defaults. A file uses the variables' names in lower case (``workers``,
``db``). Every value is checked as it is read: a value that is not allowed, or a key the file
should not have, is a :class:`~engine.errors.ConfigError` that names the setting as it was given
(``TAGRELAY_WORKERS``, ``workers`` in the file, ``--workers``) and says what is allowed. Secrets
(server keys, signing secrets) are never printed whole, nor quoted in an error.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from engine.errors import ConfigError

DEFAULT_PORT = 8080
DEFAULT_BIND = f"127.0.0.1:{DEFAULT_PORT}"
KEY_FILE = "server_key"
MAX_COOKIE_AGE = 400 * 86400  # browsers cap cookie lifetimes at 400 days
MAX_DAYS = 36500  # a hundred years: retention and windows beyond that are a typo
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_SECRET = 16  # characters of TAGRELAY_IDENTITY_SECRET


@dataclass(frozen=True)
class ServerKey:
    """A server key and, optionally, the secret its requests must be signed with."""

    key: str
    signing_secret: str | None = None

    def __repr__(self) -> str:
        return f"ServerKey({self.key[:6]}…, signed={self.signing_secret is not None})"


@dataclass(frozen=True)
class PublishableKey:
    """A browser key: it reaches only ``/v1/collect``, and only from its allowed origins."""

    key: str
    origins: tuple[str, ...] = ()  # exact origins, or "*" for any

    def allows(self, origin: str | None) -> bool:
        """Whether a page at ``origin`` may use this key."""
        return "*" in self.origins or (origin is not None and origin in self.origins)

    def __repr__(self) -> str:
        return f"PublishableKey({self.key[:6]}…, origins={self.origins})"


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start."""

    rules: Path = Path("rules")
    data_dir: Path = Path("data")
    database: Path | None = None  # default: <data_dir>/tagrelay.db
    bind: str = DEFAULT_BIND
    metrics_bind: str | None = None  # where `tagrelay worker` serves /metrics; None: nowhere
    workers: int = 2
    threads: int = 4  # gunicorn gthread threads per worker
    read_timeout: int = 10  # seconds one read of a request may wait for the client (408)
    server_keys: tuple[ServerKey, ...] = ()
    sqlite_sync: str = "normal"
    max_body_bytes: int = 1_048_576
    max_batch_events: int = 100
    signature_window: float = 300.0
    reload_interval: float = 2.0
    log_level: str = "INFO"
    deliver: bool = True
    publishable_keys: tuple[PublishableKey, ...] = ()
    cookie_name: str = "tr_vid"
    cookie_max_age: int = 365 * 86400
    cookie_domain: str | None = None
    cookie_secure: bool = True
    # Set: a /v1/collect event's user_id must come with its user_hash (engine.collect).
    identity_secret: str | None = field(default=None, repr=False)
    trusted_proxies: int = 0  # how many proxies in front set X-Forwarded-For
    rate_limit: int = 1000  # requests per minute per key; 0 turns it off
    ip_storage: str = "consent"  # consent | truncate | drop | keep
    click_id_window: float = 30 * 86400.0
    # Page URL query and fragment fields redacted at intake whatever they hold (engine.urlprivacy).
    redact_query_params: frozenset[str] = frozenset()
    retention_days: int = 395  # events and identities older than this are purged; 0: never
    min_free_mb: int = 64  # intake refused (503) below this much free disk at the store; 0: off
    extra: Mapping[str, Any] = field(default_factory=dict)
    # How each setting that was given was named (config key -> "--data-dir", ...), for messages.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def database_path(self) -> Path:
        """Where the SQLite store lives."""
        return self.database or self.data_dir / "tagrelay.db"

    def name_of(self, key: str) -> str:
        """How the setting ``key`` (its config-file key) was given, for messages.

        ``--data-dir``, ``TAGRELAY_DATA_DIR`` or ``FILE: data_dir``; a setting left at its
        default is named by its environment variable.
        """
        return self.sources.get(key, f"TAGRELAY_{key.upper()}")


# -- reading one value ------------------------------------------------------------------------
#
# A parser takes a value as given (text from the environment or a flag; any YAML value from the
# file) and returns it typed, or raises ValueError saying what is allowed ("must be ...").

Parser = Callable[[Any], Any]
_WHOLE = re.compile(r"[+-]?[0-9]{1,30}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]*)?|\.[0-9]+)")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 6265 token
_PARAM_NAME = re.compile(r"[^=&#?\s]+")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _whole(minimum: int, maximum: int | None = None) -> Parser:
    allowed = (
        f"must be a whole number from {minimum} to {maximum}"
        if maximum is not None
        else f"must be a whole number, at least {minimum}"
    )

    def parse(value: Any) -> int:
        if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(allowed)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(allowed)
        return value

    return parse


def _days_in_seconds(value: Any) -> float:
    allowed = f"must be a number of days from 0 to {MAX_DAYS}"
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(allowed)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(allowed)
    if not 0 <= value <= MAX_DAYS:
        raise ValueError(allowed)
    return float(value) * 86400


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be true or false (or 1/0, yes/no, on/off)")


def _choice(*allowed: str) -> Parser:
    message = "must be one of " + ", ".join(a.lower() for a in allowed)

    def parse(value: Any) -> str:
        if isinstance(value, str):
            for choice in allowed:
                if value.strip().lower() == choice.lower():
                    return choice
        raise ValueError(message)

    return parse


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a path")
    return Path(value)


def _optional_path(value: Any) -> Path | None:
    return None if value is None or value == "" else _path(value)


def _optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("must be text")
    return value.strip()


def _identity_secret(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value.strip()) < MIN_SECRET:
        raise ValueError(f"must be a secret of at least {MIN_SECRET} characters")
    return value.strip()


def _query_params(value: Any) -> frozenset[str]:
    """``a,b`` or a YAML list -> the names, in lower case (a URL's field names are compared so)."""
    if value is None:
        return frozenset()
    entries = value.split(",") if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ValueError("must be query parameter names: name1,name2 or a list of names")
    names = frozenset(e.strip().lower() for e in entries if e.strip())
    if bad := sorted(n for n in names if not _PARAM_NAME.fullmatch(n)):
        raise ValueError(
            f"must be query parameter names, without '=', '&', '#', '?' or spaces ({bad[0]!r})"
        )
    return names


def _cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not _COOKIE_NAME.fullmatch(value):
        raise ValueError("must be a cookie name: letters, digits and !#$%&'*+-.^_`|~")
    return value


def _bind(value: Any) -> str:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:PATH``; a missing port is 8080."""
    allowed = (
        "must be HOST:PORT with a port from 1 to 65535 (8080 when left out), "
        "[IPv6 address]:PORT, or unix:PATH"
    )
    text = value.strip() if isinstance(value, str) else ""
    if text.startswith("unix:"):
        if not text[len("unix:") :].strip("/"):
            raise ValueError(allowed)
        return text
    if match := re.fullmatch(r"(\[[0-9A-Za-z:.%]+\])(?::(.*))?", text):
        host, port = match.group(1), match.group(2)
    elif text.count(":") > 1:
        raise ValueError(allowed + " (an IPv6 address goes in brackets: [::1]:8080)")
    else:
        host, sep, given = text.partition(":")
        port = given if sep else None
        if not host or re.search(r"[\s/\[\]]", host):
            raise ValueError(allowed)
    if port is None:
        return f"{host}:{DEFAULT_PORT}"
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(allowed)
    return f"{host}:{int(port)}"


def _optional_tcp_bind(value: Any) -> str | None:
    """None when empty, else ``HOST:PORT`` or ``[IPv6]:PORT`` (no unix socket)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    allowed = "must be HOST:PORT or [IPv6 address]:PORT"
    bound = _bind(value)
    if bound.startswith("unix:"):
        raise ValueError(f"{allowed} (not a unix socket)")
    if not str(value).strip().endswith(bound.rpartition(":")[2]):
        raise ValueError(f"{allowed}, with its port (8080 is the server's own)")
    return bound


def parse_keys(raw: str) -> tuple[ServerKey, ...]:
    """``key1,key2:signing-secret`` -> server keys (a ``:secret`` makes signing required).

    Raises:
        ValueError: an entry with a secret but no key.
    """
    keys = []
    for entry in raw.split(","):
        if not entry.strip():
            continue
        key, _, secret = entry.strip().partition(":")
        if not key.strip():
            raise ValueError("has an entry with no key before its ':signing-secret'")
        keys.append(ServerKey(key.strip(), secret.strip() or None))
    return tuple(keys)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def page_origin(value: str) -> str:
    """An allowed origin as browsers send it in ``Origin``: ``https://shop.example:8443``.

    The scheme and host lower case, a default port left out, a trailing ``/`` dropped, so that
    ``https://Shop.Example:443/`` matches the ``https://shop.example`` a page sends; ``*``
    (any page) as it is.

    Raises:
        ValueError: not an origin: no scheme or host, a path or query, or a wildcard other than
            ``*`` alone (``https://*.shop.example`` would never match a page).
    """
    text = value.strip().rstrip("/")
    if text == "*":
        return text
    example = "write scheme://host[:port] such as https://shop.example, or * for any page"
    if "*" in text:
        raise ValueError(f"has an origin with a wildcard, {text!r}: list each origin ({example})")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or not parts.scheme
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        raise ValueError(f"has an origin that is not one, {text!r}: {example}")
    scheme, host = parts.scheme.lower(), parts.hostname
    if not host.isascii():  # browsers send an internationalized host in its ASCII form
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"has an origin that is not one, {text!r}: {example}") from None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_publishable(raw: str) -> tuple[PublishableKey, ...]:
    """``pk_1=https://a.example|https://b.example,pk_2=*`` -> publishable keys.

    Raises:
        ValueError: an entry with no key, or a key with no origins.
    """
    keys = []
    for entry in raw.split(","):
        if not entry.strip():
            continue
        key, _, origins = entry.strip().partition("=")
        allowed = tuple(page_origin(o) for o in origins.split("|") if o.strip())
        if not key.strip():
            raise ValueError("has an entry with no key before its '=origins'")
        if not allowed:
            raise ValueError(
                "has a key with no origins: write key=https://shop.example|https://other.example"
                " (or key=* for any page)"
            )
        keys.append(PublishableKey(key.strip(), allowed))
    return tuple(keys)


_YAML_NUMBERS = "quote it in the file: YAML reads unquoted digits as a number"


def _text_in(entry: Mapping[str, Any], name: str, where: str, required: bool) -> str | None:
    value = entry.get(name)
    if value is None and not required:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be text; {_YAML_NUMBERS}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} needs a {name} (text)")
    return value.strip()


def _entries(
    value: Any, fields: tuple[str, ...], example: str, secret: bool = False
) -> list[tuple[str, Any]]:
    """A list of keys from the file: each entry with where it is, for messages.

    With ``secret`` (server keys), an unknown field is quoted only when it is a misspelt field
    (``signing-secret``): ``- sk_1: whsec_...``, the environment's ``key:secret`` written as
    YAML, makes the key itself the field's name, and this message reaches the server's log.
    """
    if not isinstance(value, list):
        raise ValueError(f"must be a list of entries such as {example}, or comma-separated text")
    entries = []
    for number, entry in enumerate(value, 1):
        where = f"entry {number}"
        if isinstance(entry, dict):
            unknown = sorted(str(k) for k in entry if k not in fields)
            if unknown:
                name = unknown[0]
                if secret and not difflib.get_close_matches(name, fields, n=1, cutoff=0.6):
                    raise ValueError(
                        f"{where} has a field that is not {' or '.join(fields)} (its name not "
                        f"shown: it may be a key); write {example}"
                    )
                raise ValueError(
                    f"{where} has an unknown field {name!r} (known: {', '.join(fields)})"
                )
        entries.append((where, entry))
    return entries


def _server_keys(value: Any) -> tuple[ServerKey, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return parse_keys(value)
    keys = []
    fields = ("key", "signing_secret")
    for where, entry in _entries(value, fields, "{key: ..., signing_secret: ...}", secret=True):
        if isinstance(entry, dict):
            key = _text_in(entry, "key", where, required=True)
            assert key is not None  # required
            keys.append(ServerKey(key, _text_in(entry, "signing_secret", where, required=False)))
        elif isinstance(entry, str) and entry.strip():
            keys.append(ServerKey(entry.strip()))
        elif isinstance(entry, int | float) and not isinstance(entry, bool):
            raise ValueError(f"{where} must be text; {_YAML_NUMBERS}")
        else:
            raise ValueError(f"{where} must be a key (text) or {{key: ..., signing_secret: ...}}")
    return tuple(keys)


def _publishable_keys(value: Any) -> tuple[PublishableKey, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return parse_publishable(value)
    keys = []
    example = "{key: pk_1, origins: [https://shop.example]}"
    for where, entry in _entries(value, ("key", "origins"), example):
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be {example}")
        key = _text_in(entry, "key", where, required=True)
        assert key is not None  # required
        origins = entry.get("origins")
        if isinstance(origins, str):
            origins = [origins]
        if (
            not isinstance(origins, list)
            or not origins
            or not all(isinstance(o, str) and o.strip() for o in origins)
        ):
            raise ValueError(f"{where} needs origins: a list of page origins, or ['*'] for any")
        try:
            allowed = tuple(page_origin(o) for o in origins)
        except ValueError as exc:
            raise ValueError(f"{where} {exc}") from None
        keys.append(PublishableKey(key, allowed))
    return tuple(keys)


_LOG_LEVEL = _choice(*LOG_LEVELS)


def _log_level(value: Any) -> str:
    # Python's logging reads WARN as WARNING; so did tagrelay before its settings were checked.
    if isinstance(value, str) and value.strip().upper() == "WARN":
        return "WARNING"
    return str(_LOG_LEVEL(value))


# config key -> (Settings field, parser, whether its value may be quoted in an error)
_SETTINGS: dict[str, tuple[str, Parser, bool]] = {
    "rules": ("rules", _path, True),
    "data_dir": ("data_dir", _path, True),
    "db": ("database", _optional_path, True),
    "bind": ("bind", _bind, True),
    "metrics_bind": ("metrics_bind", _optional_tcp_bind, True),
    "workers": ("workers", _whole(1), True),
    "threads": ("threads", _whole(1), True),
    "read_timeout": ("read_timeout", _whole(1, 3600), True),
    "server_keys": ("server_keys", _server_keys, False),
    "sqlite_sync": ("sqlite_sync", _choice("normal", "full"), True),
    "deliver": ("deliver", _boolean, True),
    "log_level": ("log_level", _log_level, True),
    "publishable_keys": ("publishable_keys", _publishable_keys, False),
    "rate_limit": ("rate_limit", _whole(0), True),
    "trusted_proxies": ("trusted_proxies", _whole(0), True),
    "ip_storage": ("ip_storage", _choice("consent", "truncate", "drop", "keep"), True),
    "retention_days": ("retention_days", _whole(0, MAX_DAYS), True),
    "min_free_mb": ("min_free_mb", _whole(0), True),
    "click_id_window_days": ("click_id_window", _days_in_seconds, True),
    "redact_query_params": ("redact_query_params", _query_params, True),
    "cookie_name": ("cookie_name", _cookie_name, True),
    "cookie_max_age": ("cookie_max_age", _whole(1, MAX_COOKIE_AGE), True),
    "cookie_domain": ("cookie_domain", _optional_text, True),
    "cookie_secure": ("cookie_secure", _boolean, True),
    "identity_secret": ("identity_secret", _identity_secret, False),
}
KNOWN_KEYS = tuple(_SETTINGS)
_ALIASES = {"database": "db"}  # the name the store's file had before `db`; still read


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|'.*|\".*")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what the YAML error is, without the snippet of the file PyYAML's own message
    quotes: the file holds server keys and signing secrets, and this message reaches logs."""
    if isinstance(exc, yaml.MarkedYAMLError):
        from engine.rules.source import plain_syntax_words, syntax_mark  # (rules import config)

        mark = syntax_mark(exc)
        if mark is not None and (words := plain_syntax_words(exc)) is not None:
            return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {words}"
        # PyYAML's context and problem are phrases ("while scanning a quoted scalar") that
        # may quote a token of the file in quotes: a tag, an alias or an anchor, which is what
        # an unquoted secret starting with "!", "*" or "&" reads as. Those are cut out.
        told = [
            f"{_QUOTED.sub('...', what)} (line {mark.line + 1}, column {mark.column + 1})"
            for what, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark))
            if what and mark
        ]
        return "YAML syntax error: " + (": ".join(told) or "not valid YAML")
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        code = f"U+{char:04X}" if isinstance(char, int) else "a byte"
        return f"YAML does not allow the character {code} (at character {exc.position + 1})"
    return f"not valid YAML ({type(exc).__name__})"


def _read_file(path: str, strict: bool = True) -> dict[str, Any]:
    """The settings of the file at ``path``; an unknown key is an error when ``strict``, else
    left out (a command that reads one setting must not fail on a typo in another)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read TAGRELAY_CONFIG {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read TAGRELAY_CONFIG {path}: {_yaml_problem(exc)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value)")
    values: dict[str, Any] = {}
    for raw_key, value in loaded.items():
        key = _ALIASES.get(str(raw_key), str(raw_key))
        if key not in _SETTINGS:
            if not strict:
                continue
            close = difflib.get_close_matches(str(raw_key), KNOWN_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{path}: unknown setting {str(raw_key)!r} ({hint}known: {', '.join(KNOWN_KEYS)})"
            )
        if key in values:
            raise ConfigError(f"{path}: db and database are the same setting; keep db")
        values[key] = value
    return values


def load_settings(
    env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from flags, ``TAGRELAY_*`` environment variables and ``TAGRELAY_CONFIG`` (YAML).

    Args:
        env: the environment; ``os.environ`` when omitted.
        flags: command-line values by config key (``{"workers": "3"}``); None values are
            flags that were not given.

    Raises:
        ConfigError: a file that cannot be read, an unknown key in it, or a value that is not
            allowed; the message names the setting and says what is allowed.
    """
    env = os.environ if env is None else env
    given: dict[str, tuple[Any, str]] = {}  # config key -> (value, how it was named)
    config_file = env.get("TAGRELAY_CONFIG")
    if config_file:
        for key, value in _read_file(config_file).items():
            given[key] = (value, f"{config_file}: {key}")
    for alias, key in _ALIASES.items():  # the alias first, so that the documented name wins
        if f"TAGRELAY_{alias.upper()}" in env:
            given[key] = (env[f"TAGRELAY_{alias.upper()}"], f"TAGRELAY_{alias.upper()}")
    for key in _SETTINGS:
        if f"TAGRELAY_{key.upper()}" in env:
            given[key] = (env[f"TAGRELAY_{key.upper()}"], f"TAGRELAY_{key.upper()}")
    for key, value in (flags or {}).items():
        if value is not None:
            given[key] = (value, "--" + key.replace("_", "-"))
    fields = {
        _SETTINGS[key][0]: _parse(key, value, source) for key, (value, source) in given.items()
    }
    return Settings(**fields, sources={key: source for key, (_, source) in given.items()})


def _parse(key: str, value: Any, source: str) -> Any:
    """``value`` of setting ``key`` as Settings holds it; ConfigError naming ``source``."""
    _, parse, quotable = _SETTINGS[key]
    try:
        return parse(value)
    except ValueError as exc:
        shown = f", not {_shown(value)}" if quotable else ""
        raise ConfigError(f"{source} {exc}{shown}") from None


def load_setting(key: str, env: Mapping[str, str] | None = None) -> Any:
    """One setting from ``TAGRELAY_<KEY>``, else ``TAGRELAY_CONFIG``, else its default.

    For commands that need one server setting (``tagrelay test`` reads the IP policy) and must
    not fail on the others.

    Raises:
        ConfigError: as :func:`load_settings`, for this setting (or an unreadable file).
    """
    env = os.environ if env is None else env
    variable, config_file = f"TAGRELAY_{key.upper()}", env.get("TAGRELAY_CONFIG")
    if variable in env:
        return _parse(key, env[variable], variable)
    if config_file and key in (values := _read_file(config_file, strict=False)):
        return _parse(key, values[key], f"{config_file}: {key}")
    return getattr(Settings, _SETTINGS[key][0])


# -- the data directory -----------------------------------------------------------------------

_STORE_SUFFIXES = ("", "-wal", "-shm", "-journal", "-writer")
CONTROL_SOCKET = re.compile(r"gunicorn(-\d+){0,2}\.ctl")
"""serve's control sockets, one per master (see engine.server.control_socket); gunicorn.ctl
is the single one of versions before."""


def _ours(directory: Path, database: Path) -> bool:
    """Whether ``directory`` holds nothing but what tagrelay puts in a data directory."""
    names = {KEY_FILE, "metrics"}
    names |= {"tagrelay.db" + s for s in _STORE_SUFFIXES}
    names |= {database.name + s for s in _STORE_SUFFIXES}
    try:
        return all(
            entry.name in names or CONTROL_SOCKET.fullmatch(entry.name)
            for entry in directory.iterdir()
        )
    except OSError:
        return False


def private_dir(path: Path, setting: str, database: Path | None = None) -> str | None:
    """Create ``path`` (mode 0700) or tighten it: it holds the store, which has personal data.

    A directory that exists keeps its mode, less any access for group and others, when it is
    the user's own and holds only tagrelay's files; a mode is never loosened. Anything else
    (a shared directory such as ``/tmp``, or one with other files) is left as it is.

    Returns:
        a line for the operator when the directory stays readable by others, or was tightened;
        None otherwise.

    Raises:
        ConfigError: ``path`` is not a directory or cannot be created.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{setting} {path} is not a directory")
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)  # mkdir's mode is filtered through the umask
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot create {path}: {exc.strerror}") from exc
        return None
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return None
    shared = mode & stat.S_ISVTX or info.st_uid != os.geteuid()
    if not shared and _ours(path, database or path / "tagrelay.db"):
        try:
            path.chmod(mode & ~0o077)
        except OSError:
            pass
        else:
            return f"{path} made private (mode {mode & ~0o077:04o}, was {mode:04o})"
    return (
        f"warning: {path} ({setting}) is open to other users (mode {mode:04o}) and holds "
        "personal data; give tagrelay a directory of its own"
    )


def prepare_data_dir(settings: Settings) -> list[str]:
    """Create the data directory, and the store's when ``db`` is elsewhere, privately.

    Returns:
        lines for the operator (see :func:`private_dir`).

    Raises:
        ConfigError: a directory that is not one or cannot be created, naming its setting.
    """
    notes = [private_dir(settings.data_dir, settings.name_of("data_dir"), settings.database)]
    parent = settings.database_path.parent
    if settings.database is not None and not parent.exists():
        notes.append(private_dir(parent, settings.name_of("db")))
    return [note for note in notes if note]


def ensure_server_key(settings: Settings) -> tuple[Settings, str | None]:
    """Settings with at least one server key; generates and keeps one in the data directory.

    Returns:
        the settings, and the key when it was generated by this call (so that ``tagrelay
        serve`` prints it once); None when keys were configured or the key was generated
        before (it is then read from ``<data dir>/server_key``).
    """
    if settings.server_keys:
        return settings, None
    path = settings.data_dir / KEY_FILE
    private_dir(settings.data_dir, settings.name_of("data_dir"), settings.database)
    generated = None
    try:
        if path.exists():
            key = path.read_text().strip()
        else:
            # Written whole beside it, then linked into place, which fails if the file exists:
            # another process starting at the same moment (or a crash mid-write) never leaves
            # it empty or half written for the other to read.
            new = "sk_" + secrets.token_urlsafe(32)
            draft = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
            try:
                fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(new + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(draft, path)
                key = generated = new
            except FileExistsError:
                key = path.read_text().strip()
            finally:
                draft.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot keep the generated server key in {path}: {exc}") from exc
    if not key:
        raise ConfigError(f"{path} is empty; delete it to generate a new key")
    return replace(settings, server_keys=(ServerKey(key),)), generated
