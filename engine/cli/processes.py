"""The long-running commands, ``serve`` and ``worker``, and the directories they prepare."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from engine import __version__
from engine.cli.common import command_settings, err, load_container, open_store, out
from engine.config import Settings, ensure_server_key, prepare_data_dir
from engine.errors import ConfigError

# The per-instance metrics directory stays locked (a shared flock) while the instance runs; the
# lock file descriptor is inherited by the gunicorn workers, so it is held until all have
# exited. A clean-up removes a directory only if it gets the lock exclusively.
_METRICS_LOCK = ".lock"
_metrics_lock_fd: int | None = None
# Names the directory tagrelay chose itself. gunicorn's upgrade (USR2) re-executes the master
# with this environment, PROMETHEUS_MULTIPROC_DIR included: the new master knows the directory
# by this name as its own, not the operator's, and locks it too.
OWN_METRICS_DIR = "TAGRELAY_OWN_METRICS_DIR"


def _writable_dir(path: Path, name: str) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{name} {path} cannot hold the metrics files: {exc.strerror or exc}"
        ) from exc


def _remove_stale_metrics(root: Path) -> None:
    """Remove the metrics directories of instances that no longer run (nobody holds their lock)."""
    for path in root.iterdir():
        if not path.is_dir():
            continue
        try:
            fd = os.open(path / _METRICS_LOCK, os.O_RDWR)
        except OSError:
            continue  # being created right now, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # an instance that runs (or two, across an upgrade)
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _metrics_dir(settings: Settings) -> None:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a directory where the workers' counts are summed.

    Must run in the master before prometheus_client is imported. A directory set by the
    operator is created if missing and must be writable (metrics written nowhere would fail
    every request after its event was committed). Otherwise each instance gets a fresh
    directory of its own under ``<data dir>/metrics``, so several instances sharing a data
    directory neither wipe nor sum each other's counts; the directories of instances that
    have stopped are removed. A master re-executed by gunicorn's upgrade (USR2) keeps its
    predecessor's directory, and its counts, while that directory is still there.

    Raises:
        ConfigError: the directory cannot be created or written.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    own = os.environ.pop(OWN_METRICS_DIR, None)
    root = settings.data_dir / "metrics"
    if configured and configured != own and not _made_here(Path(configured), root):
        _writable_dir(Path(configured), "PROMETHEUS_MULTIPROC_DIR")
        return
    if configured and _lock_metrics_dir(Path(configured)):
        os.environ[OWN_METRICS_DIR] = configured
        return
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    _writable_dir(root, f"{settings.name_of('data_dir')}: the metrics directory")
    _remove_stale_metrics(root)
    for _ in range(3):
        path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        if _lock_metrics_dir(path, create=True):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[OWN_METRICS_DIR] = str(path)
            return
    raise ConfigError(f"cannot create a metrics directory in {root}")


def _made_here(path: Path, root: Path) -> bool:
    """Whether ``path`` is an instance directory tagrelay made under ``root``, with its lock.

    A master re-executed by USR2 from a version that did not name its directory in
    ``OWN_METRICS_DIR`` is known by the directory itself.
    """
    try:
        return path.parent.resolve() == root.resolve() and (path / _METRICS_LOCK).is_file()
    except OSError:
        return False


def _lock_metrics_dir(path: Path, create: bool = False) -> bool:
    """Take the shared lock of an instance's metrics directory; False if it is gone.

    Another instance's clean-up may take the lock between the open and the flock and remove
    the directory: the lock then holds a file no longer there, and the caller starts again.
    """
    global _metrics_lock_fd
    try:
        fd = os.open(path / _METRICS_LOCK, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        if not create:
            # A master of an earlier version, which locked its directory exclusively, is
            # handing over (USR2): the lock is ours once it leaves; start meanwhile.
            _metrics_lock_fd = fd
            threading.Thread(target=fcntl.flock, args=(fd, fcntl.LOCK_SH), daemon=True).start()
            return True
        fcntl.flock(fd, fcntl.LOCK_SH)  # a clean-up looking at it: done in a moment
    with contextlib.suppress(OSError):
        if os.path.samestat(os.fstat(fd), os.stat(path / _METRICS_LOCK)):
            _metrics_lock_fd = fd
            return True
    os.close(fd)
    return False


def _prepare_data_dir(settings: Settings) -> None:
    for note in prepare_data_dir(settings):
        err(f"tagrelay: {note}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server under gunicorn."""
    settings = command_settings(args)
    _prepare_data_dir(settings)
    _metrics_dir(settings)
    from engine.server import run

    container = load_container(settings.rules)
    if container is None:
        err(f"tagrelay: refusing to start: {settings.rules} has errors (see above)")
        return 1
    configured = bool(settings.server_keys)
    settings, generated = ensure_server_key(settings)
    key_file = settings.data_dir / "server_key"
    if generated:
        out(f"tagrelay: generated a server key (kept in {key_file}): {generated}")
    elif not configured:
        out(f"tagrelay: server key kept in {key_file}")
    delivery = "delivering" if settings.deliver else "delivery off"
    out(
        f"tagrelay {__version__}: serving {settings.rules} on http://{settings.bind} "
        f"({settings.workers} worker{'s' if settings.workers != 1 else ''}, {delivery}, "
        f"store {settings.database_path})"
    )
    if settings.publishable_keys and settings.identity_secret is None:
        err(
            "tagrelay: warning: /v1/collect takes the user_id a page claims unverified; set "
            "TAGRELAY_IDENTITY_SECRET to require your backend's user_hash (README, Browser "
            "collection)"
        )
    sys.stdout.flush()
    run(settings)
    return 0


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def cmd_worker(args: argparse.Namespace) -> int:
    """Deliver the outbox and apply retention without serving HTTP, until SIGTERM or SIGINT
    (SIGHUP: check the rules for changes now)."""
    # Before prometheus_client is imported (engine.delivery imports it): a worker counts in
    # its own process and serves its counts itself. With serve's multiprocess directory (one
    # environment file for both) it wrote its counts there and served serve's back, and
    # scraping both counted everything twice.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from engine import logs
    from engine.delivery import DeliveryWorker
    from engine.maintenance import Maintenance
    from engine.pipeline import RulesHolder, file_times

    settings = command_settings(args)
    _prepare_data_dir(settings)
    logs.configure(settings.log_level)
    mtimes = file_times(settings.rules)  # before compiling, as load_rules
    container = load_container(settings.rules)
    if container is None:  # as serve: the problems are printed, and rules that fail are exit 1
        err(f"tagrelay: refusing to start: {settings.rules} has errors (see above)")
        return 1
    rules = RulesHolder(settings.rules, container, settings.reload_interval, mtimes)
    store = open_store(settings)
    worker = DeliveryWorker(store, lambda: rules.container)
    # Retention runs where the store is used; a `tagrelay worker` running alone purges too.
    maintenance = Maintenance(store, settings.retention_days)
    metrics_server = None
    if settings.metrics_bind:
        from engine import metrics

        try:
            depth = metrics.depth_of_each(store.depth, lambda: rules.container.destinations)
            metrics_server = metrics.serve_metrics(settings.metrics_bind, depth)
        except OSError as exc:
            name = settings.name_of("metrics_bind")
            raise ConfigError(f"{name} {settings.metrics_bind} cannot be bound: {exc}") from exc
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    # SIGHUP (`systemctl reload`, as for serve, whose gunicorn starts its workers again)
    # checks the rules at once. Unhandled, it ended the process on the spot, unlogged, its
    # batches' leases held until they expired.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: rules.maybe_reload())
    try:
        worker.start()
        maintenance.start()
        served = f"; /metrics on {settings.metrics_bind}" if metrics_server else ""
        out(f"tagrelay worker: delivering from {settings.database_path}{served}")
        sys.stdout.flush()
        stop.wait()
    finally:
        worker.stop()
        maintenance.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
