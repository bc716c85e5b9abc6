"""The shipper's ring stage: read the ring, hand batches to the loop, spool what it cannot take.

One thread at the process's own CPU priority (so that a busy host cannot starve it) owns the
ring's `Reader`; nothing else reads or commits the ring while it runs. Each pass, it:

- applies the commits the loop asked for (`settle`), so that the Reader has one user;
- reads what the workers appended into an open batch of at most BATCH_SIZE records and
  MAX_BATCH_BYTES, closed when full, LINGER after it opened, or at once while finishing;
- hands a closed batch to the loop, in memory, while the loop keeps up: fewer than HANDOFF_LIMIT
  batches handed over and not settled, and nothing waiting in the spool. Otherwise it appends
  the batch's raw records to the spool (no decoding: a few µs per record) and commits the batch
  in the ring at once;
- when the fullest lane passes TAKEOVER_FILL while batches handed over are still unsettled (the
  collector is down, slow or refusing, or the loop is short of CPU), writes those batches to
  the spool too, commits them, and sets their `cancel` event so that their senders stop
  retrying. A batch delivered in the moment between is delivered twice; its events share
  their transaction ids;
- syncs the spool at most every SYNC_INTERVAL;
- picks the wait before the next pass: long enough that the workers append about UNREAD_TARGET
  of a lane meanwhile, at the rate they did during the last wait, from POLL to the longest
  wait. Each pass costs about 0.1 to 0.2 ms of CPU here, mostly in waking a Python thread (a
  thread waiting 20 ms at a time burns 6 ms of CPU per second), so a quiet or steady ring is
  read every longest wait and only a fast-filling one every POLL. The longest wait is the
  time a worker appending BURST_RATE takes to fill its lane, at least POLL_MAX and at most
  LINGER (waiting longer would only delay batches): from a quiet ring, a lane overflows
  before the next pass only if a worker appends more than BURST_RATE (20 MiB/s; from lanes
  below 2 MiB, their capacity in POLL_MAX). With the default ring and 2 workers (8 MiB lanes)
  that is LINGER, where it was POLL_MAX for every ring before. The wait is also short enough
  that a pass closes at most BATCHES_PER_PASS batches at the rate the workers appended during
  the last one: the batches a pass closes at once all count against HANDOFF_LIMIT until the
  loop settles them, so small batches read in large passes would be spooled though the loop
  keeps up (at BATCH_SIZE 25 and 1,650 requests/s, passes 0.25 s apart spooled 45 % of the
  records).

The loop decodes, builds and sends batches from `next_batch()` and, when there is none, from
the spool (older records first). Without a spool (SPOOL_BYTES 0, or a folder that cannot be
used) every batch goes to the loop: the ring alone absorbs pressure, as it did before there was
a spool. `evacuate()` (at the finish deadline, after `stop()`) writes every record that is not
delivered to the spool, so that the ring is left empty and the next shipper delivers them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..ringbuffer import Batch, Reader
from ..spool import Spool
from .transport import Stop

logger = logging.getLogger("moesif_fast.shipper")

POLL = 0.02  # seconds between two passes of the ring stage, at the least
POLL_MAX = 0.1  # the longest wait for lanes of 2 MiB or less (see the module docstring)
BURST_RATE = 20 << 20  # bytes a second a worker may append to a quiet lane before the next pass
UNREAD_TARGET = 1 / 16  # share of a lane the workers should append between two passes
LINGER = 0.25  # seconds a partial batch waits for more records
MAX_BATCH_BYTES = 8 << 20  # record bytes per batch; Moesif accepts up to 50 MB per request
HANDOFF_LIMIT = 8  # batches handed to the loop and not settled, beyond which batches are spooled
BATCHES_PER_PASS = HANDOFF_LIMIT // 2  # the most a pass should close at the workers' last rate
TAKEOVER_FILL = 0.25  # fill of the fullest lane at which unsettled batches are spooled
SYNC_INTERVAL = 1.0  # seconds between two syncs of the spool
WRITE_RETRY = 10.0  # seconds without spooling after the spool could not write (disk full...)
ERROR_LOG_INTERVAL = 60.0


@dataclass(eq=False)
class Handoff:
    """A ring batch handed to the loop, and the event that tells its senders to stop."""

    batch: Batch
    cancel: Stop = field(default_factory=Stop)
    spooled: bool = False  # written to the spool and committed by the ring stage


class RingIntake:
    """The ring stage (see the module docstring). `start()` its thread; the loop calls
    `next_batch`, `settle` and `idle`, and `finish()`; `stop()` then `evacuate()` at the
    deadline."""

    def __init__(self, reader: Reader, spool: Spool | None, batch_size: int,
                 on_handoff: Callable[[], None] = lambda: None) -> None:
        self.reader = reader
        self.spool = spool
        self.batch_size = batch_size
        self.finishing = False  # close batches at once (`finish`)
        self.errors = 0  # unexpected errors of the thread, logged
        self._handed: queue.SimpleQueue[Handoff] = queue.SimpleQueue()  # to the loop
        self._commits: queue.SimpleQueue[Handoff] = queue.SimpleQueue()  # from the loop
        self._unsettled: dict[Batch, Handoff] = {}  # handed over, not settled (this thread's)
        self.skipped: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()
        """Poison records passed over in batches spooled here, for the loop to count."""
        self._open: Batch | None = None
        self._opened_at = 0.0
        self._next_sync = 0.0
        self._spool_again_at = 0.0  # after a failed write: the ring alone until then
        self._next_error_log = 0.0
        self._wait = POLL  # before the next pass
        self.longest_wait = min(LINGER, max(POLL_MAX, reader.ring.geometry.lane_capacity
                                            / BURST_RATE))
        self._on_handoff = on_handoff  # after each batch handed to the loop: wakes it
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the wait before the next pass (finish, stop)
        self._passing = threading.Lock()  # held during a pass: `idle` sees whole passes
        self._thread = threading.Thread(target=self._run, name="moesif-ring-intake",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread after its current pass and apply the commits asked for since; the
        Reader is the caller's from then on."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._apply_commits()

    # -- the loop's side -------------------------------------------------------------------

    def next_batch(self) -> Handoff | None:
        try:
            return self._handed.get_nowait()
        except queue.Empty:
            return None

    def finish(self) -> None:
        """From now on close batches at once, starting with a pass right away."""
        self.finishing = True
        self._wake.set()

    def settle(self, handoff: Handoff) -> None:
        """The loop is done with `handoff` (delivered, or refused for good): commit it."""
        self._commits.put(handoff)

    def idle(self) -> bool:
        """Nothing read and not yet handed over or spooled, nothing waiting for the loop, and
        nothing left unread in the ring."""
        with self._passing:
            return self._open is None and self._handed.empty() and not self.reader.pending()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._wait)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.run_pass()
            except Exception:  # never die silently with the shipper still running
                self.errors += 1
                now = time.monotonic()
                if now >= self._next_error_log:
                    self._next_error_log = now + ERROR_LOG_INTERVAL
                    logger.exception("moesif_fast shipper: the ring stage failed (%d so far); "
                                     "it goes on", self.errors)

    def run_pass(self) -> None:
        with self._passing:
            self._run_pass()

    def _run_pass(self) -> None:
        self._apply_commits()
        unread = self.reader.unread()
        self._pace(unread, self._read())
        if self._spooling() and self._unsettled and self.reader.fill() >= TAKEOVER_FILL:
            self._take_over()
        now = time.monotonic()
        if self.spool is not None and now >= self._next_sync:
            self._next_sync = now + SYNC_INTERVAL
            self.spool.sync()

    def _pace(self, unread: float, records: int) -> None:
        """The wait before the next pass, from what the workers appended during the last one:
        `unread`, the share of the fullest lane, and `records`, what this pass read (see the
        module docstring)."""
        wait = self.longest_wait
        if unread > 0.0:
            wait = min(wait, self._wait * UNREAD_TARGET / unread)
        if records:
            wait = min(wait, self._wait * BATCHES_PER_PASS * self.batch_size / records)
        self._wait = max(POLL, wait)

    def _apply_commits(self) -> None:
        while True:
            try:
                handoff = self._commits.get_nowait()
            except queue.Empty:
                return
            self._unsettled.pop(handoff.batch, None)
            self.reader.commit(handoff.batch)  # a no-op for a batch spooled meanwhile

    def _read(self) -> int:
        """Read what is there into batches, closing those that are done; answers how many
        records it read."""
        read = 0
        while True:
            batch = self._open
            held, held_bytes = (len(batch), batch.nbytes) if batch is not None else (0, 0)
            batch = self.reader.read(self.batch_size - held, MAX_BATCH_BYTES - held_bytes,
                                     into=batch)
            if not batch:
                return read
            read += len(batch) - held
            now = time.monotonic()
            if self._open is None:
                self._open, self._opened_at = batch, now
            full = len(batch) >= self.batch_size or batch.nbytes >= MAX_BATCH_BYTES
            if not (full or self.finishing or now - self._opened_at >= LINGER):
                return read
            self._open = None
            self._close(batch)

    def _spooling(self) -> bool:
        return self.spool is not None and time.monotonic() >= self._spool_again_at

    def _close(self, batch: Batch) -> None:
        keeping_up = len(self._unsettled) < HANDOFF_LIMIT and not (self.spool
                                                                    and self.spool.unread())
        if keeping_up or not self._spooling() or not self._spool_batch(batch):
            handoff = Handoff(batch)
            self._unsettled[batch] = handoff
            self._handed.put(handoff)
            self._on_handoff()

    def _take_over(self) -> None:
        """Spool and commit the batches the loop has not settled (see the module docstring),
        but those with a POST on the wire, which may still arrive: spooled, they would be
        delivered twice."""
        for batch, handoff in list(self._unsettled.items()):
            with handoff.cancel.sending_lock:  # no attempt of this batch starts meanwhile
                if handoff.cancel.on_wire:
                    continue
                if not self._spool_batch(batch):
                    return  # the rest stay with the loop
                handoff.spooled = True
                handoff.cancel.set()
            del self._unsettled[batch]

    def _spool_batch(self, batch: Batch) -> bool:
        """Append the batch's records to the spool and commit the batch in the ring; True if
        the spool took them all (written, or dropped and counted to stay under its bounds).
        False when it could not write them (its warning says why): the batch stays in the
        ring, and the ring alone holds events for WRITE_RETRY seconds."""
        assert self.spool is not None
        if self.spool.append(batch.records) < len(batch.records):
            self._spool_again_at = time.monotonic() + WRITE_RETRY
            return False
        for skipped in batch.skipped:
            self.skipped.put(skipped)
        self.reader.commit(batch)
        return True

    def evacuate(self) -> int:
        """After `stop()`: write every record not delivered (handed over and unsettled, open,
        or still unread in the ring) to the spool and commit it. Returns the records spooled."""
        if self.spool is None:
            return 0
        self._apply_commits()
        self._spool_again_at = 0.0
        moved = sum(len(batch) for batch in self._unsettled)
        self._take_over()
        if self._unsettled:  # the spool cannot write: what is left stays in the ring
            return 0
        batch = self._open or self.reader.read(self.batch_size, MAX_BATCH_BYTES)
        self._open = None
        while batch:
            if not self._spool_batch(batch):
                break
            moved += len(batch)
            batch = self.reader.read(self.batch_size, MAX_BATCH_BYTES)
        self.spool.sync()
        return moved
