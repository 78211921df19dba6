"""Server settings: from the environment (``TAGRELAY_*``), an optional YAML file, and the CLI.

Precedence, highest first: command-line flags, environment variables, the file named by
``TAGRELAY_CONFIG``, defaults. Secrets (server keys, signing secrets) are never printed whole.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError

DEFAULT_BIND = "127.0.0.1:8080"
KEY_FILE = "server_key"


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


MAX_COOKIE_AGE = 400 * 86400  # browsers cap cookie lifetimes at 400 days


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start."""

    rules: Path = Path("rules")
    data_dir: Path = Path("data")
    database: Path | None = None  # default: <data_dir>/tagrelay.db
    bind: str = DEFAULT_BIND
    workers: int = 2
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
    trusted_proxies: int = 0  # how many proxies in front set X-Forwarded-For
    rate_limit: int = 1000  # requests per minute per key; 0 turns it off
    ip_storage: str = "consent"  # consent | truncate | drop | keep
    click_id_window: float = 30 * 86400.0
    retention_days: int = 395  # events and identities older than this are purged; 0: never
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def database_path(self) -> Path:
        """Where the SQLite store lives."""
        return self.database or self.data_dir / "tagrelay.db"

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given (non-None) fields replaced."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def parse_keys(raw: str) -> tuple[ServerKey, ...]:
    """``key1,key2:signing-secret`` -> server keys (a ``:secret`` makes signing required)."""
    keys = []
    for entry in raw.split(","):
        if not entry.strip():
            continue
        key, _, secret = entry.strip().partition(":")
        keys.append(ServerKey(key.strip(), secret.strip() or None))
    return tuple(keys)


def parse_publishable(raw: str) -> tuple[PublishableKey, ...]:
    """``pk_1=https://a.example|https://b.example,pk_2=*`` -> publishable keys."""
    keys = []
    for entry in raw.split(","):
        key, _, origins = entry.strip().partition("=")
        if key.strip():
            allowed = tuple(o.strip().rstrip("/") for o in origins.split("|") if o.strip())
            keys.append(PublishableKey(key.strip(), allowed))
    return tuple(keys)


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``TAGRELAY_CONFIG`` (YAML) and ``TAGRELAY_*`` environment variables.

    Raises:
        ConfigError: a file or value that cannot be read, with what is wrong.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = env.get("TAGRELAY_CONFIG")
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read TAGRELAY_CONFIG {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of settings")
        values.update(loaded)
    for name in (
        "rules",
        "data_dir",
        "database",
        "bind",
        "workers",
        "sqlite_sync",
        "log_level",
        "server_keys",
        "deliver",
        "publishable_keys",
        "cookie_name",
        "cookie_max_age",
        "cookie_domain",
        "cookie_secure",
        "trusted_proxies",
        "rate_limit",
        "ip_storage",
        "click_id_window_days",
        "retention_days",
    ):
        if f"TAGRELAY_{name.upper()}" in env:
            values[name] = env[f"TAGRELAY_{name.upper()}"]
    if "TAGRELAY_DB" in env:
        values["database"] = env["TAGRELAY_DB"]
    try:
        return _build(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc


def _build(values: Mapping[str, Any]) -> Settings:
    s = Settings()
    keys = values.get("server_keys")
    if isinstance(keys, str):
        server_keys = parse_keys(keys)
    elif isinstance(keys, list):
        server_keys = tuple(
            ServerKey(str(k["key"]), k.get("signing_secret"))
            if isinstance(k, dict)
            else ServerKey(str(k))
            for k in keys
        )
    else:
        server_keys = ()
    sync = str(values.get("sqlite_sync", s.sqlite_sync)).lower()
    if sync not in ("normal", "full"):
        raise ValueError("sqlite_sync must be normal or full")
    workers = int(values.get("workers", s.workers))
    if workers < 1:
        raise ValueError("workers must be at least 1")
    deliver = values.get("deliver", s.deliver)
    pks = values.get("publishable_keys")
    if isinstance(pks, str):
        publishable = parse_publishable(pks)
    elif isinstance(pks, list):
        publishable = tuple(
            PublishableKey(str(k["key"]), tuple(str(o).rstrip("/") for o in k.get("origins", [])))
            for k in pks
        )
    else:
        publishable = ()
    max_age = int(values.get("cookie_max_age", s.cookie_max_age))
    if not 0 < max_age <= MAX_COOKIE_AGE:
        raise ValueError(f"cookie_max_age must be 1 to {MAX_COOKIE_AGE} seconds (400 days)")
    ip_storage = str(values.get("ip_storage", s.ip_storage)).lower()
    if ip_storage not in ("consent", "truncate", "drop", "keep"):
        raise ValueError("ip_storage must be consent, truncate, drop or keep")
    secure = values.get("cookie_secure", s.cookie_secure)
    window_days = float(values.get("click_id_window_days", s.click_id_window / 86400))
    return Settings(
        rules=Path(str(values.get("rules", s.rules))),
        data_dir=Path(str(values.get("data_dir", s.data_dir))),
        database=Path(str(values["database"])) if values.get("database") else None,
        bind=str(values.get("bind", s.bind)),
        workers=workers,
        server_keys=server_keys,
        sqlite_sync=sync,
        log_level=str(values.get("log_level", s.log_level)).upper(),
        deliver=_bool(deliver) if isinstance(deliver, str) else bool(deliver),
        publishable_keys=publishable,
        cookie_name=str(values.get("cookie_name", s.cookie_name)),
        cookie_max_age=max_age,
        cookie_domain=str(values["cookie_domain"]) if values.get("cookie_domain") else None,
        cookie_secure=_bool(secure) if isinstance(secure, str) else bool(secure),
        trusted_proxies=int(values.get("trusted_proxies", s.trusted_proxies)),
        rate_limit=int(values.get("rate_limit", s.rate_limit)),
        ip_storage=ip_storage,
        click_id_window=window_days * 86400,
        retention_days=int(values.get("retention_days", s.retention_days)),
    )


def ensure_server_key(settings: Settings) -> tuple[Settings, str | None]:
    """Settings with at least one server key; generates and keeps one in the data directory.

    Returns:
        the settings, and the generated (or previously generated) key when no key was
        configured, so that ``tagrelay serve`` can print it; None when keys were configured.
    """
    if settings.server_keys:
        return settings, None
    path = settings.data_dir / KEY_FILE
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_text().strip()
        else:
            key = "sk_" + secrets.token_urlsafe(32)
            with os.fdopen(fd, "w") as fh:
                fh.write(key + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot keep the generated server key in {path}: {exc}") from exc
    if not key:
        raise ConfigError(f"{path} is empty; delete it to generate a new key")
    return replace(settings, server_keys=(ServerKey(key),)), key
