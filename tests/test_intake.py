"""The shipper's ring stage paces its passes by how fast the workers fill the ring, wakes the
loop when it hands a batch over, and is woken when the shipper finishes (a real ring, reader
and producer in this process)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from moesif_fast.ringbuffer import Geometry, Producer, Reader, RingFile
from moesif_fast.shipper.intake import (
    BATCHES_PER_PASS,
    BURST_RATE,
    LINGER,
    POLL,
    POLL_MAX,
    UNREAD_TARGET,
    RingIntake,
)

LANE_BYTES = 1 << 20
RECORD = b"r" * 1000  # 1,024 bytes in the lane with its header


@pytest.fixture
def ring() -> Iterator[RingFile]:
    with tempfile.TemporaryDirectory() as directory:
        ring = RingFile.create(os.path.join(directory, "intake.ring"),
                               Geometry(2, LANE_BYTES, 1_000_000))
        yield ring
        ring.close()


def append(producer: Producer, share_of_lane: float) -> None:
    for _ in range(int(share_of_lane * LANE_BYTES / 1024)):
        assert producer.append(RECORD)


def test_a_quiet_ring_is_read_every_poll_max_and_a_filling_one_more_often(ring: RingFile
                                                                           ) -> None:
    reader = Reader(ring)
    intake = RingIntake(reader, None, batch_size=100_000)
    producer = Producer(ring)
    try:
        intake.run_pass()
        assert intake._wait == POLL_MAX  # nothing appended

        append(producer, UNREAD_TARGET * 2)  # twice the target during a POLL_MAX wait
        intake.run_pass()
        assert intake._wait == pytest.approx(POLL_MAX / 2, rel=0.05)

        append(producer, 0.5)  # far more: as often as possible
        intake.run_pass()
        assert intake._wait == POLL

        append(producer, UNREAD_TARGET / 8)  # during a POLL wait: a rate under a fifth of
        intake.run_pass()  # the target's, so back to POLL_MAX
        assert intake._wait == POLL_MAX
    finally:
        producer.close()
        reader.close()


@pytest.mark.parametrize(("lane_bytes", "longest_wait"), [
    (1 << 20, POLL_MAX), (2 << 20, POLL_MAX), (4 << 20, (4 << 20) / BURST_RATE),
    (8 << 20, LINGER), (64 << 20, LINGER)])
def test_the_longest_wait_lets_a_worker_append_burst_rate_to_a_quiet_lane(
        lane_bytes: int, longest_wait: float) -> None:
    """From lanes of 2 MiB up (the default ring's lanes for up to 8 workers), a quiet ring is
    read as seldom as a lane filling at BURST_RATE allows, but never more than LINGER apart."""
    with tempfile.TemporaryDirectory() as directory:
        ring = RingFile.create(os.path.join(directory, "intake.ring"),
                               Geometry(2, lane_bytes, 1_000_000))
        reader = Reader(ring)
        try:
            intake = RingIntake(reader, None, batch_size=100)
            assert intake.longest_wait == pytest.approx(longest_wait)
            intake.run_pass()
            assert intake._wait == intake.longest_wait
        finally:
            reader.close()
            ring.close()


def test_small_batches_shorten_the_wait_to_about_batches_per_pass_at_the_last_rate(
        ring: RingFile) -> None:
    """The bytes appended would allow the longest wait, but the next pass would then close
    far more than BATCHES_PER_PASS batches of 10 at once, all unsettled together."""
    reader = Reader(ring)
    intake = RingIntake(reader, None, batch_size=10)
    producer = Producer(ring)
    try:
        intake.run_pass()
        assert intake._wait == intake.longest_wait
        for _ in range(100):  # 3 KiB: far below UNREAD_TARGET of a lane
            assert producer.append(b"r" * 10)
        intake.run_pass()
        assert intake._wait == pytest.approx(intake.longest_wait * BATCHES_PER_PASS * 10 / 100)
        for _ in range(BATCHES_PER_PASS * 10):  # the target's rate: the wait stays
            assert producer.append(b"r" * 10)
        before = intake._wait
        intake.run_pass()
        assert intake._wait == pytest.approx(before)
    finally:
        producer.close()
        reader.close()


def test_each_batch_handed_over_wakes_the_loop(ring: RingFile) -> None:
    reader = Reader(ring)
    wakes = []
    intake = RingIntake(reader, None, batch_size=10,
                        on_handoff=lambda: wakes.append(intake.next_batch()))
    producer = Producer(ring)
    try:
        for _ in range(25):
            assert producer.append(RECORD)
        intake.run_pass()  # two full batches of 10; 5 records stay in the open one
        assert [len(handoff.batch) for handoff in wakes] == [10, 10]
        assert intake.next_batch() is None
    finally:
        producer.close()
        reader.close()


def test_finish_wakes_a_waiting_ring_stage_at_once(ring: RingFile) -> None:
    """A shipper asked to finish must not wait out the ring stage's pause: with the pause made
    an hour long, the open batch is still handed over right after `finish()`."""
    handed = threading.Event()
    reader = Reader(ring)
    intake = RingIntake(reader, None, batch_size=100, on_handoff=handed.set)
    intake.longest_wait = 3600.0
    producer = Producer(ring)
    intake.start()
    try:
        while intake._wait != 3600.0:  # until its first pass found the ring quiet
            time.sleep(0.01)
        for _ in range(5):
            assert producer.append(RECORD)
        intake.finish()
        assert handed.wait(60), "the ring stage slept through finish()"
        handoff = intake.next_batch()
        assert handoff is not None and len(handoff.batch) == 5
    finally:
        intake.stop()
        producer.close()
        reader.close()
