"""The reader side of the ring: the one process that drains every lane.

`read()` returns a `Batch` of records taken fairly from all lanes (each lane with data gets an
equal share of the count and byte budget, and the starting lane rotates), in per-lane order.
Reading does not free space: `commit(batch)` does, once the batch was delivered. Batches may be
committed in any order; a lane's space is released only up to the oldest batch not yet
committed, so an unacknowledged batch is read again by the next reader after a restart.

Every header is bounds-checked against the lane. On the first inconsistency (a tail outside
`[head, head + capacity]`, a bad kind or length, a record whose header does not carry its own
position) the reader skips the lane to its current tail and counts a corrupt reset; it never
raises on ring contents, never loops without progress and never reads outside the lane.

Poison records: a record whose decoding crashed or hung the reader's process must not stop
delivery for good. Before the process decodes and builds each record it names it in the ring's
header (`mark`: lane and position, a few stores), and it clears the mark after the batch. A
reader that starts and finds a mark (its predecessor died or was killed with it set) does not
trust it at once: a process killed from outside (SIGTERM without a handler, SIGKILL, the OOM
killer) dies wherever it is, most often decoding. The record becomes the header's suspect and
is read again; only if the next reader dies on it too is it added to the header's table of
poison records. Any record in that table is skipped when read (its space is released with its
batch, and `Batch.skipped` names it for the caller to count).
The table keeps the latest POISON_SLOTS, so that poison records that crash the shipper in turn
before their batch is committed do not take turns either.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import deque
from dataclasses import dataclass, field

from .. import compiled
from .layout import (
    APPENDED,
    CONSUMED,
    CORRUPT_RESETS,
    HEAD,
    KIND_PAD,
    KIND_RECORD,
    POISON_SLOTS,
    POSITION_LIMIT,
    RECORD_HEADER,
    TAIL,
    WORD_COMMITTED,
    WORD_DECODING_LANE,
    WORD_DECODING_POSITION,
    WORD_POISON_COUNT,
    WORD_POISON_TABLE,
    WORD_READER_HEARTBEAT,
    WORD_READER_PID,
    WORD_SUSPECT_LANE,
    WORD_SUSPECT_POSITION,
    RingBusyError,
    RingFile,
    bump,
    lane_is_sane,
    store_locked,
    try_lock,
)

_lane = compiled("ringbuffer._lane")


@dataclass(eq=False)
class Batch:
    """Records read together, and the lane positions that committing them releases."""

    records: list[bytes] = field(default_factory=list)
    lanes: list[int] = field(default_factory=list)  # the lane of each record
    positions: list[int] = field(default_factory=list)  # the lane position of each record
    skipped: list[tuple[int, int, int]] = field(default_factory=list)
    """Poison records passed over, unread: (lane, position, payload bytes). Their space is
    released with the batch."""
    nbytes: int = 0
    ends: dict[int, tuple[int, int]] = field(default_factory=dict)  # lane → (position, count)
    committed: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        """Whether the batch holds anything to dispatch and commit: records or skipped ones."""
        return bool(self.records or self.skipped)


class Reader:
    """Drains the ring. Only one may exist per ring file at a time (RingBusyError otherwise)."""

    def __init__(self, ring: RingFile) -> None:
        self.ring = ring
        self._lock_fd = ring.open_lock("reader")
        if not try_lock(self._lock_fd):
            os.close(self._lock_fd)
            holder = ring.words[WORD_READER_PID]
            raise RingBusyError(f"{ring.path} already has a reader (pid {holder}); only one "
                                "shipper may drain a ring")
        geometry = ring.geometry
        self._lanes = range(geometry.lane_count)
        self._capacity = geometry.lane_capacity
        self._max_record = geometry.max_record
        self._max_records = geometry.max_records
        self._controls = [ring.control_word(lane, 0) for lane in self._lanes]
        self._bytes = ring.bytes
        self._words = ring.words
        self._sync_fds: dict[int, int] = {}
        self._positions = [self._words[ring.control_word(lane, HEAD)] for lane in self._lanes]
        self._pending: deque[Batch] = deque()
        self._next_lane = 0
        self._marked_lane = -1  # the lane `mark` last stored (-1: none stored)
        if _lane is not None:  # the same stores in C: the shipper marks every record it decodes
            self.mark = _lane.Marker(self._words, WORD_DECODING_LANE, WORD_DECODING_POSITION,
                                     WORD_READER_HEARTBEAT)
            self.clear_mark = self.mark.clear
        self.outside_lane = geometry.lane_count
        """The lane number `mark` takes for records that are no longer in the ring (the
        shipper's spool): their positions are the caller's, and a poison one is only listed
        in `poisoned_outside` for the caller to skip."""
        self.poisoned_outside: set[int] = set()
        self._skip = self._poison_positions()  # lane → positions of poison records to skip
        self._words[WORD_READER_PID] = os.getpid()
        self.heartbeat()

    def heartbeat(self) -> None:
        """Tell other processes the reader is alive (stats show its age; a supervisor kills
        a shipper whose reader stopped heartbeating)."""
        self._words[WORD_READER_HEARTBEAT] = time.time_ns()

    def mark(self, lane: int, position: int) -> None:
        """Name the record about to be decoded (from `Batch.lanes` and `Batch.positions`) in
        the ring's header, and heartbeat: if the process dies or is killed before the next
        `mark` or `clear_mark`, the next reader suspects that record (see the module
        docstring). The words are stored so
        that a process killed between two stores leaves either no mark or a whole one. With the
        compiled extension, each reader's `mark` is a `_lane.Marker` making the same stores, and
        its `clear_mark` the Marker's `clear`."""
        words = self._words
        if lane != self._marked_lane:
            words[WORD_DECODING_LANE] = 0
            words[WORD_DECODING_POSITION] = position
            words[WORD_DECODING_LANE] = lane + 1
            self._marked_lane = lane
        else:
            words[WORD_DECODING_POSITION] = position
        words[WORD_READER_HEARTBEAT] = time.time_ns()

    def clear_mark(self) -> None:
        """No record is being decoded any more."""
        self._words[WORD_DECODING_LANE] = 0
        self._marked_lane = -1

    def pending(self) -> bool:
        """True when some lane holds records this reader has not read yet."""
        return any(self._load_tail(lane) != self._positions[lane] for lane in self._lanes)

    def unread(self) -> float:
        """How much of the lane with the most unread bytes they take, 0.0 to 1.0: what the
        workers appended since this reader last read, over the lane's capacity."""
        words, most = self._words, 0
        for lane, control in enumerate(self._controls):
            most = max(most, words[control + TAIL] - self._positions[lane])
        return min(most / self._capacity, 1.0)

    def fill(self) -> float:
        """How full the fullest lane is, 0.0 to 1.0: the larger of its bytes and its records
        in use (read or not, until committed) over the lane's limits."""
        words, fullest = self._words, 0.0
        for control in self._controls:
            fullest = max(fullest,
                          (words[control + TAIL] - words[control + HEAD]) / self._capacity,
                          (words[control + APPENDED] - words[control + CONSUMED]
                           ) / self._max_records)
        return min(fullest, 1.0)

    def read(self, max_records: int, max_bytes: int, into: Batch | None = None) -> Batch:
        """Up to `max_records` records and about `max_bytes` payload bytes (at least one record
        when any is ready, even a larger one), appended to `into` (the newest uncommitted
        batch of this reader, or an empty one) or to a new batch. A new batch is empty when
        nothing is ready. (Reading is no heartbeat: the caller heartbeats where its own
        progress shows.)"""
        if into is not None and into and not (self._pending and self._pending[-1] is into):
            raise ValueError("only the newest uncommitted batch can be extended: extending "
                             "an older one would release a newer batch's records with it")
        batch = into if into is not None else Batch()
        limit_records = len(batch.records) + max_records
        limit_bytes = batch.nbytes + max_bytes
        was_empty = not batch
        ready = [lane for lane in self._rotation() if self._readable(lane)]
        while ready and len(batch.records) < limit_records and batch.nbytes < limit_bytes:
            share_records = max(1, (limit_records - len(batch.records)) // len(ready))
            share_bytes = max(1, (limit_bytes - batch.nbytes) // len(ready))
            ready = [lane for lane in ready if self._read_lane(
                lane, batch, min(share_records, limit_records - len(batch.records)),
                share_bytes)]  # (the last lanes of a round may have no share left)
        if was_empty and batch:
            self._pending.append(batch)
        return batch

    def commit(self, batch: Batch) -> None:
        """Mark `batch` delivered; release lane space up to the oldest undelivered batch."""
        batch.committed = True
        while self._pending and self._pending[0].committed:
            done = self._pending.popleft()
            for lane, (position, count) in done.ends.items():
                control = self.ring.control_word(lane, 0)
                self._store(lane, control + HEAD, position)
                bump(self._words, control + CONSUMED, count)
            bump(self._words, WORD_COMMITTED, len(done.records) + len(done.skipped))

    def close(self) -> None:
        """Give up the reader role (records read but not committed will be read again)."""
        for fd in self._sync_fds.values():
            os.close(fd)
        self._sync_fds.clear()
        os.close(self._lock_fd)

    # -- internals -------------------------------------------------------------------------

    def _rotation(self) -> list[int]:
        first = self._next_lane
        self._next_lane = (first + 1) % len(self._lanes)
        return [*self._lanes[first:], *self._lanes[:first]]

    def _readable(self, lane: int) -> bool:
        """True if the lane has unread records. A lane in an impossible state (positions
        misaligned, out of order or out of range) is reset and counted."""
        tail = self._load_tail(lane)
        position = self._positions[lane]
        head = self._words[self.ring.control_word(lane, HEAD)]
        if lane_is_sane(tail, head, self._capacity) and head <= position <= tail \
                and not position & 15:
            return tail != position
        self._reset_lane(lane, tail, Batch())
        return False

    def _read_lane(self, lane: int, batch: Batch, max_records: int, max_bytes: int) -> bool:
        """Append up to the given share of `lane`'s records to `batch`. True if more remain."""
        position = self._positions[lane]
        tail = self._load_tail(lane)
        head = self._words[self.ring.control_word(lane, HEAD)]
        if not (lane_is_sane(tail, head, self._capacity) and head <= position <= tail):
            return self._reset_lane(lane, tail, batch)
        position, taken, nbytes, damaged = _scan(
            self._bytes, self.ring.lane_offset(lane), self._capacity, self._max_record, lane,
            position, tail, max_records, max_bytes, self._skip.get(lane), batch)
        if damaged:
            return self._reset_lane(lane, tail, batch)
        if taken or position != self._positions[lane]:
            self._positions[lane] = position
            _, count = batch.ends.get(lane, (0, 0))
            batch.ends[lane] = (position, count + taken)
            batch.nbytes += nbytes
        return position < tail

    def _poison_positions(self) -> dict[int, set[int]]:
        """Handle a mark left by the previous reader's process (it died while decoding that
        record): the first time, the record becomes the suspect; if it was the suspect
        already, into the header's poison table. Returns the table's records that are still
        in their lanes, by lane."""
        words = self._words
        entries = {(words[WORD_POISON_TABLE + 2 * slot], words[WORD_POISON_TABLE + 2 * slot + 1])
                   for slot in range(POISON_SLOTS)}
        marked = (words[WORD_DECODING_LANE], words[WORD_DECODING_POSITION])
        suspect = (words[WORD_SUSPECT_LANE], words[WORD_SUSPECT_POSITION])
        if marked[0] and marked != suspect:
            words[WORD_SUSPECT_LANE] = 0  # a reader killed from here on leaves no half suspect
            words[WORD_SUSPECT_POSITION] = marked[1]
            words[WORD_SUSPECT_LANE] = marked[0]
            words[WORD_DECODING_LANE] = 0
        elif marked[0]:
            words[WORD_SUSPECT_LANE] = 0
            if marked not in entries:
                entry = WORD_POISON_TABLE + 2 * (words[WORD_POISON_COUNT] % POISON_SLOTS)
                words[entry] = 0  # a reader killed from here on leaves no half entry
                words[entry + 1] = marked[1]
                words[entry] = marked[0]
                bump(words, WORD_POISON_COUNT)
                entries.add(marked)
            words[WORD_DECODING_LANE] = 0
        skip: dict[int, set[int]] = {}
        for lane_plus_one, position in entries:
            lane = lane_plus_one - 1
            if lane == self.outside_lane:
                self.poisoned_outside.add(position)
            elif lane in self._lanes and self._positions[lane] <= position < POSITION_LIMIT \
                    and not position & 15:  # not yet released (nor damaged)
                skip.setdefault(lane, set()).add(position)
        return skip

    def _reset_lane(self, lane: int, tail: int, batch: Batch) -> bool:
        """Skip everything in a lane whose contents are inconsistent, and count it. Records
        already read from it stay in their batches, but committing them must no longer move
        this lane's head. A tail that cannot be a position at all is repaired to zero (the
        one case where the reader writes a tail); otherwise the lane restarts at its tail."""
        control = self.ring.control_word(lane, 0)
        bump(self._words, control + CORRUPT_RESETS)
        if tail & 15 or tail >= POSITION_LIMIT:
            tail = 0
            self._store(lane, control + TAIL, tail)
        self._positions[lane] = tail
        self._store(lane, control + HEAD, tail)
        self._words[control + CONSUMED] = self._words[control + APPENDED]
        for read_batch in (*self._pending, batch):
            read_batch.ends.pop(lane, None)
        return False

    def _load_tail(self, lane: int) -> int:
        word = self.ring.control_word(lane, TAIL)
        if not self.ring.locked_publish:
            return self._words[word]
        fd = self._sync_fd(lane)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return self._words[word]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _store(self, lane: int, word: int, value: int) -> None:
        if self.ring.locked_publish:
            store_locked(self._sync_fd(lane), self._words, word, value)
        else:
            self._words[word] = value

    def _sync_fd(self, lane: int) -> int:
        if lane not in self._sync_fds:
            self._sync_fds[lane] = self.ring.open_lock(f"sync-{lane:03d}")
        return self._sync_fds[lane]


def _scan_lane(view: memoryview, base: int, capacity: int, max_record: int, lane: int,
               position: int, tail: int, max_records: int, max_bytes: int,
               skip: set[int] | None, batch: Batch) -> tuple[int, int, int, bool]:
    """The record loop of `Reader._read_lane`: from `position` up to `tail` of the lane at
    `base`, append at most `max_records` records and about `max_bytes` bytes (at least one
    record when any is there) to `batch`, step over padding, and pass over poison records (in
    `skip`: removed from it, named in `batch.skipped`). Stops at the first inconsistent header
    without taking its record. Returns (position reached, records and poison records taken,
    payload bytes taken, whether it stopped at an inconsistent header).

    `_lane.scan` does the same in C, in a quarter of the instructions per record (tested
    against this one in tests/test_shipper_scan.py); this is the reference, used when the
    extension is not (MOESIF_FAST_PURE_PYTHON=1, or not built)."""
    mask = capacity - 1
    records, lanes, positions = batch.records, batch.lanes, batch.positions
    taken = nbytes = 0
    while position < tail and taken < max_records and nbytes < max_bytes:
        offset = position & mask
        room = capacity - offset
        size, kind, _, own_position = RECORD_HEADER.unpack_from(view, base + offset)
        if own_position != position:
            return position, taken, nbytes, True
        if kind == KIND_PAD:
            if size != room - 16 or position + room > tail:
                return position, taken, nbytes, True
            position += room
            continue
        span = (size + 31) & -16
        if kind != KIND_RECORD or size > max_record or span > room or position + span > tail:
            return position, taken, nbytes, True
        if skip is not None and position in skip:  # a poison record: not read again
            skip.discard(position)
            batch.skipped.append((lane, position, size))
        else:
            start = base + offset + 16
            records.append(view[start:start + size].tobytes())
            lanes.append(lane)
            positions.append(position)
            nbytes += size
        position += span
        taken += 1
    return position, taken, nbytes, False


_scan = _scan_lane if _lane is None else _lane.scan
