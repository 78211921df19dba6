"""One exception tree for the engine.

::

    TagrelayError
    ├── ConfigError                 settings or environment the server cannot start with
    ├── RulesError                  a rule container that does not check (carries Problems)
    ├── PluginError                 a destination plugin that breaks the plugin contract
    ├── StoreError                  the store cannot be reached or written; retry is safe
    └── RequestError                a client's request is wrong; maps to an HTTP status
        ├── BadRequest              400: malformed JSON, schema violation, bad field
        ├── Unauthorized            401: missing or unknown key, bad signature
        ├── Forbidden               403: key not allowed here
        ├── RequestTimeout          408: the body stopped arriving
        ├── PayloadTooLarge         413
        ├── UnsupportedMediaType    415
        └── TooManyRequests         429 (with Retry-After)

Foreign exceptions are converted once, at the boundary, with ``raise ... from exc``.
"""

from __future__ import annotations


class TagrelayError(Exception):
    """Base of every error tagrelay raises on purpose."""


class ConfigError(TagrelayError):
    """The server's own settings are wrong; it must not start."""


class PluginError(TagrelayError):
    """A destination plugin cannot be loaded or breaks the plugin contract."""


class StoreError(TagrelayError):
    """The store could not be reached or written. Nothing was committed; a retry is safe."""


class DiskLow(StoreError):
    """Intake refused: the store's file system has less free space than its reserve
    (``TAGRELAY_MIN_FREE_MB``). Nothing was written; delivery goes on in the reserve."""


class UnstorablePayload(StoreError):
    """A payload (a plugin's ``build_payload`` result) that JSON cannot carry: nothing of the
    call was written. :meth:`engine.pipeline.Pipeline.accept` then leaves that tag unfired and
    accepts the rest."""


class RulesError(TagrelayError):
    """A rule container that does not pass ``tagrelay check``.

    Attributes:
        problems: every problem found, each with its file, line and column.
    """

    def __init__(self, problems: list[object]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RequestError(TagrelayError):
    """A client's request cannot be accepted. ``status`` is the HTTP status to answer with.

    The message is shown to the client, so it never carries secrets or personal data.
    """

    status = 400
    retry_after: int | None = None


class BadRequest(RequestError):
    """The request is malformed or an event breaks the schema."""

    status = 400


class Unauthorized(RequestError):
    """No valid credentials."""

    status = 401


class Forbidden(RequestError):
    """Valid credentials that may not reach this endpoint."""

    status = 403


class RequestTimeout(RequestError):
    """The client stopped sending the body part-way (the server's read timeout,
    ``TAGRELAY_READ_TIMEOUT``): its answer closes the connection. Nothing was accepted; a retry
    is safe."""

    status = 408


class PayloadTooLarge(RequestError):
    """The body or the batch is over the limit."""

    status = 413


class BodyTooLarge(PayloadTooLarge):
    """The body is over the size limit, refused before it was read or once read up to the
    limit: its answer closes the connection (the rest of the body is not read to find the
    next request behind it)."""


class UnsupportedMediaType(RequestError):
    """The body is not JSON."""

    status = 415


class TooManyRequests(RequestError):
    """Over the rate limit; retry after ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
