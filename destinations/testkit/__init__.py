"""Test a destination plugin without the internet, with real HTTP on loopback.

- :mod:`destinations.testkit.server`: ``LoopbackServer``, a real HTTP server on 127.0.0.1 that
  answers what a handler returns (``Reply.json(...)``, ``Reply.text(...)``) and records every
  ``Request`` it received; ``Emulator``, a base for an emulator of a platform (the server, the
  context manager, faults queued for the next requests).
- :mod:`destinations.testkit.sink`: ``FaultySink``, a receiver that fails, throttles or stalls
  on demand.
- :mod:`destinations.testkit.meta`, ``ga4``, ``google_ads``, ``tiktok``: emulators that check
  requests the way each platform documents them and answer like it, errors included.
"""
