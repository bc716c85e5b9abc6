"""The shipper's main loop: turn batches into requests, send, settle, publish counters.

Batches come from the ring stage (`intake.py`: a thread at the process's priority that reads
the ring, hands batches over while the loop keeps up, and moves the rest to the on-disk spool)
and, when it has none, from the spool (older records first). One batch becomes one
`POST /v1/events/batch` for its API calls, plus one `POST /v1/{users,companies,subscriptions}/
batch` per kind of profile update it holds. Up to IN_FLIGHT batches are sent at once by sender
threads (the transport retries each request until delivered, refused for good, or cancelled),
so a slow collector does not stall the loop. A batch is committed (its ring or spool space
released) only when every request made from it was answered 2xx or refused for good; anything
not delivered when the shipper stops stays in the spool or the ring for the next shipper
(at-least-once). Delivered batches' config and rules tags go to the PolicyRefresher, which
re-fetches them when they change.

The loop and the senders run below the workers' CPU priority while the backlog (the ring's
fullest lane, or the spool against SPOOL_BYTES) stays under half full, and at the process's
own priority while the shipper catches up (`priority.py`).

Settings: each API call record carries the settings tag of the worker that captured it
(`MoesifOptions.settings_tag`). A record whose tag is neither this shipper's nor one it was told
is older (`accepted_tags`) was captured under settings this process has not loaded (a HUP or
`--reload` gave the workers new masks): the loop stops before sending anything of that batch,
lets the batches in flight settle (RESTART_GRACE), and `run()` returns with `restart_for` set, so
that `run.py` restarts the shipper on the settings now on disk. Records of older settings are
sent under the newer ones. So an event is never sent under settings older than its worker's.

Counters are published every second in `<ring>.shipper.json` for `python -m moesif_fast stats`;
drops and delivery failures are also logged, at most once a minute per reason.
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
from typing import Any

from .. import private
from ..entities import entity_requests
from ..event import BatchWriter, EventBuilder, EventDropped
from ..record import EntityUpdate, decode
from ..ringbuffer import Reader, RingFile
from ..ringfile import policy_snapshot_path, shipper_stats_path
from ..settings import MoesifOptions
from ..spool import Spool, SpoolBatch
from .drops import DropReport
from .intake import MAX_BATCH_BYTES, Handoff, RingIntake
from .priority import CatchUp, drive, lower_this_thread
from .refresh import PolicyRefresher
from .transport import CollectorTransport, GzipStream, Outcome, Stop

logger = logging.getLogger("moesif_fast.shipper")

EVENTS_PATH = "/v1/events/batch"
IN_FLIGHT = 4  # batches being sent at once
IDLE_POLL = 1.0  # seconds between passes with nothing to send (`wake` ends the wait): each
# wake-up of a Python thread costs ~0.1 ms of CPU, and nothing here needs a faster tick
FINISH_POLL = 0.1  # the same while finishing: how soon it sees the last worker release its lane
STATS_INTERVAL = 1.0
RESTART_GRACE = 5.0  # seconds batches in flight may take to settle before a settings restart
UNREADABLE_LOG_INTERVAL = 60.0  # seconds between two warnings of one kind (unreadable records,
# counters that cannot be published)


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
    poison: int = 0  # records skipped unread: a previous shipper died decoding or building them
    masked_out: int = 0  # events dropped because MASK_EVENT_MODEL failed
    build_errors: int = 0  # events that could not be built
    batches: int = 0  # batches acknowledged
    in_flight: int = 0
    catching_up: bool = False  # the ring passed half full: working at the process's priority
    catch_ups: int = 0  # catch-ups begun (the ring passed half full)
    last_delivery_ns: int = 0
    last_error: str | None = None
    spool: dict[str, Any] | None = None  # the spool's counters (`Spool.stats()`), if any


Work = Handoff | SpoolBatch
"""A batch the loop sends: one handed over by the ring stage, or one read from the spool."""


class SettingsChanged(Exception):
    """A record needs settings this shipper has not loaded (see the module docstring)."""

    def __init__(self, tag: int) -> None:
        super().__init__(f"settings tag {tag:08x}")
        self.tag = tag


@dataclass(frozen=True, eq=False)
class Request:
    """One POST made from a batch."""

    work: Work
    path: str
    body: bytes
    count: int  # events or updates in the body
    gzipped: bool
    cancel: Stop  # set: stop retrying (the deadline passed, or the batch was spooled)


@dataclass
class BatchProgress:
    waiting: int  # requests of the batch not answered yet
    cancel: Stop
    keep: bool = False  # some request was stopped undelivered: do not commit the batch


class Shipper:
    """Drains one ring (and its spool, if it has one) to one collector. `run()` returns when
    `should_finish()` turns true and everything is delivered, or when the finish deadline
    passes."""

    def __init__(self, ring: RingFile, options: MoesifOptions, transport: CollectorTransport,
                 spool: Spool | None = None, accepted_tags: frozenset[int] = frozenset()
                 ) -> None:
        self.ring = ring
        self.reader = Reader(ring)
        self.spool = spool
        self.options = options
        self.transport = transport
        self.builder = EventBuilder(options)
        self._batch = BatchWriter(self.builder)
        self.settings_tag = options.settings_tag
        self.counters = ShipperCounters(pid=os.getpid(), started_ns=time.time_ns())
        self.refresher = PolicyRefresher(transport, policy_snapshot_path(ring.path))
        self.catch_up = CatchUp()
        self.drops = DropReport.for_shipper(ring, spool, self.counters, transport)
        self._finishing = False
        self._normal_priority = False  # while catching up or finishing
        # Requests for the senders at low priority and at the process's; None stops a sender.
        self._low_jobs: queue.Queue[Request | None] = queue.Queue()
        self._normal_jobs: queue.Queue[Request | None] = queue.Queue()
        self._done: queue.SimpleQueue[tuple[Request, Outcome] | None] = queue.SimpleQueue()
        """Senders' results, and None to wake the loop (`wake`)."""
        self.intake = RingIntake(self.reader, spool, options.BATCH_SIZE, on_handoff=self.wake)
        self._unsettled: dict[Work, BatchProgress] = {}  # batches with requests in flight
        self._in_flight = 0
        self._next_stats = 0.0
        self._next_unreadable_log = 0.0
        self._next_stats_error_log = 0.0
        self._spool_fill = 0.0  # the spool's bytes over SPOOL_BYTES, updated with the counters
        self._failures_seen = 0  # the transport's failed attempts when last_error was set
        self.accepted_tags = accepted_tags
        """Settings tags older than this shipper's: their records are sent under its options."""
        self.restart_for: int | None = None
        """The settings tag of a record that needs settings this process has not loaded."""
        self._older_tags_seen: set[int] = set()

    def run(self, should_finish: Callable[[], bool], finish_deadline: float,
            should_hand_over: Callable[[], bool] = lambda: False) -> bool:
        """Ship until `should_finish()` is true, then deliver what is left (including what
        live producers still append) within `finish_deadline` seconds. True if everything
        read was delivered. The ring stage and the sender threads live as long as this call."""
        senders = [threading.Thread(target=self._send_forever, args=(jobs, priority == "low"),
                                    name=f"moesif-sender-{priority}-{number}", daemon=True)
                   for number in range(IN_FLIGHT)
                   for jobs, priority in ((self._low_jobs, "low"), (self._normal_jobs, "normal"))]
        for sender in senders:
            sender.start()
        self.intake.start()
        try:
            return drive(self._passes(should_finish, finish_deadline, should_hand_over),
                         self._wants_normal_priority)
        finally:
            self.intake.stop()
            for jobs in (self._low_jobs, self._normal_jobs):
                _move_all(jobs, queue.Queue())  # not sent: still in the ring, not committed
                for _ in range(IN_FLIGHT):
                    jobs.put(None)

    def _passes(self, should_finish: Callable[[], bool], finish_deadline: float,
                should_hand_over: Callable[[], bool]) -> Generator[None, None, bool]:
        """The loop of `run`, yielding after each pass (so that `drive` can move it to a
        thread of another priority)."""
        finish_by: float | None = None
        while True:
            yield
            self.reader.heartbeat()  # this loop's: a supervisor kills a shipper stuck here
            self._collect_results(wait=0.0)
            now = time.monotonic()
            if should_hand_over():
                return self._hand_over()
            if finish_by is None and should_finish():
                finish_by = now + finish_deadline
                self._finishing = True
                self.intake.finish()
                logger.info("moesif_fast shipper: finishing; delivering what is left within "
                            "%.0f s", finish_deadline)
            if finish_by is not None and now >= finish_by:
                return self._give_up()
            if self.restart_for is not None:
                return self._stop_for_new_settings()
            if self._in_flight < IN_FLIGHT:
                work = self._next_work()
                if work is not None:
                    self._dispatch(work)
                    continue
            if finish_by is not None and self._in_flight == 0 and self.intake.idle() \
                    and not (self.spool and self.spool.unread()) \
                    and not self.ring.owned_lanes():
                self.refresher.stop()
                self._publish_stats(force=True)
                return True
            self._publish_stats()
            self._collect_results(wait=IDLE_POLL if finish_by is None else FINISH_POLL)

    def wake(self) -> None:
        """Make the loop take a pass now: a batch was handed over, or finishing was asked.
        Safe in a signal handler (SimpleQueue.put is reentrant)."""
        self._done.put(None)

    def _next_work(self) -> Work | None:
        """The next batch to send: from the ring stage, else from the spool."""
        while (handoff := self.intake.next_batch()) is not None:
            if not handoff.spooled:  # a spooled one is read back from the spool instead
                return handoff
        if self.spool is not None and self.spool.unread():
            batch = self.spool.read(self.options.BATCH_SIZE, MAX_BATCH_BYTES)
            if batch.records:
                return batch
        return None

    def _wants_normal_priority(self) -> bool:
        """Whether the next pass and new batches go to the process's priority: while catching
        up (see `priority.py`) or finishing. Moving there also moves the batches waiting for a
        sender."""
        was_catching_up, was_normal = self.catch_up.active, self._normal_priority
        catching_up = self.catch_up.update(self._backlog())
        if catching_up and not was_catching_up:
            logger.info("moesif_fast shipper: the backlog is over half full; catching up at "
                        "the process's CPU priority")
        elif was_catching_up and not catching_up:
            logger.info("moesif_fast shipper: caught up; back below the workers' CPU priority")
        self._normal_priority = catching_up or self._finishing
        if self._normal_priority and not was_normal:
            _move_all(self._low_jobs, self._normal_jobs)
        return self._normal_priority

    def _backlog(self) -> float:
        """How full the fuller of the ring (its fullest lane) and the spool (as of the last
        published counters: a second old at most) is, 0.0 to 1.0."""
        return max(self.reader.fill(), self._spool_fill)

    # -- batches ---------------------------------------------------------------------------

    def _dispatch(self, work: Work) -> None:
        if isinstance(work, Handoff):
            batch = work.batch
            for lane, position, size in batch.skipped:
                self._count_poison(lane, position, size)
            records, lanes, positions = batch.records, batch.lanes, batch.positions
            cancel = work.cancel
        else:
            records, lanes, positions = self._unpoisoned(work)
            cancel = Stop()
        gzip = GzipStream()
        try:
            updates = self._decode(records, lanes, positions, gzip.write)
        except SettingsChanged as change:
            self.restart_for = change.tag  # nothing of this batch is sent nor committed
            return
        events = self._batch.count
        requests = [Request(work, EVENTS_PATH, gzip.finish(), events, True, cancel)] \
            if events else []
        requests += [Request(work, path, body, count, False, cancel)
                     for path, body, count in entity_requests(updates)]
        if not requests:
            self._commit(work)
            return
        self._in_flight += 1
        self._unsettled[work] = BatchProgress(len(requests), cancel)
        jobs = self._normal_jobs if self._normal_priority or self._finishing \
            else self._low_jobs
        for request in requests:
            jobs.put(request)

    def _unpoisoned(self, batch: SpoolBatch) -> tuple[list[bytes], list[int], list[int]]:
        """The spool batch's records but those that killed or hung a previous shipper of this
        ring (counted and logged), with their places for `_decode`: the reader's outside lane
        and their spool sequence numbers."""
        lane, poisoned = self.reader.outside_lane, self.reader.poisoned_outside
        records, sequences = [], []
        for record, sequence in zip(batch.records, batch.sequences, strict=True):
            if sequence in poisoned:
                self._count_poison(lane, sequence, len(record))
            else:
                records.append(record)
                sequences.append(sequence)
        return records, [lane] * len(records), sequences

    def _decode(self, payloads: list[bytes], lanes: list[int], positions: list[int],
                write_events: Callable[[bytes | memoryview], object]) -> list[EntityUpdate]:
        """Write the events of the records, as one batch, to `write_events` (`self._batch`
        counts them), and answer their profile updates. Each record is named by its place
        (ring lane and position, or the reader's outside lane and spool sequence) in the ring's
        header while it is decoded and built, so that one that kills two processes in a row is
        skipped by the next one. The batch writer takes the common records in C
        (`BatchWriter.add_records`); the others come back here one at a time."""
        batch = self._batch
        batch.start(write_events)
        updates: list[EntityUpdate] = []
        mark = self.reader.mark
        index, end = 0, len(payloads)
        while True:
            index, record = batch.add_records(payloads, lanes, positions, index, mark,
                                              self.settings_tag)
            if index == end:
                break
            if record is NotImplemented:  # no compiled encoder: the loop is this one
                mark(lanes[index], positions[index])  # a crash or hang from here to the next
                record = decode(payloads[index])  # mark names the record
            index += 1
            if record is None:
                self._count_unreadable()
            elif isinstance(record, EntityUpdate):
                updates.append(record)
            else:
                if record.settings_tag != self.settings_tag and record.settings_tag:
                    self._check_settings(record.settings_tag)
                try:
                    batch.add(record)
                except EventDropped:
                    self.counters.masked_out += 1
                except Exception:
                    self.counters.build_errors += 1
                    logger.warning("moesif_fast shipper: could not build an event; it is "
                                   "dropped", exc_info=True)
        self.reader.clear_mark()
        if batch.count:
            batch.finish()
        return updates

    def _check_settings(self, tag: int) -> None:
        """A record of settings tag `tag`, not this shipper's: raise SettingsChanged unless
        those settings are known to be older than this shipper's (logged once per tag)."""
        if tag not in self.accepted_tags:
            self.reader.clear_mark()
            raise SettingsChanged(tag)
        if tag not in self._older_tags_seen:
            self._older_tags_seen.add(tag)
            logger.warning("moesif_fast shipper: events captured under older MOESIF_MIDDLEWARE "
                           "settings (tag %08x: workers started before the settings changed) "
                           "are sent under the current ones (tag %08x)", tag, self.settings_tag)

    def _stop_for_new_settings(self) -> bool:
        """Let the batches in flight settle (up to RESTART_GRACE seconds; what is not settled
        then stays in the ring or spool), then end `run()` for a restart on new settings."""
        logger.warning("moesif_fast shipper: workers run other MOESIF_MIDDLEWARE settings (tag "
                       "%08x, this shipper's %08x); restarting on the settings now on disk",
                       self.restart_for, self.settings_tag)
        self._settle_in_flight()
        return False

    def _hand_over(self) -> bool:
        """Told to leave the ring to the next shipper (SIGHUP: uWSGI reloads and starts a
        new one): let the batches in flight settle (up to RESTART_GRACE seconds); everything
        else stays in the ring or spool for the next shipper. True if nothing was left in
        flight."""
        logger.info("moesif_fast shipper: handing over; what is not delivered yet stays in "
                    "the ring and spool for the next shipper")
        self._settle_in_flight()
        return not self._in_flight

    def _settle_in_flight(self) -> None:
        give_up_at = time.monotonic() + RESTART_GRACE
        while self._in_flight and time.monotonic() < give_up_at:
            self._collect_results(wait=0.1)
        for progress in self._unsettled.values():
            progress.cancel.set()
        while self._in_flight and time.monotonic() < give_up_at + 2.0:
            self._collect_results(wait=0.1)
        self.refresher.stop()
        self._publish_stats(force=True)

    def _commit(self, work: Work) -> None:
        if isinstance(work, Handoff):
            self.intake.settle(work)
        else:
            self.spool.commit(work)

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

    def _count_poison(self, lane: int, position: int, size: int) -> None:
        """A record a previous shipper died (or was killed, hung) decoding or building: it was
        skipped unread, so that it cannot stop delivery again. Each is logged: there is at
        most one per two shippers that died."""
        self.counters.poison += 1
        where = (f"the spool record of sequence number {position}"
                 if lane == self.reader.outside_lane
                 else f"the ring record at lane {lane}, position {position}")
        logger.warning("moesif_fast shipper: skipped %s (%d bytes): the two previous shippers "
                       "died or were killed while decoding it or building its event; it is "
                       "dropped (%d skipped so far)", where, size, self.counters.poison)

    def _send_forever(self, jobs: queue.Queue[Request | None], low_priority: bool) -> None:
        """A sender thread: it cannot die with the shipper running (an unexpected error is
        logged and the request is settled as not delivered, so it is sent again later)."""
        if low_priority:
            lower_this_thread()
        while (request := jobs.get()) is not None:
            try:
                outcome = self.transport.post(request.path, request.body,
                                              gzipped=request.gzipped, give_up_at=None,
                                              stop=request.cancel)
            except Exception as error:
                logger.exception("moesif_fast shipper: sending a batch failed unexpectedly")
                outcome = Outcome(delivered=False, permanent=False, status=None,
                                  error=f"unexpected error: {error!r}", attempts=0)
            self._done.put((request, outcome))

    def _collect_results(self, wait: float) -> None:
        try:
            result = self._done.get(timeout=wait) if wait > 0 else self._done.get_nowait()
        except queue.Empty:
            return
        while True:
            if result is not None:  # None: the ring stage handed a batch over
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
        elif not (isinstance(request.work, Handoff) and request.work.spooled):
            counters.last_error = outcome.error  # cancelled at the deadline: the batch stays
            # for the next shipper (a batch the ring stage spooled is no error: it is sent
            # again from the spool)
        progress = self._unsettled[request.work]
        progress.waiting -= 1
        progress.keep = progress.keep or not (outcome.delivered or outcome.permanent)
        if progress.waiting == 0:
            del self._unsettled[request.work]
            self._in_flight -= 1
            if not progress.keep:
                self._commit(request.work)

    def _give_up(self) -> bool:
        """Deadline passed: stop retrying. What is not delivered goes to the spool (the ring is
        left empty), or without one stays in the ring, for the next shipper."""
        for progress in self._unsettled.values():
            progress.cancel.set()
        self.refresher.stop()
        deadline = time.monotonic() + 2.0
        while self._in_flight and time.monotonic() < deadline:
            self._collect_results(wait=0.1)
        self.intake.stop()  # the ring's reader is this thread's from here
        self.intake.finishing = True
        spooled = self.intake.evacuate()
        in_ring = self.ring.stats().records_in_use
        in_spool = self.spool.stats().records if self.spool is not None else 0
        logger.error("moesif_fast shipper: finish deadline passed; %d events stay in the spool "
                     "(%d moved there now) and %d in the ring %s, for the next shipper",
                     in_spool, spooled, in_ring, self.ring.path)
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
        while not self.intake.skipped.empty():  # poison records in batches the stage spooled
            self._count_poison(*self.intake.skipped.get())
        if self.spool is not None:
            spool = self.spool.stats()
            self._spool_fill = spool.bytes / max(1, self.options.SPOOL_BYTES)
            self.counters.spool = dict(asdict(spool), oldest_age_s=(
                (time.time_ns() - spool.oldest_ns) / 1e9 if spool.oldest_ns else None))
        failure = self.transport.last_failure
        if failure and self.transport.failed_attempts != self._failures_seen:
            self._failures_seen = self.transport.failed_attempts
            self.counters.last_error = failure
        self.drops.report(failure)
        # vars, not asdict: asdict's deep copies were half the cost of publishing
        published = json.dumps(vars(self.counters)).encode()
        try:
            private.replace_file(shipper_stats_path(self.ring.path), published)
        except OSError as error:  # e.g. a folder planted at the name: stats go unpublished
            self.counters.last_error = f"cannot publish the counters: {error}"
            if now >= self._next_stats_error_log:
                self._next_stats_error_log = now + UNREADABLE_LOG_INTERVAL
                logger.warning("moesif_fast shipper: cannot publish its counters for `stats` "
                               "(%s); shipping goes on", error)


def _move_all(source: queue.Queue[Request | None], target: queue.Queue[Request | None]) -> None:
    while True:
        try:
            target.put(source.get_nowait())
        except queue.Empty:
            return
