"""The compiled lane scan (`ringbuffer._lane.scan`) against its Python reference
(`ringbuffer.reader._scan_lane`): the same records, positions, poison records passed over and
stopping point, on well-formed lanes and on damaged ones, and never a read outside the lane."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesif_fast.ringbuffer import reader
from moesif_fast.ringbuffer.layout import KIND_PAD, KIND_RECORD, RECORD_HEADER
from moesif_fast.ringbuffer.reader import Batch, _scan_lane

_lane = reader._lane
pytestmark = pytest.mark.skipif(_lane is None, reason="the compiled lane scan is not built or "
                                                      "forced off")

CAPACITY = 1024
BASE = 48  # the lane's offset in the view
GUARD = b"\xee" * 64  # bytes around the lane
MAX_RECORD = CAPACITY // 2 - 16


def lane_with(sizes: list[int], start: int) -> tuple[bytearray, int, list[int]]:
    """A view holding one lane with records of `sizes` appended from position `start` as a
    producer appends them (a pad where one does not fit before the lane's end), as many as
    fit in the lane; the view, the tail and the records' positions."""
    view = bytearray(GUARD[:BASE]) + bytearray(CAPACITY) + bytearray(GUARD)
    position, positions = start, []
    for number, size in enumerate(sizes):
        span = (size + 31) & -16
        offset = position % CAPACITY
        room = CAPACITY - offset
        if position + (room if span > room else 0) + span - start > CAPACITY:
            break
        if span > room:
            RECORD_HEADER.pack_into(view, BASE + offset, room - 16, KIND_PAD, 0, position)
            position += room
            offset = 0
        RECORD_HEADER.pack_into(view, BASE + offset, size, KIND_RECORD, 0, position)
        view[BASE + offset + 16:BASE + offset + 16 + size] = bytes([number % 251]) * size
        positions.append(position)
        position += span
    return view, position, positions


def both(view: bytearray, position: int, tail: int, max_records: int, max_bytes: int,
         skip: set[int] | None) -> tuple[object, object]:
    """(result, batch fields, skip left) of the C scan and of the Python one."""
    answers = []
    for scan in (_lane.scan, _scan_lane):
        batch, left = Batch(), None if skip is None else set(skip)
        result = scan(memoryview(bytes(view)), BASE, CAPACITY, MAX_RECORD, 3, position, tail,
                      max_records, max_bytes, left, batch)
        answers.append((result, batch.records, batch.lanes, batch.positions, batch.skipped,
                        left))
    return answers[0], answers[1]


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, MAX_RECORD), max_size=12),
       start=st.integers(0, 200).map(lambda n: n * 16),
       max_records=st.integers(1, 20), max_bytes=st.integers(1, 3000),
       seed=st.integers(0, 2**32), flips=st.integers(0, 4), poison=st.integers(0, 3))
def test_the_compiled_scan_reads_what_the_python_scan_reads(
        sizes: list[int], start: int, max_records: int, max_bytes: int, seed: int, flips: int,
        poison: int) -> None:
    view, tail, positions = lane_with(sizes, start)
    randomly = random.Random(seed)
    for _ in range(flips):  # damage: any byte, or a header's size, kind or own position
        if positions and randomly.random() < 0.7:
            at = BASE + randomly.choice(positions) % CAPACITY
            size, kind, _, own = RECORD_HEADER.unpack_from(view, at)
            lie = randomly.randrange(3)
            RECORD_HEADER.pack_into(
                view, at, randomly.randrange(MAX_RECORD + 64) if lie == 0 else size,
                randomly.randrange(4) if lie == 1 else kind, 0,
                max(0, own + 16 * randomly.randrange(-2, 3)) if lie == 2 else own)
        else:
            view[BASE + randomly.randrange(CAPACITY)] = randomly.randrange(256)
    skip = set(randomly.sample(positions, min(poison, len(positions)))) if poison else None
    if randomly.random() < 0.2:  # a tail that is not where the records end
        tail = max(start, tail - 16 * randomly.randrange(1, 8))
    compiled, python = both(view, start, tail, max_records, max_bytes, skip)
    assert compiled == python
    for record, position in zip(compiled[1], compiled[3], strict=True):
        data = BASE + position % CAPACITY + 16  # nothing from outside the lane: each record
        assert data + len(record) <= BASE + CAPACITY  # is the lane's bytes after its header
        assert view[data:data + len(record)] == record


def test_a_well_formed_lane_is_read_whole_across_its_end() -> None:
    sizes = [300, 5, 250, 0, 100]
    view, tail, positions = lane_with(sizes, 640)
    compiled, python = both(view, 640, tail, 100, 1 << 20, {positions[2]})
    assert compiled == python
    (position, taken, nbytes, damaged), records, lanes, read_at, skipped, left = compiled
    assert (position, taken, damaged) == (tail, 5, False)
    assert [len(record) for record in records] == [300, 5, 0, 100]
    assert read_at == [positions[0], positions[1], positions[3], positions[4]]
    assert lanes == [3] * 4 and skipped == [(3, positions[2], 250)] and left == set()
    assert nbytes == 405 and positions[2] % CAPACITY == 0  # after a pad


def test_a_lane_outside_the_view_is_refused() -> None:
    for base in (len(GUARD) + 1, 1 << 40):
        with pytest.raises(ValueError):
            _lane.scan(memoryview(bytes(CAPACITY + 64)), base, CAPACITY, MAX_RECORD,
                               0, 0, 16, 1, 1, None, Batch())
    with pytest.raises(ValueError):  # not a power of two: the offset mask would be wrong
        _lane.scan(memoryview(bytes(4096)), 0, 1000, MAX_RECORD, 0, 0, 16, 1, 1,
                           None, Batch())
