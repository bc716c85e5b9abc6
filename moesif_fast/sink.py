"""Where a worker's records go: the ring, and (without gunicorn hooks) a shipper to drain it.

Under the gunicorn hooks the arbiter has created the ring and exported its path in
MOESIF_FAST_RING before forking; the worker attaches to it on its first event. Without the
hooks (runserver, uWSGI, tests) the worker opens the deployment's ring itself (the same path
every process of the deployment derives, see `ringfile`) and, when the ring's reader heartbeat
is stale, starts a detached `python -m moesif_fast ship --idle-exit ...` for it (its log goes
to `<ring>.shipper.log`); the reader lock makes sure only one of those started by racing
workers keeps running.
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


_producers: dict[str, Producer] = {}
_producers_lock = threading.Lock()


def _producer_for(path: str, open_ring: Callable[[], RingFile]) -> Producer:
    with _producers_lock:
        if path not in _producers:
            _producers[path] = Producer(open_ring())
        return _producers[path]


class EventSink:
    """The worker's handle on the ring. Attaches lazily, so that it can be created in a
    gunicorn arbiter (--preload) and used in the forked workers."""

    def __init__(self, options: MoesifOptions) -> None:
        self._options = options
        self._producer: Producer | None = None
        self._attach_lock = threading.Lock()
        self._retry_attach_at = 0.0
        self._fallback_settings: str | None = None  # set in fallback mode
        self._next_shipper_check = 0.0
        self._started_shipper: subprocess.Popen[bytes] | None = None
        self._policy_source: PolicySource | None = None
        self.max_record = 0
        """The largest record the ring takes (0 until a ring is attached, which `policy()`
        and `append()` do)."""

    def policy(self) -> Policy:
        """The sampling and governance policy the shipper published for this ring (the
        defaults until it has, or while no ring is attached)."""
        if self._policy_source is None:
            producer = self._producer or self._attach()
            if producer is None:
                return Policy.DEFAULT
            self._policy_source = PolicySource(ringfile.policy_snapshot_path(producer.ring.path))
        return self._policy_source.current()

    def append(self, payload: bytes) -> bool:
        """Append one record; False when it was dropped (counted by the ring, or, with no ring
        attached, logged by _attach)."""
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
        path = ringfile.ring_path(self._options, settings_module, geometry)
        self._fallback_settings = settings_module
        return _producer_for(path, lambda: ringfile.open_ring(path, geometry))

    def _ensure_shipper(self, ring: RingFile) -> None:
        """Fallback mode: start a shipper if the ring's reader heartbeat is stale."""
        self._next_shipper_check = time.monotonic() + SHIPPER_CHECK_INTERVAL
        if self._started_shipper is not None and self._started_shipper.poll() is None:
            return
        if time.time_ns() - ring.reader_heartbeat_ns < SHIPPER_STALE_AFTER_NS:
            return
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        command = [sys.executable, "-m", "moesif_fast", "ship", "--ring", ring.path,
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
