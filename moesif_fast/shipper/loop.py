"""The shipper's main loop: drain the ring in batches, turn records into events, send, commit.

One batch of the ring becomes one `POST /v1/events/batch`. A batch is sent as soon as it holds
BATCH_SIZE events or MAX_BATCH_BYTES of records, and a partial batch after LINGER seconds. Up to
IN_FLIGHT batches are sent at once by daemon sender threads (the transport retries each until
delivered, refused for good, or told to stop), so a slow collector does not stall the drain. A
batch is committed to the ring (its space released) only after the collector answered 2xx or
refused it for good; anything not delivered when the shipper stops stays in the ring for the
next shipper (at-least-once).

Counters are published every second in `<ring>.shipper.json` for `python -m moesif_fast stats`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..event import EventBuilder, EventDropped, serialize_batch
from ..record import decode
from ..ringbuffer import Batch, Reader, RingFile
from ..ringfile import shipper_stats_path
from ..settings import MoesifOptions
from .transport import CollectorTransport, Outcome

logger = logging.getLogger("moesif_fast.shipper")

EVENTS_PATH = "/v1/events/batch"
MAX_BATCH_BYTES = 8 << 20  # record bytes per batch; Moesif accepts up to 50 MB per request
LINGER = 0.25  # seconds a partial batch waits for more events
IN_FLIGHT = 4  # batches being sent at once
IDLE_POLL = 0.05  # seconds between polls of an empty ring
STATS_INTERVAL = 1.0


@dataclass
class ShipperCounters:
    pid: int
    started_ns: int
    heartbeat_ns: int = 0
    delivered: int = 0  # events the collector acknowledged
    refused: int = 0  # events in batches the collector refused for good (4xx)
    undecodable: int = 0  # ring records that were not a valid record
    masked_out: int = 0  # events dropped because MASK_EVENT_MODEL failed
    build_errors: int = 0  # events that could not be built
    batches: int = 0  # batches acknowledged
    in_flight: int = 0
    last_delivery_ns: int = 0
    last_error: str | None = None


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
        self._jobs: queue.Queue[tuple[Batch, bytes, int]] = queue.Queue()
        self._done: queue.Queue[tuple[Batch, int, Outcome]] = queue.Queue()
        self._in_flight = 0
        self._next_stats = 0.0
        for number in range(IN_FLIGHT):
            threading.Thread(target=self._send_forever, name=f"moesif-sender-{number}",
                             daemon=True).start()

    def run(self, should_finish: Callable[[], bool], finish_deadline: float) -> bool:
        """Ship until `should_finish()` is true, then deliver what is left (including what
        live producers still append) within `finish_deadline` seconds. True if everything
        read was delivered."""
        open_batch: Batch | None = None
        opened_at = 0.0
        finish_by: float | None = None
        while True:
            self._collect_results(wait=0.0)
            now = time.monotonic()
            if finish_by is None and should_finish():
                finish_by = now + finish_deadline
                logger.info("moesif_fast shipper: finishing; delivering what is left within "
                            "%.0f s", finish_deadline)
            if finish_by is not None and now >= finish_by:
                return self._give_up(open_batch)
            if self._in_flight < IN_FLIGHT:
                size = self.options.BATCH_SIZE
                open_batch = self.reader.read(size - len(open_batch or ()),
                                              MAX_BATCH_BYTES - (open_batch.nbytes if open_batch
                                                                 else 0),
                                              into=open_batch)
                if not open_batch.records:
                    open_batch = None
                elif len(open_batch) == len(open_batch.records) and not opened_at:
                    opened_at = now
                if open_batch is not None and (
                        len(open_batch) >= size or open_batch.nbytes >= MAX_BATCH_BYTES
                        or now - opened_at >= LINGER or finish_by is not None):
                    self._dispatch(open_batch)
                    open_batch, opened_at = None, 0.0
                    continue
            else:
                self.reader.heartbeat()
            if finish_by is not None and open_batch is None and self._in_flight == 0 \
                    and not self.reader.pending() and not self.ring.owned_lanes():
                self._publish_stats(force=True)
                return True
            self._publish_stats()
            self._collect_results(wait=LINGER / 5 if open_batch or self._in_flight
                                  else IDLE_POLL)

    # -- batches ---------------------------------------------------------------------------

    def _dispatch(self, batch: Batch) -> None:
        events = []
        for payload in batch.records:
            call = decode(payload)
            if call is None:
                self.counters.undecodable += 1
                continue
            try:
                events.append(self.builder.build(call))
            except EventDropped:
                self.counters.masked_out += 1
            except Exception:
                self.counters.build_errors += 1
                logger.warning("moesif_fast shipper: could not build an event; it is dropped",
                               exc_info=True)
        if not events:
            self.reader.commit(batch)
            return
        self._in_flight += 1
        self._jobs.put((batch, serialize_batch(events), len(events)))

    def _send_forever(self) -> None:
        while True:
            batch, body, count = self._jobs.get()
            outcome = self.transport.post(EVENTS_PATH, body, compress=True, give_up_at=None,
                                          stop=self.stop_sending)
            self._done.put((batch, count, outcome))

    def _collect_results(self, wait: float) -> None:
        try:
            result = self._done.get(timeout=wait) if wait > 0 else self._done.get_nowait()
        except queue.Empty:
            return
        while True:
            self._finish_batch(*result)
            try:
                result = self._done.get_nowait()
            except queue.Empty:
                return

    def _finish_batch(self, batch: Batch, count: int, outcome: Outcome) -> None:
        self._in_flight -= 1
        counters = self.counters
        if outcome.delivered:
            counters.delivered += count
            counters.batches += 1
            counters.last_delivery_ns = time.time_ns()
            if self.options.LOCAL_DEBUG:
                logger.info("moesif_fast shipper: delivered %d events (HTTP %s, %d attempts)",
                            count, outcome.status, outcome.attempts)
        elif outcome.permanent:
            counters.refused += count
            counters.last_error = outcome.error
            logger.error("moesif_fast shipper: the collector refused a batch of %d events "
                         "(%s); they are dropped", count, outcome.error)
        else:  # stopped before delivery: leave it in the ring for the next shipper
            counters.last_error = outcome.error
            return
        self.reader.commit(batch)

    def _give_up(self, open_batch: Batch | None) -> bool:
        self.stop_sending.set()
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
        path = shipper_stats_path(self.ring.path)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            json.dump(asdict(self.counters), file)
        os.replace(temporary, path)
