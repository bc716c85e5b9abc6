"""Where a worker's records go: the ring, and (without gunicorn hooks) a shipper to drain it.

Under the gunicorn hooks the arbiter has created the ring and exported its path in
MOESIF_FAST_RING before forking; the worker attaches to it on its first event. Without the
hooks (runserver, uWSGI, tests) the worker opens the deployment's ring itself (the same path
every process of the deployment derives, see `ringfile`) and, when the ring's reader heartbeat
is stale, starts a detached `python -m moesif_fast ship --idle-exit ...` for it (its log goes
to `<ring>.shipper.log`); the reader lock makes sure only one of those started by racing
workers keeps running. Such a shipper removes the ring when no worker has been alive for its
idle time; a worker that attached to it in that instant sees, at its next check, that the path
names another file (or none) and attaches again (its warning says so: what it appended to the
removed ring meanwhile is lost). With MOESIF_FAST_SHIPPER=external in the environment, the
server runs the shipper itself (uWSGI's attach-daemon2, a sidecar) and workers start none.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import private, ringfile
from .policy import Policy
from .ringbuffer import Producer, RingError, RingFile
from .settings import MoesifOptions
from .snapshot import PolicySource

logger = logging.getLogger("moesif_fast")

SHIPPER_CHECK_INTERVAL = 2.0  # seconds between checks of the reader heartbeat (fallback mode)
SHIPPER_STALE_AFTER_NS = 5_000_000_000  # a heartbeat older than this means no shipper
SHIPPER_IDLE_EXIT = 60  # seconds a fallback shipper waits with nothing to do before exiting
ATTACH_RETRY_INTERVAL = 5.0  # seconds between attempts when the ring cannot be attached
SHIPPER_ENV = "MOESIF_FAST_SHIPPER"  # "external": the server runs the shipper (uWSGI
# attach-daemon2, a sidecar), so workers never start a fallback shipper


_producers: dict[str, Producer] = {}
_producers_lock = threading.Lock()


def _producer_for(path: str, open_ring: Callable[[], RingFile]) -> Producer:
    with _producers_lock:
        if path not in _producers:
            _producers[path] = Producer(open_ring())
        return _producers[path]


def _python() -> str:
    """The interpreter to run a shipper with: sys.executable, except in a server that embeds
    Python (uWSGI), where that is the server's own binary."""
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = os.path.join(sys.prefix, "bin", version)
    return candidate if os.access(candidate, os.X_OK) else version


def _identity(path: str) -> tuple[int, int] | None:
    """Which file `path` names now (None: none)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class EventSink:
    """The worker's handle on the ring. Attaches lazily, so that it can be created in a
    gunicorn arbiter (--preload) and used in the forked workers."""

    def __init__(self, options: MoesifOptions) -> None:
        self._options = options
        self._producer: Producer | None = None
        self._attach_lock = threading.Lock()
        self._retry_attach_at = 0.0
        self._fallback_settings: str | None = None  # set in fallback mode
        self._ring_identity: tuple[int, int] | None = None  # (st_dev, st_ino), fallback mode
        self._next_shipper_check = 0.0
        self._started_shipper: subprocess.Popen[bytes] | None = None
        self._policy_source: PolicySource | None = None
        self.max_record = 0
        """The largest record the ring takes (0 until a ring is attached, which `policy()`
        and `append()` do)."""

    def policy(self) -> Policy:
        """The sampling and governance policy the shipper published for this ring (the
        defaults until it has, or while no ring is attached). Once a ring is attached, the
        snapshot's `PolicySource.current` replaces this method: a request runs no frame here."""
        if self._policy_source is None:
            producer = self._producer or self._attach()
            if producer is None:
                return Policy.DEFAULT
            self._policy_source = PolicySource(ringfile.policy_snapshot_path(producer.ring.path))
            self.policy = self._policy_source.current  # type: ignore[method-assign]
        return self._policy_source.current()

    def append(self, payload: bytes) -> bool:
        """Append one record; False when it was dropped (counted by the ring, or, with no ring
        attached, logged by _attach). Once a ring is attached, outside fallback mode (no
        shipper to watch), the producer's append replaces this method."""
        producer = self._producer or self._attach()
        if producer is None:
            return False  # no ring: _attach logged why, and retries every few seconds
        written = producer.append(payload)
        if self._fallback_settings and time.monotonic() >= self._next_shipper_check:
            self._ensure_shipper(producer.ring)
        return written

    def _attach(self) -> Producer | None:
        """Attach on first use. Threads arriving meanwhile (gthread workers) wait for it;
        after a failure, attaching is retried every ATTACH_RETRY_INTERVAL seconds."""
        with self._attach_lock:
            if self._producer is not None or time.monotonic() < self._retry_attach_at:
                return self._producer
            try:
                self._producer = self._shared_producer()
                self.max_record = self._producer.ring.geometry.max_record
                if not self._fallback_settings:
                    self.append = self._producer.append  # type: ignore[method-assign]
            except (OSError, RingError) as error:
                self._retry_attach_at = time.monotonic() + ATTACH_RETRY_INTERVAL
                logger.error("moesif_fast: cannot attach to the event ring (%s); events are "
                             "dropped until it can be attached", error)
            return self._producer

    def _shared_producer(self) -> Producer:
        """This process's producer for the deployment's ring: one per ring path, shared by
        every middleware instance, so a process holds one lane however many it builds."""
        path = os.environ.get(ringfile.RING_ENV)
        if path:
            return _producer_for(path, lambda: RingFile.attach(path))
        settings_module = os.environ.get("DJANGO_SETTINGS_MODULE")
        if not settings_module:
            raise RingError("no gunicorn hooks (MOESIF_FAST_RING) and no DJANGO_SETTINGS_MODULE "
                            "for a fallback shipper to load")
        geometry = ringfile.geometry(self._options, ringfile.FALLBACK_PRODUCERS)
        path = ringfile.ring_path(self._options, settings_module, geometry,
                                  ringfile.server_name())
        if os.environ.get(SHIPPER_ENV) != "external":
            self._fallback_settings = settings_module
        producer = _producer_for(path, lambda: ringfile.open_ring(path, geometry))
        self._ring_identity = _identity(path)
        return producer

    def _ensure_shipper(self, ring: RingFile) -> None:
        """Fallback mode: start a shipper if the ring's reader heartbeat is stale."""
        self._next_shipper_check = time.monotonic() + SHIPPER_CHECK_INTERVAL
        if _identity(ring.path) != self._ring_identity:
            logger.warning("moesif_fast: the event ring %s was removed by an idle shipper as "
                           "this process attached to it; attaching again (events of the last "
                           "%.0f s may be lost)", ring.path, SHIPPER_CHECK_INTERVAL)
            with _producers_lock:
                producer = _producers.pop(ring.path, None)
            if producer is not None:
                producer.close()
            self._producer = None  # the policy source stays: the ring's path is the same
            return
        if self._started_shipper is not None and self._started_shipper.poll() is None:
            return
        if time.time_ns() - ring.reader_heartbeat_ns < SHIPPER_STALE_AFTER_NS:
            return
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        command = [_python(), "-m", "moesif_fast", "ship", "--ring", ring.path,
                   "--settings", self._fallback_settings or "",
                   "--idle-exit", str(SHIPPER_IDLE_EXIT)]
        try:
            log = private.open_file(ringfile.shipper_log_path(ring.path),  # not the app's
                                    os.O_WRONLY | os.O_APPEND, create=True)  # pipes: a caller
            try:  # may be reading those
                self._started_shipper = subprocess.Popen(
                    command, env=environment, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
            finally:
                os.close(log)
        except OSError as error:
            logger.error("moesif_fast: cannot start a shipper (%s): %s", error, command)
            return
        # Give the new shipper time to heartbeat before the next staleness check.
        self._next_shipper_check = time.monotonic() + SHIPPER_STALE_AFTER_NS / 1e9
