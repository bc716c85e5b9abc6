"""The compiled lane append (`ringbuffer._lane`) against the Python one, its reference: the
same sequence of appends, reads and commits on two rings of one geometry leaves byte-identical
rings and the same results, including on lanes a hostile process damaged."""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pure_python import printed_forced_and_default

from moesif_fast import PURE_PYTHON
from moesif_fast.ringbuffer import Geometry, Producer, Reader, RingFile
from moesif_fast.ringbuffer import producer as producer_module
from moesif_fast.ringbuffer.layout import (
    APPENDED,
    CONSUMED,
    DROPPED_FULL,
    DROPPED_OVERSIZE,
    HEAD,
    TAIL,
    WORD_DECODING_LANE,
    WORD_DECODING_POSITION,
    WORD_READER_HEARTBEAT,
)

pytestmark = pytest.mark.skipif(producer_module._lane is None,
                                reason="the compiled lane append is not built or forced off")

GEOMETRY = Geometry(2, 1 << 16, 8)  # small lanes: wrapping, full lanes and the record limit
CONTROL_WORDS = 19  # of a lane: TAIL .. CORRUPT_RESETS


class Pair:
    """Two rings driven alike: one through the compiled append (the producer's Appender once it
    owns a lane, as in a worker), one through Python's."""

    def __init__(self, directory: str) -> None:
        self.rings = [RingFile.create(os.path.join(directory, name), GEOMETRY,
                                      locked_publish=False) for name in ("c", "python")]
        self.producers = [Producer(ring, preferred_lane=0) for ring in self.rings]
        python = self.producers[1]
        python._compiled_append = python._appender = None
        del python.append  # the class's append, in Python throughout
        self.readers = [Reader(ring) for ring in self.rings]
        del self.readers[1].mark, self.readers[1].clear_mark  # the class's, in Python

    def append(self, record: bytes) -> bool:
        results = [producer.append(record) for producer in self.producers]
        assert results[0] == results[1]
        return results[0]

    def read_and_commit(self, records: int) -> None:
        batches = [reader.read(records, 1 << 20) for reader in self.readers]
        assert batches[0].records == batches[1].records
        for reader, batch in zip(self.readers, batches, strict=True):
            reader.commit(batch)

    def poke(self, word: int, value: int) -> None:
        """What a hostile process with write access could do to a control word of lane 0."""
        for ring in self.rings:
            ring.words[ring.control_word(0, word)] = value

    def assert_identical(self) -> None:
        """Every lane's control words and data (the global header differs: its creation time
        and the readers' heartbeats)."""
        for lane in range(GEOMETRY.lane_count):
            c_ring, python_ring = self.rings
            control, data = c_ring.control_word(lane, 0), c_ring.lane_offset(lane)
            assert c_ring.words[control:control + CONTROL_WORDS].tolist() == \
                python_ring.words[control:control + CONTROL_WORDS].tolist()
            end = data + GEOMETRY.lane_capacity
            assert c_ring.bytes[data:end] == python_ring.bytes[data:end]

    def close(self) -> None:
        for producer, reader, ring in zip(self.producers, self.readers, self.rings, strict=True):
            producer.close()
            reader.close()
            ring.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    with tempfile.TemporaryDirectory() as directory:
        rings = Pair(directory)
        yield rings
        rings.close()


def test_appends_wraps_full_lanes_and_oversize_records_match_python(pair: Pair) -> None:
    random_bytes = random.Random(7).randbytes
    published = 0
    for number in range(3_000):
        size = (0, 1, 15, 16, 17, 1000, 5000, GEOMETRY.max_record,
                GEOMETRY.max_record + 1)[number % 9]
        published += pair.append(random_bytes(size))
        if number % 7 == 0:
            pair.read_and_commit(number % 11)
        pair.assert_identical()
    ring = pair.rings[0]
    counts = [ring.words[ring.control_word(0, word)]
              for word in (APPENDED, DROPPED_FULL, DROPPED_OVERSIZE)]
    assert counts[0] == published and counts[1] > 0 and counts[2] > 0  # every path was taken


LIMIT = 1 << 62  # layout.POSITION_LIMIT


@pytest.mark.parametrize("tail, head, appended, consumed", [
    (LIMIT - 16, LIMIT - 16, 0, 0),  # the last position a lane can publish from
    (LIMIT, LIMIT, 0, 0),  # past it: damaged
    (32, 48, 0, 0),  # tail behind head
    (40, 32, 0, 0),  # misaligned
    (1 << 16, 0, 0, 0),  # exactly full in bytes
    ((1 << 16) - 32, 0, 0, 0),  # room for one small record only
    (64, 64, 7, 0),  # one record below the record limit
    (64, 64, 8, 0),  # at the record limit
    (64, 64, 3, 5),  # more consumed than appended: damaged counters, not full
    (64, 64, (1 << 64) - 1, (1 << 64) - 9),  # counters about to wrap
])
def test_lane_states_at_every_boundary_match_python(pair: Pair, tail: int, head: int,
                                                    appended: int, consumed: int) -> None:
    pair.append(b"first")  # claims lane 0 in both
    for word, value in ((TAIL, tail), (HEAD, head), (APPENDED, appended), (CONSUMED, consumed)):
        pair.poke(word, value)
    for size in (1, 16, 100, 40_000):
        pair.append(bytes(size))
        pair.assert_identical()


CONTROL_VALUES = st.one_of(st.integers(0, 1 << 17), st.integers(0, (1 << 64) - 1),
                           st.sampled_from([0, 16, (1 << 62) - 16, 1 << 62, (1 << 64) - 16]))


@settings(max_examples=300, deadline=None)
@given(pokes=st.lists(st.tuples(st.sampled_from([TAIL, HEAD, APPENDED, CONSUMED]),
                                CONTROL_VALUES), max_size=4),
       sizes=st.lists(st.integers(0, GEOMETRY.max_record + 8), min_size=1, max_size=6))
def test_a_damaged_lane_gives_the_same_drops_and_bytes_as_python(
        pokes: list[tuple[int, int]], sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        pair = Pair(directory)
        try:
            pair.append(b"first")  # claims lane 0 in both
            for word, value in pokes:
                pair.poke(word, value)
            for size in sizes:
                pair.append(bytes(size))
                pair.assert_identical()
        finally:
            pair.close()


def test_arguments_outside_the_mapping_are_refused(pair: Pair) -> None:
    ring = pair.rings[0]
    append = producer_module._lane.append
    base = ring.lane_offset(0)
    for control, lane_base in ((len(ring.words), base), (-1, base),
                               (ring.control_word(0, 0), len(ring.bytes)),
                               (ring.control_word(0, 0), base + 8)):
        with pytest.raises(ValueError):
            append(ring.bytes, control, lane_base, GEOMETRY.lane_capacity, 100, 10, b"x")
    with pytest.raises(BufferError):
        append(bytes(len(ring.bytes)), ring.control_word(0, 0), base, GEOMETRY.lane_capacity,
               100, 10, b"x")  # read-only memory


def test_an_appender_appends_to_the_lane_it_owns_and_hands_records_over_otherwise(
        pair: Pair) -> None:
    ring, reader = pair.rings[0], pair.readers[0]
    handed: list[bytes] = []
    appender = producer_module._lane.Appender(handed.append)
    lane = (ring.control_word(1, 0), ring.lane_offset(1), GEOMETRY.lane_capacity,
            GEOMETRY.max_record, GEOMETRY.max_records)
    assert appender(b"before") is None  # list.append's answer
    appender.own(ring.bytes, *lane)
    assert appender(b"owned") is True
    assert appender(bytes(GEOMETRY.max_record + 1)) is False  # counted as oversize
    appender.release()
    assert appender(b"after") is None
    assert handed == [b"before", b"after"]
    assert reader.read(10, 1 << 20).records == [b"owned"]
    assert ring.words[ring.control_word(1, DROPPED_OVERSIZE)] == 1


def test_an_appender_refuses_a_lane_outside_the_mapping_and_keeps_handing_over(
        pair: Pair) -> None:
    ring = pair.rings[0]
    handed: list[bytes] = []
    appender = producer_module._lane.Appender(handed.append)
    with pytest.raises(ValueError):
        appender.own(ring.bytes, len(ring.words), ring.lane_offset(0), GEOMETRY.lane_capacity,
                     100, 10)
    with pytest.raises(BufferError):
        appender.own(bytes(len(ring.bytes)), ring.control_word(0, 0), ring.lane_offset(0),
                     GEOMETRY.lane_capacity, 100, 10)  # read-only memory
    with pytest.raises(TypeError):
        appender(b"one", b"two")
    appender(b"still handed over")
    assert handed == [b"still handed over"]


def test_a_reader_marks_in_c_what_it_marks_in_python(pair: Pair) -> None:
    marked_words = [WORD_DECODING_LANE, WORD_DECODING_POSITION]
    assert type(pair.readers[0].mark) is producer_module._lane.Marker
    for step, place in enumerate([(0, 5), (0, 9), (1, 9), (2, 0), (2, 2**63), (0, 0), None,
                                  (1, 3), None, None, (1, 4)]):  # None: clear the mark
        for reader in pair.readers:
            before = time.time_ns()
            if place is None:
                reader.clear_mark()
            else:
                reader.mark(*place)
                assert before <= reader.ring.words[WORD_READER_HEARTBEAT] <= time.time_ns()
        c_ring, python_ring = pair.rings
        assert [c_ring.words[word] for word in marked_words] == \
            [python_ring.words[word] for word in marked_words], step


def test_a_marker_refuses_words_outside_its_memory(pair: Pair) -> None:
    ring = pair.rings[0]
    marker = producer_module._lane.Marker(ring.words, len(ring.words), 0, 1)
    with pytest.raises(ValueError):
        marker(0, 1)
    with pytest.raises(ValueError):
        marker.clear()
    with pytest.raises(ValueError):
        producer_module._lane.Marker(ring.words, -1, 0, 1)
    read_only = producer_module._lane.Marker(bytes(64), 0, 1, 2)
    with pytest.raises(BufferError):
        read_only(0, 1)
    marker = producer_module._lane.Marker(ring.words, 0, 1, 2)
    for arguments, error in [((0,), TypeError), ((-1, 0), OverflowError),
                             ((0, 2**64), OverflowError), ((0, "1"), TypeError)]:
        with pytest.raises(error):
            marker(*arguments)


@pytest.mark.skipif(PURE_PYTHON, reason="this whole run is pure Python already")
def test_pure_python_leaves_the_extension_unimported() -> None:
    probe = ("import sys; from moesif_fast.ringbuffer import producer; "
             "print(producer._lane is None, 'moesif_fast.ringbuffer._lane' in sys.modules)")
    assert printed_forced_and_default(probe) == (["True", "False"], ["False", "True"])
