"""The shipper's main loop: drain the ring in batches, turn records into requests, send, commit.

One batch of the ring becomes one `POST /v1/events/batch` for its API calls, plus one
`POST /v1/{users,companies,subscriptions}/batch` per kind of profile update it holds. A batch
is sent as soon as it holds BATCH_SIZE records or MAX_BATCH_BYTES, and a partial batch after
LINGER seconds. Up to IN_FLIGHT batches are sent at once by daemon sender threads (the transport
retries each request until delivered, refused for good, or told to stop), so a slow collector
does not stall the drain. A batch is committed to the ring (its space released) only when every
request made from it was answered 2xx or refused for good; anything not delivered when the
shipper stops stays in the ring for the next shipper (at-least-once). Delivered batches' config
and rules tags go to the PolicyRefresher, which re-fetches them when they change.

The loop and the senders run below the workers' CPU priority while the ring stays under half
full, and at the process's own priority while the shipper catches up (`priority.py`).

Counters are published every second in `<ring>.shipper.json` for `python -m moesif_fast stats`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass

from ..entities import entity_requests
from ..event import EventBuilder, EventDropped, serialize_batch
from ..record import EntityUpdate, decode
from ..ringbuffer import Batch, Reader, RingFile
from ..ringfile import policy_snapshot_path, shipper_stats_path
from ..settings import MoesifOptions
from .priority import CatchUp, drive, lower_this_thread
from .refresh import PolicyRefresher
from .transport import CollectorTransport, Outcome

logger = logging.getLogger("moesif_fast.shipper")

EVENTS_PATH = "/v1/events/batch"
MAX_BATCH_BYTES = 8 << 20  # record bytes per batch; Moesif accepts up to 50 MB per request
LINGER = 0.25  # seconds a partial batch waits for more events
IN_FLIGHT = 4  # batches being sent at once
IDLE_POLL = 0.05  # seconds between polls of an empty ring
STATS_INTERVAL = 1.0
UNREADABLE_LOG_INTERVAL = 60.0  # seconds between two warnings about unreadable records


@dataclass
class ShipperCounters:
    pid: int
    started_ns: int
    heartbeat_ns: int = 0
    delivered: int = 0  # events the collector acknowledged
    refused: int = 0  # events in batches the collector refused for good (4xx)
    updates_delivered: int = 0  # user/company/subscription updates acknowledged
    updates_refused: int = 0
    undecodable: int = 0  # ring records that were not a valid record
    masked_out: int = 0  # events dropped because MASK_EVENT_MODEL failed
    build_errors: int = 0  # events that could not be built
    batches: int = 0  # batches acknowledged
    in_flight: int = 0
    catching_up: bool = False  # the ring passed half full: working at the process's priority
    catch_ups: int = 0  # catch-ups begun (the ring passed half full)
    last_delivery_ns: int = 0
    last_error: str | None = None


@dataclass(frozen=True, eq=False)
class Request:
    """One POST made from a ring batch."""

    batch: Batch
    path: str
    body: bytes
    count: int  # events or updates in the body
    compress: bool


@dataclass
class BatchProgress:
    waiting: int  # requests of the batch not answered yet
    keep: bool = False  # some request was stopped undelivered: do not commit the batch


class Shipper:
    """Drains one ring to one collector. `run()` returns when `should_finish()` turns true and
    everything is delivered, or when the finish deadline passes."""

    def __init__(self, ring: RingFile, options: MoesifOptions,
                 transport: CollectorTransport) -> None:
        self.ring = ring
        self.reader = Reader(ring)
        self.options = options
        self.transport = transport
        self.builder = EventBuilder(options)
        self.counters = ShipperCounters(pid=os.getpid(), started_ns=time.time_ns())
        self.stop_sending = threading.Event()  # interrupts retries once the deadline passed
        self.refresher = PolicyRefresher(transport, policy_snapshot_path(ring.path))
        self.catch_up = CatchUp()
        self._finishing = False
        self._normal_priority = False  # while catching up or finishing
        # Requests for the senders at low priority and at the process's; None stops a sender.
        self._low_jobs: queue.Queue[Request | None] = queue.Queue()
        self._normal_jobs: queue.Queue[Request | None] = queue.Queue()
        self._done: queue.Queue[tuple[Request, Outcome]] = queue.Queue()
        self._unsettled: dict[Batch, BatchProgress] = {}  # batches with requests in flight
        self._in_flight = 0
        self._next_stats = 0.0
        self._next_unreadable_log = 0.0

    def run(self, should_finish: Callable[[], bool], finish_deadline: float) -> bool:
        """Ship until `should_finish()` is true, then deliver what is left (including what
        live producers still append) within `finish_deadline` seconds. True if everything
        read was delivered. The sender threads live as long as this call."""
        for number in range(IN_FLIGHT):
            for jobs, priority in ((self._low_jobs, "low"), (self._normal_jobs, "normal")):
                threading.Thread(target=self._send_forever, args=(jobs, priority == "low"),
                                 name=f"moesif-sender-{priority}-{number}", daemon=True).start()
        try:
            return drive(self._passes(should_finish, finish_deadline),
                         self._wants_normal_priority)
        finally:
            for jobs in (self._low_jobs, self._normal_jobs):
                _move_all(jobs, queue.Queue())  # not sent: still in the ring, not committed
                for _ in range(IN_FLIGHT):
                    jobs.put(None)

    def _passes(self, should_finish: Callable[[], bool], finish_deadline: float
                ) -> Generator[None, None, bool]:
        """The loop of `run`, yielding after each pass (so that `drive` can move it to a
        thread of another priority)."""
        open_batch: Batch | None = None
        opened_at = 0.0
        finish_by: float | None = None
        while True:
            yield
            self._collect_results(wait=0.0)
            now = time.monotonic()
            if finish_by is None and should_finish():
                finish_by = now + finish_deadline
                self._finishing = True
                logger.info("moesif_fast shipper: finishing; delivering what is left within "
                            "%.0f s", finish_deadline)
            if finish_by is not None and now >= finish_by:
                return self._give_up()
            if self._in_flight < IN_FLIGHT:
                size = self.options.BATCH_SIZE
                held, held_bytes = (len(open_batch), open_batch.nbytes) if open_batch else (0, 0)
                batch = self.reader.read(size - held, MAX_BATCH_BYTES - held_bytes,
                                         into=open_batch)
                if batch.records:
                    open_batch, opened_at = batch, opened_at or now
                    if (len(batch) >= size or batch.nbytes >= MAX_BATCH_BYTES
                            or now - opened_at >= LINGER or finish_by is not None):
                        self._dispatch(batch)
                        open_batch, opened_at = None, 0.0
                        continue
            else:
                self.reader.heartbeat()
            if finish_by is not None and open_batch is None and self._in_flight == 0 \
                    and not self.reader.pending() and not self.ring.owned_lanes():
                self.refresher.stop()
                self._publish_stats(force=True)
                return True
            self._publish_stats()
            self._collect_results(wait=LINGER / 5 if open_batch or self._in_flight
                                  else IDLE_POLL)

    def _wants_normal_priority(self) -> bool:
        """Whether the next pass and new batches go to the process's priority: while catching
        up (see `priority.py`) or finishing. Moving there also moves the batches waiting for a
        sender."""
        was_catching_up, was_normal = self.catch_up.active, self._normal_priority
        catching_up = self.catch_up.update(self.reader.fill())
        if catching_up and not was_catching_up:
            logger.info("moesif_fast shipper: the ring is over half full; catching up at the "
                        "process's CPU priority")
        elif was_catching_up and not catching_up:
            logger.info("moesif_fast shipper: caught up; back below the workers' CPU priority")
        self._normal_priority = catching_up or self._finishing
        if self._normal_priority and not was_normal:
            _move_all(self._low_jobs, self._normal_jobs)
        return self._normal_priority

    # -- batches ---------------------------------------------------------------------------

    def _dispatch(self, batch: Batch) -> None:
        events, updates = [], []
        for payload in batch.records:
            record = decode(payload)
            if record is None:
                self._count_unreadable()
            elif isinstance(record, EntityUpdate):
                updates.append(record)
            else:
                try:
                    events.append(self.builder.encode(record))
                except EventDropped:
                    self.counters.masked_out += 1
                except Exception:
                    self.counters.build_errors += 1
                    logger.warning("moesif_fast shipper: could not build an event; it is "
                                   "dropped", exc_info=True)
        requests = [Request(batch, EVENTS_PATH, serialize_batch(events), len(events), True)
                    ] if events else []
        requests += [Request(batch, path, body, count, False)
                     for path, body, count in entity_requests(updates)]
        if not requests:
            self.reader.commit(batch)
            return
        self._in_flight += 1
        self._unsettled[batch] = BatchProgress(len(requests))
        jobs = self._normal_jobs if self._normal_priority or self._finishing \
            else self._low_jobs
        for request in requests:
            jobs.put(request)

    def _count_unreadable(self) -> None:
        """A ring record that is not a record of this version (one left by an older version
        after an upgrade, or damaged bytes): dropped, counted, and logged at most once a
        minute."""
        self.counters.undecodable += 1
        now = time.monotonic()
        if now >= self._next_unreadable_log:
            self._next_unreadable_log = now + UNREADABLE_LOG_INTERVAL
            logger.warning("moesif_fast shipper: a ring record could not be read (written by "
                           "another version of moesif_fast, or damaged); it is dropped (%d so "
                           "far)", self.counters.undecodable)

    def _send_forever(self, jobs: queue.Queue[Request | None], low_priority: bool) -> None:
        if low_priority:
            lower_this_thread()
        while (request := jobs.get()) is not None:
            outcome = self.transport.post(request.path, request.body, compress=request.compress,
                                          give_up_at=None, stop=self.stop_sending)
            self._done.put((request, outcome))

    def _collect_results(self, wait: float) -> None:
        try:
            result = self._done.get(timeout=wait) if wait > 0 else self._done.get_nowait()
        except queue.Empty:
            return
        while True:
            self._settle(*result)
            try:
                result = self._done.get_nowait()
            except queue.Empty:
                return

    def _settle(self, request: Request, outcome: Outcome) -> None:
        counters = self.counters
        is_events = request.path == EVENTS_PATH
        if outcome.delivered:
            if is_events:
                counters.delivered += request.count
                counters.batches += 1
                counters.last_delivery_ns = time.time_ns()
                self.refresher.notice_tags(outcome.config_etag, outcome.rules_tag)
            else:
                counters.updates_delivered += request.count
            if self.options.LOCAL_DEBUG:
                logger.info("moesif_fast shipper: delivered %d to %s (HTTP %s, %d attempts)",
                            request.count, request.path, outcome.status, outcome.attempts)
        elif outcome.permanent:
            if is_events:
                counters.refused += request.count
            else:
                counters.updates_refused += request.count
            counters.last_error = outcome.error
            logger.error("moesif_fast shipper: the collector refused %d records for %s (%s); "
                         "they are dropped", request.count, request.path, outcome.error)
        else:  # stopped before delivery: the batch stays in the ring for the next shipper
            counters.last_error = outcome.error
        progress = self._unsettled[request.batch]
        progress.waiting -= 1
        progress.keep = progress.keep or not (outcome.delivered or outcome.permanent)
        if progress.waiting == 0:
            del self._unsettled[request.batch]
            self._in_flight -= 1
            if not progress.keep:
                self.reader.commit(request.batch)

    def _give_up(self) -> bool:
        """Deadline passed: stop retrying; whatever is not committed (an open batch too)
        stays in the ring for the next shipper."""
        self.stop_sending.set()
        self.refresher.stop()
        deadline = time.monotonic() + 2.0
        while self._in_flight and time.monotonic() < deadline:
            self._collect_results(wait=0.1)
        left = self.ring.stats().records_in_use
        logger.error("moesif_fast shipper: finish deadline passed; %d events stay in %s for "
                     "the next shipper", left, self.ring.path)
        self._publish_stats(force=True)
        return False

    # -- stats -----------------------------------------------------------------------------

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_stats:
            return
        self._next_stats = now + STATS_INTERVAL
        self.counters.heartbeat_ns = time.time_ns()
        self.counters.in_flight = self._in_flight
        self.counters.catching_up = self.catch_up.active
        self.counters.catch_ups = self.catch_up.started
        path = shipper_stats_path(self.ring.path)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            json.dump(asdict(self.counters), file)
        os.replace(temporary, path)


def _move_all(source: queue.Queue[Request | None], target: queue.Queue[Request | None]) -> None:
    while True:
        try:
            target.put(source.get_nowait())
        except queue.Empty:
            return
