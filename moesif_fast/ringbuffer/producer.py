"""The producer side of the ring: one per process, appending records to a lane of its own.

A process owns a lane while it holds an exclusive `flock` on the lane's lock file; the kernel
frees it when the process dies, whatever killed it, so the next process claims it. When every
dedicated lane is owned, appends go to the shared overflow lane, each under a non-blocking
`flock` of the overflow lock (retried for a few microseconds, then dropped as "busy").

`append` never waits on another process: it returns False and counts the drop in the lane's
control block when the lane is full (bytes or `max_records`), the record is larger than
`max_record`, or the overflow lane stays busy. It is safe from many threads (a process-local
lock) and from a signal handler that interrupts an append (the nested call drops and counts
instead of deadlocking). After `fork()` the child drops the parent's lane and claims its own:
an `os.register_at_fork` hook resets every live producer in the child (so `append` need not
compare process ids, a system call, on every record).

The write and publish of a record (`_append`) run in C (`_lane.append`, the same bytes and
counts, and a release store for the publish) when the extension is built, the ring publishes
with plain stores, and MOESIF_FAST_PURE_PYTHON is not 1; the Python code is the reference.
Once this process owns a lane, such an append takes no lock: one call into C holding the GIL
runs no Python code, so no other thread and no signal handler can run in the middle of it. The
producer's `append` is then a compiled `_lane.Appender` (an instance attribute over the
method): given the lane when this process claims it, released when it closes or forks, it hands
records to the method while it owns none. So a worker's append runs no Python frame, and the
object stays the same, for callers to keep.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from functools import partial

from .. import compiled
from .layout import (
    APPENDED,
    CONSUMED,
    DROPPED_BUSY,
    DROPPED_FULL,
    DROPPED_OVERSIZE,
    HEAD,
    KIND_PAD,
    KIND_RECORD,
    OWNER_PID,
    POSITION_LIMIT,
    RECORD_HEADER,
    TAIL,
    WORD_MASK,
    RingFile,
    bump,
    store_locked,
    try_lock,
)

_lane = compiled("ringbuffer._lane")

OVERFLOW_ATTEMPTS = 20  # non-blocking tries of the overflow lock before dropping as busy


class Producer:
    """Appends records to the ring from this process. Create one per process (or share one);
    it claims a lane lazily on the first append."""

    def __init__(self, ring: RingFile, preferred_lane: int | None = None) -> None:
        self.ring = ring
        self._preferred_lane = preferred_lane
        geometry = ring.geometry
        self._capacity = geometry.lane_capacity
        self._mask = geometry.lane_capacity - 1
        self._max_record = geometry.max_record
        self._max_records = geometry.max_records
        self._bytes = ring.bytes
        self._words = ring.words
        self._locked_publish = ring.locked_publish
        self._compiled_append = None if _lane is None or ring.locked_publish else _lane.append
        self._appender = None
        if self._compiled_append is not None:  # the class's append behind it, on this producer
            self._appender = self.append = _lane.Appender(partial(Producer.append, self))
        # (index of the lane's first control word, byte offset of its data) for every lane
        self._lanes = [(ring.control_word(lane, 0), ring.lane_offset(lane))
                       for lane in range(geometry.lane_count)]
        self._reset()
        _live_producers.add(self)

    def _reset(self) -> None:
        """Forget any lane: the state of a new process."""
        self._pid = os.getpid()
        self._lock = threading.RLock()  # RLock: a signal handler re-entering does not deadlock
        self._appending = False
        self._lane: int | None = None
        if self._appender is not None:
            self._appender.release()  # the lane of the process forked from
        self._lane_fd: int | None = None
        self._overflow_fd: int | None = None
        self._sync_fds: dict[int, int] = {}  # lane → its sync lock (locked-publish mode)
        self._busy_drops = 0  # drops not yet added to a lane's counter (no lane held then)

    @property
    def lane(self) -> int | None:
        """The lane this process owns, None before the first append or on the overflow lane."""
        return self._lane

    def append(self, record: bytes) -> bool:
        """Append one record. True when it is published; False when it was dropped (counted).
        With the compiled append, the producer's `append` is an Appender in front of this
        method (see the module docstring)."""
        with self._lock:
            if self._appending:  # re-entered from a signal handler in the middle of an append
                self._count_nested_drop()
                return False
            self._appending = True
            try:
                if self._lane is None and not self._claim():
                    return self._append_overflow(record)
                return self._append(self._lane, record, len(record))
            finally:
                self._appending = False

    def close(self) -> None:
        """Release this process's lane (it is also released when the process exits)."""
        with self._lock:
            if self._appender is not None:  # first: closing the lane's lock file releases it
                self._appender.release()
            self._close_descriptors()
            self._lane_fd = self._overflow_fd = None
            self._sync_fds = {}
            self._lane = None

    # -- internals -------------------------------------------------------------------------

    def _append(self, lane: int, record: bytes, size: int) -> bool:
        """Write and publish `record` in `lane`, which this process owns (or holds the overflow
        lock of). The only store another process can observe before the tail is the payload."""
        control, base = self._lanes[lane]
        if self._compiled_append is not None:
            return self._compiled_append(self._bytes, control, base, self._capacity,
                                         self._max_record, self._max_records, record)
        words = self._words
        if size > self._max_record:
            bump(words, control + DROPPED_OVERSIZE)
            return False
        capacity = self._capacity
        tail = words[control + TAIL]
        head = words[control + HEAD]
        offset = tail & self._mask
        span = (size + 31) & -16  # 16-byte header + payload, 16-aligned
        pad = capacity - offset if span > capacity - offset else 0
        end = tail + pad + span
        appended = words[control + APPENDED]
        if (end - head > capacity or appended - words[control + CONSUMED] >= self._max_records
                # a damaged lane (see layout.lane_is_sane): refuse it until the reader repairs it
                or tail < head or (tail | head) & 15 or tail >= POSITION_LIMIT):
            bump(words, control + DROPPED_FULL)
            return False
        if pad:
            RECORD_HEADER.pack_into(self._bytes, base + offset, pad - 16, KIND_PAD, 0, tail)
            offset = 0
        start = base + offset
        self._bytes[start + 16:start + 16 + size] = record
        RECORD_HEADER.pack_into(self._bytes, start, size, KIND_RECORD, 0, tail + pad)
        if self._locked_publish:
            self._publish_locked(lane, control + TAIL, end)
        else:
            words[control + TAIL] = end  # the publish: one aligned 8-byte store
        words[control + APPENDED] = (appended + 1) & WORD_MASK
        return True

    def _publish_locked(self, lane: int, word: int, value: int) -> None:
        if lane not in self._sync_fds:
            self._sync_fds[lane] = self.ring.open_lock(f"sync-{lane:03d}")
        store_locked(self._sync_fds[lane], self._words, word, value)

    def _append_overflow(self, record: bytes) -> bool:
        lane = self.ring.overflow_lane
        if self._overflow_fd is None:
            self._overflow_fd = self.ring.open_lock("overflow")
        for attempt in range(OVERFLOW_ATTEMPTS):
            if try_lock(self._overflow_fd):
                break
            time.sleep(0 if attempt < OVERFLOW_ATTEMPTS // 2 else 0.0001)
        else:
            self._busy_drops += 1
            return False
        try:
            self._flush_busy_drops(lane)
            return self._append(lane, record, len(record))
        finally:
            fcntl.flock(self._overflow_fd, fcntl.LOCK_UN)

    def _claim(self) -> bool:
        """Claim a free dedicated lane, starting at the preferred one. False if none is free."""
        dedicated = self.ring.overflow_lane
        first = self._preferred_lane if self._preferred_lane is not None else self._pid
        for step in range(dedicated):
            lane = (first + step) % dedicated
            fd = self.ring.open_lock(f"lane-{lane:03d}")
            if try_lock(fd):
                self._lane, self._lane_fd = lane, fd
                self._words[self.ring.control_word(lane, OWNER_PID)] = self._pid
                if self._appender is not None:
                    self._appender.own(self._bytes, *self._lanes[lane], self._capacity,
                                       self._max_record, self._max_records)
                self._flush_busy_drops(lane)
                return True
            os.close(fd)
        return False

    def _count_nested_drop(self) -> None:
        if self._lane is not None:
            bump(self._words, self.ring.control_word(self._lane, DROPPED_BUSY))
        else:
            self._busy_drops += 1

    def _flush_busy_drops(self, lane: int) -> None:
        """Count drops made while no lane was held in `lane`, now held (owned or locked)."""
        if self._busy_drops:
            bump(self._words, self.ring.control_word(lane, DROPPED_BUSY), self._busy_drops)
            self._busy_drops = 0

    def _close_descriptors(self) -> None:
        for fd in (self._lane_fd, self._overflow_fd, *self._sync_fds.values()):
            if fd is not None:
                os.close(fd)

    def _after_fork(self) -> None:
        """In a forked child: close the parent's lock descriptors (closing a duplicate does not
        release the parent's flock) and start over as a new process."""
        self._close_descriptors()
        self._reset()


_live_producers: weakref.WeakSet[Producer] = weakref.WeakSet()


def _reset_producers_in_child() -> None:
    for producer in list(_live_producers):
        producer._after_fork()


os.register_at_fork(after_in_child=_reset_producers_in_child)
