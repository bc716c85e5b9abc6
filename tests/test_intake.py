"""The shipper's ring stage paces its passes by how fast the workers fill the ring, and wakes
the loop when it hands a batch over (a real ring, reader and producer in this process)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from moesif_fast.ringbuffer import Geometry, Producer, Reader, RingFile
from moesif_fast.shipper.intake import POLL, POLL_MAX, UNREAD_TARGET, RingIntake

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


def test_each_batch_handed_over_wakes_the_loop(ring: RingFile) -> None:
    reader = Reader(ring)
    intake = RingIntake(reader, None, batch_size=10)
    wakes = []
    intake.on_handoff = lambda: wakes.append(intake.next_batch())
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
