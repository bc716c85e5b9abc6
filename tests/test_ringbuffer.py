"""The shared-memory ring (`moesif_fast.ringbuffer`) under real processes, threads, signals,
SIGKILL and damaged files.

Every record these tests write describes itself (`make_record`): the id of the stream that wrote
it, that stream's sequence number, and a CRC-32 of everything else. The reader side can then
check exactly-once delivery, per-stream order and integrity without trusting the ring. Producer
processes are forked from the test process (multiprocessing "fork" context) and attach to the
ring by path, as gunicorn workers do; they report what `append` accepted through a pipe or
through shared memory. Timeouts here only stop a hang; nothing asserts on speed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesif_fast.ringbuffer import (
    Geometry,
    Producer,
    Reader,
    RingBusyError,
    RingFile,
    RingFormatError,
)
from moesif_fast.ringbuffer import producer as producer_module
from moesif_fast.ringbuffer.layout import (
    APPENDED,
    CONSUMED,
    CONTROL_BYTES,
    CONTROL_OFFSET,
    HEAD,
    HEADER_BYTES,
    TAIL,
    record_span,
)

KiB = 1 << 10
MiB = 1 << 20
FORK = multiprocessing.get_context("fork")
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
PATIENCE = 60.0  # seconds; only ever used to turn a hang into a failure
DROP_PAUSE = 0.0005  # a producer whose append was dropped waits this long before going on
SMALL = Geometry(lane_count=2, lane_capacity=64 * KiB, max_records=1000)

RECORD_META = struct.Struct("<IQ")  # stream id, sequence number
RECORD_CRC = struct.Struct("<I")  # CRC-32 of everything before it
MIN_RECORD = RECORD_META.size + RECORD_CRC.size
NOISE = random.Random(20240601).randbytes(256 * KiB)  # record bodies are slices of this

UNCLAIMED, ON_OVERFLOW = -2, -1  # lane codes in shared arrays: no record yet / overflow lane


# -- records --------------------------------------------------------------------------------


class CorruptRecord(ValueError):
    """A record that does not carry a valid checksum of its own contents."""


def make_record(stream: int, seq: int, size: int) -> bytes:
    """A checkable record of exactly `size` bytes (`MIN_RECORD` <= size <= 256 KiB)."""
    body_size = size - MIN_RECORD
    start = (stream * 7919 + seq * 104_729) % (len(NOISE) - body_size + 1)
    signed = RECORD_META.pack(stream, seq) + NOISE[start:start + body_size]
    return signed + RECORD_CRC.pack(zlib.crc32(signed))


def parse_record(payload: bytes) -> tuple[int, int]:
    """(stream, seq) of a record made by `make_record`; CorruptRecord if it fails its CRC."""
    if len(payload) < MIN_RECORD:
        raise CorruptRecord(f"a {len(payload)}-byte record is shorter than its own header")
    (crc,) = RECORD_CRC.unpack_from(payload, len(payload) - RECORD_CRC.size)
    if zlib.crc32(memoryview(payload)[:-RECORD_CRC.size]) != crc:
        raise CorruptRecord(f"a {len(payload)}-byte record fails its CRC")
    stream, seq = RECORD_META.unpack_from(payload)
    return stream, seq


def random_size(rng: random.Random, low: int, high: int) -> int:
    """A size in [low, high], log-uniform, with each bound itself drawn one time in twenty."""
    roll = rng.random()
    if roll < 0.05:
        return low
    if roll < 0.10:
        return high
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high)))))


def lane_code(lane: int | None) -> int:
    return ON_OVERFLOW if lane is None else lane


# -- the reading side -----------------------------------------------------------------------


class Drain:
    """The tests' shipper: reads and commits batches, checking and sorting every record."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.sequences: defaultdict[int, list[int]] = defaultdict(list)
        self.corrupt: list[bytes] = []

    def once(self, max_records: int = 256, max_bytes: int = 8 * MiB) -> int:
        """Read, check and commit one batch; the number of records it held."""
        batch = self.reader.read(max_records, max_bytes)
        for payload in batch.records:
            try:
                stream, seq = parse_record(payload)
            except CorruptRecord:
                self.corrupt.append(payload[:64])
            else:
                self.sequences[stream].append(seq)
        self.reader.commit(batch)
        return len(batch)

    def until_empty(self) -> None:
        for _ in range(100_000):
            if not self.once() and not self.reader.pending():
                return
        raise AssertionError("the ring never ran empty")

    def while_alive(self, processes: Sequence[BaseProcess]) -> None:
        """Drain until every process has exited, then drain what they left."""
        deadline = time.monotonic() + PATIENCE
        while any(process.is_alive() for process in processes):
            assert time.monotonic() < deadline, "producer processes did not finish in time"
            if not self.once():
                time.sleep(0.001)
        self.until_empty()


def read_all(reader: Reader) -> list[bytes]:
    """Every record ready in the ring, read in small batches and committed."""
    records: list[bytes] = []
    for _ in range(100_000):
        batch = reader.read(max_records=7, max_bytes=64 * KiB)
        if not batch.records:
            return records
        records.extend(batch.records)
        reader.commit(batch)
    raise AssertionError("the ring never ran empty")


def assert_delivered(drain: Drain, accepted: dict[int, list[int]]) -> None:
    """Every accepted record arrived exactly once, intact, in its stream's order, and nothing
    else arrived."""
    assert drain.corrupt == [], f"{len(drain.corrupt)} corrupt records arrived"
    expected = {stream: seqs for stream, seqs in accepted.items() if seqs}
    unexpected = sorted(set(drain.sequences) - set(expected))
    assert not unexpected, f"records arrived from streams with nothing accepted: {unexpected}"
    for stream, seqs in expected.items():
        received = drain.sequences.get(stream, [])
        missing = sorted(set(seqs) - set(received))
        assert not missing, (f"stream {stream}: {len(missing)} of {len(seqs)} accepted records "
                             f"never arrived (first {missing[:5]})")
        assert received == seqs, f"stream {stream}: duplicated, extra or reordered records"


# -- the producing side ---------------------------------------------------------------------


def append_patiently(producer: Producer, record: bytes, retry: bool) -> tuple[bool, int]:
    """Append `record`, pausing after every drop and, if `retry`, trying again (for at most
    PATIENCE seconds). Returns whether it was accepted and how many attempts were dropped."""
    drops = 0
    deadline = time.monotonic() + PATIENCE
    while not producer.append(record):
        drops += 1
        time.sleep(DROP_PAUSE)
        if not retry or time.monotonic() > deadline:
            return False, drops
    return True, drops


def produce_stream(path: str, stream: int, count: int, sizes: tuple[int, int], retry: bool,
                   conn: Connection, first_drops: Any = None, hold: Any = None) -> None:
    """A producer process: append `count` records of random sizes in `sizes` and send back
    which sequence numbers were accepted, how many attempts were dropped, the lane of the first
    accepted record and how many records went to the overflow lane.

    `first_drops` (a shared byte array) gets this stream's flag set at its first drop. `hold`
    (a barrier) is waited on after the first accepted record and again before exiting, so that
    every producer holds its lane (or overflow place) at the same time and no lane is freed
    while the others still run."""
    producer = Producer(RingFile.attach(path))
    rng = random.Random(stream)
    accepted: list[int] = []
    dropped = overflow_appends = 0
    first_lane: int | None = None
    for seq in range(count):
        ok, drops = append_patiently(producer, make_record(stream, seq, random_size(rng, *sizes)),
                                     retry)
        dropped += drops
        if drops and first_drops is not None:
            first_drops[stream] = 1
        if ok:
            overflow_appends += producer.lane is None
            if not accepted:
                first_lane = producer.lane
            accepted.append(seq)
        if seq == 0 and hold is not None:
            hold.wait(PATIENCE)
    if hold is not None:
        hold.wait(PATIENCE)
    conn.send({"stream": stream, "pid": os.getpid(), "accepted": accepted, "dropped": dropped,
               "first_lane": first_lane, "overflow_appends": overflow_appends})


def start_streams(spawn: Callable[..., BaseProcess], path: str, count: int, records: int,
                  sizes: tuple[int, int], retry: bool, first_drops: Any = None,
                  hold: Any = None) -> tuple[list[BaseProcess], list[Connection]]:
    """`count` producer processes running `produce_stream`, and the pipes of their reports."""
    processes, receivers = [], []
    for stream in range(count):
        receiver, sender = FORK.Pipe(duplex=False)
        processes.append(spawn(produce_stream, path, stream, records, sizes, retry, sender,
                               first_drops, hold))
        receivers.append(receiver)
    return processes, receivers


def collect_reports(processes: Sequence[BaseProcess], receivers: Sequence[Connection]
                    ) -> list[dict[str, Any]]:
    reports = []
    for process, receiver in zip(processes, receivers, strict=True):
        assert receiver.poll(PATIENCE), f"producer {process.pid} sent no report"
        reports.append(receiver.recv())
        process.join(PATIENCE)
        assert process.exitcode == 0, f"producer {process.pid} failed"
    return reports


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def ring_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="ring-test-", dir=SHM_DIR)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_ring(ring_dir: str) -> Iterator[Callable[..., RingFile]]:
    """Creates rings in this test's directory; unmaps them afterwards."""
    rings: list[RingFile] = []

    def make(geometry: Geometry, locked_publish: bool | None = None) -> RingFile:
        path = os.path.join(ring_dir, f"ring-{len(rings)}")
        rings.append(RingFile.create(path, geometry, locked_publish=locked_publish))
        return rings[-1]

    yield make
    for ring in rings:
        ring.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., BaseProcess]]:
    """Starts forked child processes; kills and reaps any still running afterwards."""
    started: list[BaseProcess] = []

    def start(target: Callable[..., None], *args: Any) -> BaseProcess:
        process = FORK.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(PATIENCE)


# -- many producer processes ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("locked_publish", [False, True], ids=["plain-stores", "locked-publish"])
def test_concurrent_producers_deliver_every_accepted_record_once_in_order(
        make_ring: Callable[..., RingFile], spawn: Callable[..., BaseProcess],
        locked_publish: bool) -> None:
    """Four producer processes stream records of 100 B to 200 KB while one reader drains."""
    producers, records = 4, 1500
    ring = make_ring(Geometry(producers + 1, 1 * MiB, 100_000), locked_publish=locked_publish)
    assert ring.locked_publish is locked_publish
    drain = Drain(Reader(ring))
    processes, receivers = start_streams(spawn, ring.path, producers, records, (100, 200_000),
                                         retry=True)
    drain.while_alive(processes)
    reports = collect_reports(processes, receivers)

    assert_delivered(drain, {report["stream"]: report["accepted"] for report in reports})
    for report in reports:  # with retries, every record was eventually accepted
        assert report["accepted"] == list(range(records))
    stats = ring.stats()
    lanes = [report["first_lane"] for report in reports]
    assert sorted(lanes) == list(range(producers)), "each producer should own a dedicated lane"
    for report in reports:
        lane = stats.lanes[report["first_lane"]]
        assert lane.owner_pid == report["pid"]
        assert (lane.appended, lane.consumed) == (records, records)
        assert lane.dropped_full == report["dropped"]
        assert lane.bytes_in_use == 0
        assert lane.corrupt_resets == 0
        sync_lock = ring.lock_path(f"sync-{lane.lane:03d}")
        assert os.path.exists(sync_lock) is locked_publish
    assert stats.lanes[ring.overflow_lane].appended == 0
    assert stats.committed_records == producers * records


@pytest.mark.slow
def test_a_small_ring_counts_its_drops_and_still_delivers_every_accepted_record(
        make_ring: Callable[..., RingFile], spawn: Callable[..., BaseProcess]) -> None:
    """Lanes of 64 KiB: the reader only starts once every producer has seen a drop, then drains
    while they keep going (pausing, not retrying, after each drop)."""
    producers, records = 3, 4000
    ring = make_ring(Geometry(producers + 1, 64 * KiB, 100_000))
    first_drops = FORK.RawArray("b", producers)
    processes, receivers = start_streams(spawn, ring.path, producers, records,
                                         (100, ring.geometry.max_record), retry=False,
                                         first_drops=first_drops)
    deadline = time.monotonic() + PATIENCE
    while not all(first_drops) and any(process.is_alive() for process in processes):
        assert time.monotonic() < deadline, "producers never filled their lanes"
        time.sleep(0.001)
    drain = Drain(Reader(ring))
    drain.while_alive(processes)
    reports = collect_reports(processes, receivers)

    assert_delivered(drain, {report["stream"]: report["accepted"] for report in reports})
    stats = ring.stats()
    for report in reports:
        assert report["dropped"] > 0
        assert report["dropped"] + len(report["accepted"]) == records
        lane = stats.lanes[report["first_lane"]]
        assert lane.dropped_full == report["dropped"]
        assert lane.appended == len(report["accepted"])
        assert (lane.dropped_oversize, lane.dropped_busy) == (0, 0)
    assert sum(lane.dropped_full for lane in stats.lanes) == sum(r["dropped"] for r in reports)


@pytest.mark.slow
def test_producers_beyond_the_dedicated_lanes_share_the_overflow_lane(
        make_ring: Callable[..., RingFile], spawn: Callable[..., BaseProcess]) -> None:
    """Five producer processes, two dedicated lanes: three append through the overflow lane."""
    producers, records = 5, 300
    ring = make_ring(Geometry(3, 1 * MiB, 100_000))
    drain = Drain(Reader(ring))
    processes, receivers = start_streams(spawn, ring.path, producers, records, (100, 20_000),
                                         retry=True, hold=FORK.Barrier(producers))
    drain.while_alive(processes)
    reports = collect_reports(processes, receivers)

    assert_delivered(drain, {report["stream"]: report["accepted"] for report in reports})
    for report in reports:
        assert report["accepted"] == list(range(records))
    first_lanes = sorted(lane_code(report["first_lane"]) for report in reports)
    assert first_lanes == [ON_OVERFLOW] * 3 + [0, 1]
    stats = ring.stats()
    overflow = stats.lanes[ring.overflow_lane]
    assert overflow.overflow
    assert overflow.appended == sum(report["overflow_appends"] for report in reports)
    assert overflow.appended == 3 * records
    assert overflow.consumed == overflow.appended
    assert sum(lane.appended for lane in stats.lanes[:2]) == 2 * records


def open_and_append(path: str, stream: int, conn: Connection) -> None:
    ring = RingFile.open(path, SMALL)
    accepted, _ = append_patiently(Producer(ring), make_record(stream, 0, 200), retry=True)
    conn.send(accepted)


def test_processes_racing_to_open_a_ring_share_one_file(
        ring_dir: str, spawn: Callable[..., BaseProcess]) -> None:
    path = os.path.join(ring_dir, "ring")
    processes, receivers = [], []
    for stream in range(4):
        receiver, sender = FORK.Pipe(duplex=False)
        processes.append(spawn(open_and_append, path, stream, sender))
        receivers.append(receiver)
    accepted = [receiver.recv() if receiver.poll(PATIENCE) else None for receiver in receivers]
    for process in processes:
        process.join(PATIENCE)
        assert process.exitcode == 0
    assert accepted == [True] * 4
    ring = RingFile.attach(path, SMALL)
    try:
        reader = Reader(ring)
        streams = sorted(parse_record(record)[0] for record in read_all(reader))
        reader.close()
    finally:
        ring.close()
    assert streams == [0, 1, 2, 3]


# -- lane mechanics -------------------------------------------------------------------------


def test_records_survive_many_laps_of_a_lane(make_ring: Callable[..., RingFile]) -> None:
    """Records of every size up to max_record, wrapping (with pad records) forty times."""
    ring = make_ring(SMALL)
    capacity, max_record = ring.geometry.lane_capacity, ring.geometry.max_record
    producer, reader = Producer(ring), Reader(ring)
    rng = random.Random(7)
    appended: list[bytes] = []
    received: list[bytes] = []
    lane_bytes = 0
    while lane_bytes < 40 * capacity:
        # one record (max_record is half a lane) and its pad always fit an empty lane
        size = rng.choice([MIN_RECORD, max_record, rng.randint(MIN_RECORD, max_record)])
        record = make_record(0, len(appended), size)
        assert producer.append(record)
        appended.append(record)
        lane_bytes += record_span(size)
        received.extend(read_all(reader))
    assert received == appended
    lane = ring.stats().lanes[producer.lane]
    assert (lane.appended, lane.consumed) == (len(appended), len(appended))
    assert (lane.bytes_in_use, lane.corrupt_resets, lane.dropped_full) == (0, 0, 0)


def test_a_record_of_max_record_bytes_fits_and_one_byte_more_is_dropped(
        make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(SMALL)
    max_record = ring.geometry.max_record
    assert ring.stats().max_record == max_record
    producer, reader = Producer(ring), Reader(ring)
    biggest = make_record(0, 0, max_record)
    assert producer.append(biggest)
    assert not producer.append(make_record(0, 1, max_record + 1))
    assert not producer.append(bytes(4 * MiB))
    lane = ring.stats().lanes[producer.lane]
    assert (lane.appended, lane.dropped_oversize, lane.dropped_full) == (1, 2, 0)
    assert read_all(reader) == [biggest]


def test_an_empty_record_round_trips(make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(SMALL)
    producer, reader = Producer(ring), Reader(ring)
    assert producer.append(b"")
    assert producer.append(b"after the empty one")
    assert read_all(reader) == [b"", b"after the empty one"]
    assert ring.stats().lanes[producer.lane].appended == 2


def test_a_full_lane_drops_at_once_and_accepts_again_after_a_commit(
        make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(SMALL)
    producer, reader = Producer(ring), Reader(ring)
    accepted: list[bytes] = []
    while producer.append(record := make_record(0, len(accepted), 4000)):
        accepted.append(record)
        assert len(accepted) < 1000, "a 64 KiB lane never filled up"
    assert len(accepted) == ring.geometry.lane_capacity // record_span(4000)
    lane = ring.stats().lanes[producer.lane]
    assert (lane.dropped_full, lane.appended) == (1, len(accepted))
    assert reader.fill() == lane.bytes_in_use / ring.geometry.lane_capacity > 0.9

    batch = reader.read(max_records=3, max_bytes=1 * MiB)
    assert batch.records == accepted[:3]
    assert not producer.append(record), "reading alone must not free space"
    reader.commit(batch)
    assert producer.append(record)
    assert ring.stats().lanes[producer.lane].dropped_full == 2
    assert read_all(reader) == accepted[3:] + [record]


def test_max_records_bounds_the_unconsumed_records_of_a_lane(
        make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(Geometry(lane_count=2, lane_capacity=64 * KiB, max_records=5))
    producer, reader = Producer(ring), Reader(ring)
    records = [make_record(0, seq, 32) for seq in range(8)]
    for record in records[:5]:
        assert producer.append(record)
    assert not producer.append(records[5])
    lane = ring.stats().lanes[producer.lane]
    assert (lane.dropped_full, lane.records_in_use) == (1, 5)
    assert lane.bytes_in_use < ring.geometry.lane_capacity // 4  # bytes were not the limit
    assert reader.fill() == 1.0

    batch = reader.read(max_records=2, max_bytes=1 * MiB)
    assert not producer.append(records[5]), "read but uncommitted records still count"
    assert reader.fill() == 1.0
    reader.commit(batch)
    assert reader.fill() == 3 / 5
    assert producer.append(records[5])
    assert producer.append(records[6])
    assert not producer.append(records[7])
    assert ring.stats().lanes[producer.lane].dropped_full == 3
    assert batch.records + read_all(reader) == records[:7]


# -- SIGKILL chaos --------------------------------------------------------------------------

CHAOS_LANES = 4
CHAOS_KILLS = 100
CHAOS_STREAMS = CHAOS_LANES + CHAOS_KILLS


def chaos_producer(path: str, stream: int, acked: Any, lanes: Any, stop: Any) -> None:
    """Streams records until stopped or killed. After `append` returns True, and only then, it
    acknowledges the record by storing the count of accepted records in `acked[stream]` (one
    aligned 8-byte store to shared memory). A dropped record is retried under the same
    sequence number, so a stream's sequence has no holes."""
    producer = Producer(RingFile.attach(path))
    rng = random.Random(stream)
    seq = 0
    while not stop.value:
        if not producer.append(make_record(stream, seq, random_size(rng, 100, 200_000))):
            time.sleep(DROP_PAUSE)
            continue
        if seq == 0:
            lanes[stream] = lane_code(producer.lane)
        seq += 1
        acked[stream] = seq


@pytest.mark.slow
def test_sigkilled_producers_never_lose_an_acknowledged_record(
        make_ring: Callable[..., RingFile], spawn: Callable[..., BaseProcess]) -> None:
    """Four producer processes; a hundred times, one of them is SIGKILLed at a random moment of its
    stream and replaced by a new one, while the reader drains. A killed producer may have
    appended one record it did not live to acknowledge; nothing else may differ."""
    ring = make_ring(Geometry(CHAOS_LANES + 1, 1 * MiB, 100_000))
    acked = FORK.RawArray("Q", CHAOS_STREAMS)
    lanes = FORK.RawArray("q", [UNCLAIMED] * CHAOS_STREAMS)
    stop = FORK.RawValue("b", 0)
    drain = Drain(Reader(ring))
    rng = random.Random(11)
    pids: dict[int, int] = {}
    live: dict[int, BaseProcess] = {}
    victim_lanes: dict[int, int] = {}  # replacement stream → lane its victim held
    killed: list[int] = []

    def start(stream: int) -> None:
        live[stream] = spawn(chaos_producer, ring.path, stream, acked, lanes, stop)
        pids[stream] = live[stream].pid

    def all_claimed() -> bool:
        return all(lanes[stream] != UNCLAIMED for stream in live)

    for stream in range(CHAOS_LANES):
        start(stream)
    deadline = time.monotonic() + PATIENCE
    next_kill = time.monotonic()
    while len(killed) < CHAOS_KILLS:
        assert time.monotonic() < deadline, f"only {len(killed)} kills before the deadline"
        if not drain.once():
            time.sleep(0.0005)
        # Kill only when every live producer holds its lane, so the replacement finds exactly
        # one free lane: the victim's, freed by the kernel once the victim is reaped.
        if time.monotonic() < next_kill or not all_claimed():
            continue
        victim = rng.choice(sorted(live))
        process = live.pop(victim)
        os.kill(process.pid, signal.SIGKILL)
        process.join(PATIENCE)
        assert process.exitcode == -signal.SIGKILL
        killed.append(victim)
        victim_lanes[len(pids)] = lanes[victim]
        start(len(pids))
        next_kill = time.monotonic() + rng.uniform(0.005, 0.06)
    while not all_claimed():
        assert time.monotonic() < deadline, "a replacement never appended"
        drain.once()
    stop.value = 1
    drain.while_alive(list(live.values()))
    assert all(process.exitcode == 0 for process in live.values())

    assert drain.corrupt == [], f"{len(drain.corrupt)} corrupt records arrived"
    assert set(drain.sequences) <= set(pids)
    for stream in pids:
        received = drain.sequences.get(stream, [])
        assert received == list(range(len(received))), \
            f"stream {stream}: a gap, a duplicate or a reordering"
        if stream in killed:
            assert acked[stream] <= len(received) <= acked[stream] + 1, \
                f"stream {stream}: acknowledged {acked[stream]}, received {len(received)}"
        else:
            assert len(received) == acked[stream], f"stream {stream}"
    assert sum(acked) > 0
    # The kernel freed each victim's lane and its replacement claimed exactly that lane.
    assert ON_OVERFLOW not in list(lanes)
    for replacement, lane in victim_lanes.items():
        assert lanes[replacement] == lane, f"stream {replacement} did not re-claim lane {lane}"
    stats = ring.stats()
    assert stats.lanes[ring.overflow_lane].appended == 0
    for lane in range(CHAOS_LANES):
        holders = [stream for stream in sorted(pids) if lanes[stream] == lane]
        assert stats.lanes[lane].owner_pid == pids[holders[-1]]
        assert stats.lanes[lane].bytes_in_use == 0
        assert stats.lanes[lane].corrupt_resets == 0


# -- fork, threads, signals -----------------------------------------------------------------


def append_and_report_lane(producer: Producer, stream: int, count: int,
                           conn: Connection) -> None:
    """In a forked child: keep using the producer object inherited from the parent."""
    accepted = [seq for seq in range(count) if producer.append(make_record(stream, seq, 500))]
    conn.send({"lane": producer.lane, "pid": os.getpid(), "accepted": accepted})


def test_a_forked_child_appends_to_a_lane_of_its_own(
        make_ring: Callable[..., RingFile], spawn: Callable[..., BaseProcess]) -> None:
    ring = make_ring(Geometry(4, 64 * KiB, 1000))
    producer = Producer(ring)
    for seq in range(10):
        assert producer.append(make_record(0, seq, 500))
    parent_lane = producer.lane
    assert parent_lane is not None

    receiver, sender = FORK.Pipe(duplex=False)
    child = spawn(append_and_report_lane, producer, 1, 10, sender)
    for seq in range(10, 20):  # the parent keeps appending while the child does
        assert producer.append(make_record(0, seq, 500))
    assert receiver.poll(PATIENCE)
    child_report = receiver.recv()
    child.join(PATIENCE)
    assert child.exitcode == 0

    assert producer.lane == parent_lane
    assert child_report["lane"] is not None
    assert child_report["lane"] != parent_lane
    stats = ring.stats()
    assert stats.lanes[parent_lane].owner_pid == os.getpid()
    assert stats.lanes[child_report["lane"]].owner_pid == child_report["pid"]
    drain = Drain(Reader(ring))
    drain.until_empty()
    assert child_report["accepted"] == list(range(10))
    assert_delivered(drain, {0: list(range(20)), 1: child_report["accepted"]})
    producer.close()


def test_a_closed_producer_never_writes_to_the_lane_it_released(
        make_ring: Callable[..., RingFile]) -> None:
    """Its next append claims a lane again: the lane it released may be another's by then."""
    ring = make_ring(Geometry(4, 64 * KiB, 1000))
    first, second = Producer(ring, preferred_lane=0), Producer(ring, preferred_lane=0)
    assert first.append(make_record(0, 0, 500))
    assert first.lane == 0
    first.close()
    assert second.append(make_record(1, 0, 500))
    assert second.lane == 0
    assert first.append(make_record(0, 1, 500))
    assert first.lane == 1
    assert second.append(make_record(1, 1, 500))
    drain = Drain(Reader(ring))
    drain.until_empty()
    assert_delivered(drain, {0: [0, 1], 1: [0, 1]})
    assert ring.stats().lanes[0].corrupt_resets == 0
    first.close()
    second.close()


def test_eight_threads_sharing_a_producer_deliver_every_record_once(
        make_ring: Callable[..., RingFile]) -> None:
    """Eight threads append through one Producer (one lane, 256 KiB, so it fills and they
    retry) while the main thread drains; a tiny switch interval interleaves them mid-append."""
    threads_count, per_thread = 8, 1500
    ring = make_ring(Geometry(2, 256 * KiB, 100_000))
    producer = Producer(ring)
    drain = Drain(Reader(ring))
    accepted: dict[int, list[int]] = {}
    drops: dict[int, int] = {}

    def run(stream: int) -> None:
        rng = random.Random(stream)
        mine, dropped = [], 0
        for seq in range(per_thread):
            record = make_record(stream, seq, random_size(rng, 100, 4000))
            ok, attempts_dropped = append_patiently(producer, record, retry=True)
            dropped += attempts_dropped
            if ok:
                mine.append(seq)
        accepted[stream], drops[stream] = mine, dropped

    threads = [threading.Thread(target=run, args=(stream,)) for stream in range(threads_count)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + PATIENCE
        while any(thread.is_alive() for thread in threads):
            assert time.monotonic() < deadline, "appending threads did not finish in time"
            if not drain.once():
                time.sleep(0.001)
    finally:
        sys.setswitchinterval(switch_interval)
        for thread in threads:
            thread.join(PATIENCE)
    drain.until_empty()

    assert all(accepted[stream] == list(range(per_thread)) for stream in accepted)
    assert_delivered(drain, accepted)
    lane = ring.stats().lanes[producer.lane]
    assert lane.appended == threads_count * per_thread
    assert lane.dropped_full == sum(drops.values())
    assert lane.dropped_busy == 0


MAIN_STREAM, HANDLER_STREAM = 0, 1


def append_under_a_fast_timer(path: str, conn: Connection) -> None:
    """In a child: SIGALRM every 200 µs runs a handler that appends, while the main loop
    appends 100-byte records back to back. Reports what each side had accepted."""
    producer = Producer(RingFile.attach(path))
    handler = {"calls": 0, "accepted": 0, "dropped": 0, "running": False}

    def on_alarm(signum: int, frame: object) -> None:
        if handler["running"]:  # a second alarm inside this handler: not the case under test
            return
        handler["running"] = True
        try:
            handler["calls"] += 1
            if producer.append(make_record(HANDLER_STREAM, handler["accepted"], 64)):
                handler["accepted"] += 1
            else:
                handler["dropped"] += 1
        finally:
            handler["running"] = False

    main_dropped = [] if producer.append(make_record(MAIN_STREAM, 0, 100)) else [0]
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    seq = 1
    deadline = time.monotonic() + PATIENCE / 3
    while ((seq < 20_000 or handler["calls"] < 300) and seq < 60_000 and handler["calls"] < 5000
           and time.monotonic() < deadline):
        if not producer.append(make_record(MAIN_STREAM, seq, 100)):
            main_dropped.append(seq)
        seq += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    conn.send({"main_attempts": seq, "main_dropped": main_dropped, **handler})


@pytest.mark.slow
def test_a_signal_handler_appending_in_the_middle_of_an_append_does_not_deadlock(
        make_ring: Callable[..., RingFile], spawn: Callable[..., BaseProcess]) -> None:
    """In Python an alarm lands inside some appends: the handler's append is then dropped and
    counted. The compiled append to an owned lane is one C call, inside which no handler runs:
    the handler's appends are then all accepted."""
    ring = make_ring(Geometry(2, 16 * MiB, 1_000_000))  # big enough never to fill
    receiver, sender = FORK.Pipe(duplex=False)
    child = spawn(append_under_a_fast_timer, ring.path, sender)
    if not receiver.poll(PATIENCE):
        child.kill()
        pytest.fail("append deadlocked when a signal handler appended in the middle of it")
    report = receiver.recv()
    child.join(PATIENCE)
    assert child.exitcode == 0

    assert report["main_dropped"] == [], "the main loop's appends are never nested"
    if producer_module._lane is None:
        assert report["dropped"] > 0, "no alarm landed inside an append: nothing was tested"
    else:
        assert report["dropped"] == 0, "a handler ran inside a compiled append"
    assert report["accepted"] > 0
    drain = Drain(Reader(ring))
    drain.until_empty()
    assert_delivered(drain, {MAIN_STREAM: list(range(report["main_attempts"])),
                             HANDLER_STREAM: list(range(report["accepted"]))})
    stats = ring.stats()
    assert sum(lane.dropped_busy for lane in stats.lanes) == report["dropped"]
    assert sum(lane.dropped_full + lane.dropped_oversize for lane in stats.lanes) == 0


def test_an_append_reentered_while_claiming_a_lane_is_counted_as_dropped(
        make_ring: Callable[..., RingFile], monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal whose handler appends arrives during the first append, while the producer is
    still claiming its lane (the ring's lock-file opener raises it). The nested append must be
    dropped and, like every drop, counted."""
    ring = make_ring(SMALL)
    producer = Producer(ring)
    nested: list[bool] = []
    open_lock = ring.open_lock

    def open_lock_with_a_signal(name: str) -> int:
        if not nested:
            signal.raise_signal(signal.SIGUSR1)
        return open_lock(name)

    monkeypatch.setattr(ring, "open_lock", open_lock_with_a_signal)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: nested.append(
        producer.append(b"from the signal handler")))
    try:
        assert producer.append(b"outer")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert nested == [False]
    assert producer.lane is not None
    stats = ring.stats()
    assert stats.dropped == 1, "the nested append returned False but no drop counter moved"
    assert stats.lanes[producer.lane].dropped_busy == 1


# -- the reader: restarts and commits -------------------------------------------------------


@pytest.fixture
def ten_records(make_ring: Callable[..., RingFile]) -> tuple[RingFile, list[bytes], int]:
    """A ring holding ten unread records in one lane: (ring, records, lane)."""
    ring = make_ring(SMALL)
    producer = Producer(ring)
    records = [make_record(0, seq, 100 + 37 * seq) for seq in range(10)]
    for record in records:
        assert producer.append(record)
    assert producer.lane is not None
    return ring, records, producer.lane


def test_a_restarted_reader_rereads_an_uncommitted_batch(
        ten_records: tuple[RingFile, list[bytes], int]) -> None:
    ring, records, lane = ten_records
    reader = Reader(ring)
    first = reader.read(max_records=4, max_bytes=1 * MiB)
    assert first.records == records[:4]
    reader.close()  # the shipper died before the collector acknowledged the batch

    reader = Reader(ring)
    again = reader.read(max_records=4, max_bytes=1 * MiB)
    assert again.records == records[:4]
    reader.commit(again)
    reader.close()

    reader = Reader(ring)
    assert read_all(reader) == records[4:]
    reader.close()
    stats = ring.stats()
    assert stats.committed_records == 10
    assert (stats.lanes[lane].consumed, stats.lanes[lane].bytes_in_use) == (10, 0)


def test_a_newer_batch_committed_first_releases_nothing_until_the_older_one_is(
        ten_records: tuple[RingFile, list[bytes], int]) -> None:
    ring, records, lane = ten_records
    spans = [record_span(len(record)) for record in records]

    reader = Reader(ring)
    older = reader.read(max_records=2, max_bytes=1 * MiB)
    newer = reader.read(max_records=2, max_bytes=1 * MiB)
    assert (older.records, newer.records) == (records[:2], records[2:4])
    reader.commit(newer)
    stats = ring.stats()
    assert (stats.lanes[lane].consumed, stats.committed_records) == (0, 0)
    assert stats.lanes[lane].bytes_in_use == sum(spans)
    reader.close()  # restart with the older batch undelivered: both are read again

    reader = Reader(ring)
    older = reader.read(max_records=2, max_bytes=1 * MiB)
    newer = reader.read(max_records=2, max_bytes=1 * MiB)
    assert (older.records, newer.records) == (records[:2], records[2:4])
    reader.commit(newer)
    assert ring.stats().lanes[lane].consumed == 0
    reader.commit(older)  # now both are released
    stats = ring.stats()
    assert (stats.lanes[lane].consumed, stats.committed_records) == (4, 4)
    assert stats.lanes[lane].bytes_in_use == sum(spans[4:])
    reader.close()

    reader = Reader(ring)
    assert read_all(reader) == records[4:]
    reader.close()


def test_records_read_into_an_open_batch_are_released_only_with_it(
        ten_records: tuple[RingFile, list[bytes], int]) -> None:
    ring, records, lane = ten_records
    reader = Reader(ring)
    batch = reader.read(max_records=2, max_bytes=1 * MiB)
    assert reader.read(max_records=3, max_bytes=1 * MiB, into=batch) is batch
    assert batch.records == records[:5]
    reader.close()  # a restart before the commit reads the whole extended batch again

    reader = Reader(ring)
    batch = reader.read(max_records=2, max_bytes=1 * MiB)
    reader.read(max_records=3, max_bytes=1 * MiB, into=batch)
    assert batch.records == records[:5]
    reader.commit(batch)
    assert ring.stats().lanes[lane].consumed == 5
    reader.close()

    reader = Reader(ring)
    assert read_all(reader) == records[5:]
    reader.close()


def test_extending_an_older_batch_never_releases_a_newer_uncommitted_one(
        ten_records: tuple[RingFile, list[bytes], int]) -> None:
    """`read(into=batch)` takes "an uncommitted batch from this reader". Whether it extends
    the older of two open batches or refuses to, committing the older batch must leave the
    newer, undelivered one in the ring for the next reader."""
    ring, records, _ = ten_records
    reader = Reader(ring)
    older = reader.read(max_records=2, max_bytes=1 * MiB)
    newer = reader.read(max_records=2, max_bytes=1 * MiB)
    assert newer.records == records[2:4]
    with contextlib.suppress(ValueError):
        reader.read(max_records=2, max_bytes=1 * MiB, into=older)
    reader.commit(older)
    reader.close()  # the newer batch was never delivered

    reader = Reader(ring)
    again = read_all(reader)
    reader.close()
    lost = [records.index(record) for record in records[2:] if record not in again]
    assert not lost, f"records {lost} were released without being delivered"


HOLD_A_READER = """
import sys
from moesif_fast.ringbuffer import Reader, RingFile
reader = Reader(RingFile.attach(sys.argv[1]))
print("reading", flush=True)
sys.stdin.readline()
reader.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_a_second_reader_is_refused_naming_the_holder(make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(SMALL)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_READER, ring.path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "reading\n"
        with pytest.raises(RingBusyError, match=rf"\(pid {holder.pid}\)"):
            Reader(ring)
        assert ring.stats().reader_pid == holder.pid

        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        reader = Reader(ring)  # the holder still runs, but gave the role up
        assert ring.stats().reader_pid == os.getpid()
        with pytest.raises(RingBusyError, match=rf"\(pid {os.getpid()}\)"):
            Reader(ring)  # a second reader in the same process is refused too
        reader.close()
    finally:
        holder.kill()
        holder.wait(PATIENCE)


def test_the_reader_role_is_freed_when_its_process_is_killed(
        make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(SMALL)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_READER, ring.path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "reading\n"
        with pytest.raises(RingBusyError):
            Reader(ring)
    finally:
        holder.kill()
        holder.wait(PATIENCE)
    Reader(ring).close()


# -- damaged rings ---------------------------------------------------------------------------


def test_a_damaged_record_header_resets_only_its_own_lane(
        make_ring: Callable[..., RingFile]) -> None:
    ring = make_ring(Geometry(3, 64 * KiB, 1000))
    damaged, healthy = Producer(ring, preferred_lane=0), Producer(ring, preferred_lane=1)
    damaged_records = [make_record(0, seq, 300) for seq in range(3)]
    healthy_records = [make_record(1, seq, 300) for seq in range(3)]
    for damaged_record, healthy_record in zip(damaged_records, healthy_records, strict=True):
        assert damaged.append(damaged_record)
        assert healthy.append(healthy_record)
    assert (damaged.lane, healthy.lane) == (0, 1)
    reader = Reader(ring)
    second_header = ring.lane_offset(0) + record_span(300)
    ring.bytes[second_header + 8] ^= 0xFF  # the header's own-position field

    received = read_all(reader)
    assert [record for record in received if parse_record(record)[0] == 0] == damaged_records[:1]
    assert [record for record in received if parse_record(record)[0] == 1] == healthy_records
    stats = ring.stats()
    assert (stats.lanes[0].corrupt_resets, stats.lanes[1].corrupt_resets) == (1, 0)
    after_reset = make_record(0, 3, 300)
    assert damaged.append(after_reset)
    assert read_all(reader) == [after_reset]


def test_the_reader_never_reads_outside_a_lane_whose_head_is_misaligned(
        make_ring: Callable[..., RingFile]) -> None:
    """A stray write left the last lane's committed head 8 bytes before a lap boundary (not a
    multiple of 16) and below its tail. A reader attaching must reset the lane, not unpack a
    record header that runs past the lane (here: past the end of the mapping)."""
    ring = make_ring(SMALL)
    producer, reader = Producer(ring), Reader(ring)
    assert producer.append(make_record(0, 0, 100))
    assert producer.lane == 0
    filler = Producer(ring)  # every dedicated lane is taken: it writes to the last lane
    for seq in range(100):
        assert filler.append(make_record(1, seq, 1000))
        read_all(reader)
    reader.close()
    lane = ring.overflow_lane
    tail = ring.words[ring.control_word(lane, TAIL)]
    assert tail > ring.geometry.lane_capacity
    lap_start = tail & -ring.geometry.lane_capacity
    ring.words[ring.control_word(lane, HEAD)] = lap_start - 8

    reader = Reader(ring)
    assert read_all(reader) == []
    assert ring.stats().lanes[lane].corrupt_resets == 1
    reader.close()


def test_append_after_the_reader_reset_a_lane_to_a_misaligned_tail_does_not_raise(
        make_ring: Callable[..., RingFile]) -> None:
    """A stray write set a lane's tail to 8 bytes before the lane's end; the reader resets the
    lane there. The owner's next append must return True or False, never raise."""
    ring = make_ring(SMALL)
    producer, reader = Producer(ring), Reader(ring)
    assert producer.append(make_record(0, 0, 100))
    ring.words[ring.control_word(producer.lane, TAIL)] = ring.geometry.lane_capacity - 8
    read_all(reader)
    assert ring.stats().lanes[producer.lane].corrupt_resets == 1
    assert producer.append(make_record(0, 1, 100)) in (True, False)


class FuzzRing:
    """A ring whose three lanes each passed one lap and then got 4-12 unread records."""

    def __init__(self, ring: RingFile, unread: list[list[bytes]],
                 header_offsets: list[list[int]]) -> None:
        self.ring = ring
        self.pristine = bytes(ring.bytes)  # the whole file, restored before each example
        self.unread = unread  # per lane
        self.header_offsets = header_offsets  # per lane: where each unread record starts

    def __repr__(self) -> str:  # short, for hypothesis' report of a failing example
        return f"FuzzRing({self.ring.path!r})"


FUZZ_GEOMETRY = Geometry(lane_count=3, lane_capacity=64 * KiB, max_records=100_000)
FUZZ_CAPACITY = FUZZ_GEOMETRY.lane_capacity


@pytest.fixture(scope="module")
def fuzz_ring() -> Iterator[FuzzRing]:
    directory = tempfile.mkdtemp(prefix="ring-fuzz-", dir=SHM_DIR)
    try:
        fuzz = build_fuzz_ring(os.path.join(directory, "ring"))
        yield fuzz
        fuzz.ring.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_fuzz_ring(path: str) -> FuzzRing:
    ring = RingFile.create(path, FUZZ_GEOMETRY)
    producers = [Producer(ring, preferred_lane=0), Producer(ring, preferred_lane=1)]
    producers.append(Producer(ring))  # claimed last, so it lands on the overflow lane
    reader = Reader(ring)
    rng = random.Random(3)
    for lane, producer in enumerate(producers):  # more than one lap through every lane
        moved, seq = 0, 0
        while moved < FUZZ_CAPACITY + rng.randrange(FUZZ_CAPACITY):
            size = rng.randint(MIN_RECORD, 3000)
            assert producer.append(make_record(lane, seq, size))
            read_all(reader)
            moved, seq = moved + record_span(size), seq + 1
        assert producer.lane == (lane if lane < ring.overflow_lane else None)
    reader.close()
    unread: list[list[bytes]] = [[] for _ in producers]
    header_offsets: list[list[int]] = [[] for _ in producers]
    for lane, producer in enumerate(producers):
        for seq in range(10_000, 10_000 + rng.randint(4, 12)):
            record = make_record(lane, seq, rng.randint(MIN_RECORD, 3000))
            assert producer.append(record)
            tail = ring.words[ring.control_word(lane, TAIL)]
            unread[lane].append(record)
            header_offsets[lane].append((tail - record_span(len(record))) % FUZZ_CAPACITY)
    for producer in producers:  # only now: a freed lane would draw the overflow producer in
        producer.close()
    assert [lane.records_in_use for lane in ring.stats().lanes] == [len(u) for u in unread]
    return FuzzRing(ring, unread, header_offsets)


LANE_WORDS = {"tail": TAIL, "head": HEAD, "appended": APPENDED, "consumed": CONSUMED}
DAMAGE = st.one_of(
    # raw bytes anywhere in the lane's control block or data
    st.tuples(st.just("control"), st.integers(0, CONTROL_BYTES - 1),
              st.binary(min_size=1, max_size=24)),
    st.tuples(st.just("data"), st.integers(0, FUZZ_CAPACITY - 1),
              st.binary(min_size=1, max_size=64)),
    # bytes inside the header of one of the unread records
    st.tuples(st.just("header"), st.integers(0, 11), st.integers(0, 15),
              st.binary(min_size=1, max_size=16)),
    # a plausible length in one of the unread records' headers (near max_record, or small)
    st.tuples(st.just("length"), st.integers(0, 11), st.one_of(
        st.integers(FUZZ_GEOMETRY.max_record - 32, FUZZ_GEOMETRY.max_record + 32),
        st.integers(0, 2 * FUZZ_GEOMETRY.max_record))),
    # a control word set near a meaningful value: tail, head, a lap boundary, 0 or 2**64
    st.tuples(st.just("word"), st.sampled_from(sorted(LANE_WORDS)),
              st.sampled_from(["tail", "head", "lap", "zero", "top"]),
              st.one_of(st.integers(-16, 16), st.integers(-4 * FUZZ_CAPACITY, 4 * FUZZ_CAPACITY))),
)


def damage_lane(fuzz: FuzzRing, lane: int, damage: tuple[Any, ...]) -> None:
    ring = fuzz.ring
    kind = damage[0]
    if kind == "word":
        _, word, base, delta = damage
        tail = ring.words[ring.control_word(lane, TAIL)]
        bases = {"tail": tail, "head": ring.words[ring.control_word(lane, HEAD)],
                 "lap": tail & -FUZZ_CAPACITY, "zero": 0, "top": 1 << 64}
        ring.words[ring.control_word(lane, LANE_WORDS[word])] = (bases[base] + delta) % (1 << 64)
        return
    if kind == "length":
        _, index, length = damage
        offsets = fuzz.header_offsets[lane]
        start = ring.lane_offset(lane) + offsets[index % len(offsets)]
        ring.bytes[start:start + 4] = struct.pack("<I", length)
        return
    if kind == "control":
        _, offset, data = damage
        start = CONTROL_OFFSET + CONTROL_BYTES * lane
        end = start + CONTROL_BYTES
    else:
        start, end = ring.lane_offset(lane), ring.lane_offset(lane) + FUZZ_CAPACITY
        if kind == "data":
            _, offset, data = damage
        else:
            _, index, within, data = damage
            offsets = fuzz.header_offsets[lane]
            offset = offsets[index % len(offsets)] + within
    data = data[:end - start - offset]
    ring.bytes[start + offset:start + offset + len(data)] = data


def first_unread_header_position(ring: RingFile, lane: int) -> bytes:
    """The own-position field of the header at the lane's committed head."""
    head = ring.words[ring.control_word(lane, HEAD)]
    start = ring.lane_offset(lane) + head % FUZZ_CAPACITY + 8
    return bytes(ring.bytes[start:start + 8])


@pytest.mark.slow
@settings(max_examples=1000, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.too_slow])
@given(lane=st.integers(0, FUZZ_GEOMETRY.lane_count - 1),
       rounds=st.lists(st.lists(DAMAGE, min_size=1, max_size=6), min_size=1, max_size=3),
       attach_after_damage=st.booleans(), max_records=st.integers(1, 64),
       max_bytes=st.sampled_from([1, 700, 16 * KiB, 1 * MiB]), commit_late=st.booleans())
def test_the_reader_survives_arbitrary_damage_to_a_lane(
        fuzz_ring: FuzzRing, lane: int, rounds: list[list[tuple[Any, ...]]],
        attach_after_damage: bool, max_records: int, max_bytes: int, commit_late: bool) -> None:
    """Rounds of damage to one lane's control block and data, each followed by a few reads
    (committed at once, or all at the end in reverse order), then a full drain. Nothing may
    raise, every call returns, no record exceeds max_record, the other lanes deliver their
    records intact, and damage to the first unread header is counted as a corrupt reset."""
    ring = fuzz_ring.ring
    ring.bytes[:] = fuzz_ring.pristine
    reader = None if attach_after_damage else Reader(ring)
    try:
        head_and_tail = [ring.words[ring.control_word(lane, word)] for word in (HEAD, TAIL)]
        first_position = first_unread_header_position(ring, lane)
        received: list[bytes] = []
        uncommitted = []
        must_reset = False
        for number, damages in enumerate(rounds):
            for damage in damages:
                damage_lane(fuzz_ring, lane, damage)
            if number == 0:
                must_reset = (first_unread_header_position(ring, lane) != first_position
                              and head_and_tail == [ring.words[ring.control_word(lane, word)]
                                                    for word in (HEAD, TAIL)])
            if reader is None:
                reader = Reader(ring)
            for _ in range(8):
                batch = reader.read(max_records, max_bytes)
                received.extend(batch.records)
                if commit_late:
                    uncommitted.append(batch)
                else:
                    reader.commit(batch)
                if not batch.records:
                    break
        for batch in reversed(uncommitted):
            reader.commit(batch)
        for _ in range(300):
            batch = reader.read(64, 1 * MiB)
            reader.commit(batch)
            received.extend(batch.records)
            if not batch.records:
                break
        else:
            raise AssertionError("the reader kept returning records from a 192 KiB ring")
    finally:
        if reader is not None:
            reader.close()

    assert all(len(record) <= FUZZ_GEOMETRY.max_record for record in received)
    by_stream: defaultdict[int, list[bytes]] = defaultdict(list)
    for record in received:
        with contextlib.suppress(CorruptRecord):  # damaged payload: the ring has no checksum
            by_stream[parse_record(record)[0]].append(record)
    stats = ring.stats()
    for other in range(FUZZ_GEOMETRY.lane_count):
        if other != lane:
            assert by_stream[other] == fuzz_ring.unread[other], f"lane {other} suffered"
            assert stats.lanes[other].corrupt_resets == 0
    if must_reset:
        assert stats.lanes[lane].corrupt_resets >= 1


HEADER_FIELDS = [(0, 8), (8, 4), (12, 4), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8),
                 (56, 8), (64, 8)]  # magic, version, flags, lane_count, …, file_size, created
HEADER_DAMAGE = st.one_of(
    st.tuples(st.integers(0, HEADER_BYTES - 1), st.binary(min_size=1, max_size=16)),
    st.sampled_from(HEADER_FIELDS).flatmap(lambda field: st.tuples(
        st.just(field[0]),
        st.one_of(st.integers(0, 1 << 20), st.integers(0, (1 << 8 * field[1]) - 1)).map(
            lambda value, width=field[1]: value.to_bytes(width, "little")))),
)


class RingImage:
    def __init__(self, path: str) -> None:
        self.path = path  # where each example writes its altered copy
        self.pristine = Path(path).read_bytes()  # a valid small ring file

    def __repr__(self) -> str:  # short, for hypothesis' report of a failing example
        return f"RingImage({self.path!r})"


@pytest.fixture(scope="module")
def ring_image() -> Iterator[RingImage]:
    directory = tempfile.mkdtemp(prefix="ring-header-", dir=SHM_DIR)
    path = os.path.join(directory, "ring")
    RingFile.create(path, SMALL).close()
    yield RingImage(path)
    shutil.rmtree(directory, ignore_errors=True)


@settings(max_examples=300, deadline=timedelta(seconds=10))
@given(damages=st.lists(HEADER_DAMAGE, min_size=1, max_size=4))
def test_a_damaged_global_header_is_refused_or_attached(
        ring_image: RingImage, damages: list[tuple[int, bytes]]) -> None:
    image = bytearray(ring_image.pristine)
    for offset, data in damages:
        data = data[:HEADER_BYTES - offset]
        image[offset:offset + len(data)] = data
    Path(ring_image.path).write_bytes(image)
    try:
        ring = RingFile.attach(ring_image.path)
    except RingFormatError:
        return
    try:
        ring.geometry.validate()
        assert ring.geometry.file_size == len(image)
        assert len(ring.stats().lanes) == ring.geometry.lane_count
    finally:
        ring.close()


def random_bytes(valid: bytes) -> bytes:
    return random.Random(5).randbytes(len(valid))


def wrong_magic(valid: bytes) -> bytes:
    return b"NOTARING" + valid[8:]


def wrong_version(valid: bytes) -> bytes:
    return valid[:8] + struct.pack("<I", 2) + valid[12:]


def truncated(valid: bytes) -> bytes:
    return valid[:len(valid) // 2]


def extended(valid: bytes) -> bytes:
    return valid + bytes(4096)


def shorter_than_a_header(valid: bytes) -> bytes:
    return valid[:20]


def empty(valid: bytes) -> bytes:
    return b""


def no_lanes(valid: bytes) -> bytes:
    return valid[:16] + struct.pack("<I", 0) + valid[20:]


@pytest.mark.parametrize(("alter", "reason"), [
    (random_bytes, "is not a moesif_fast ring file (bad magic)"),
    (wrong_magic, "is not a moesif_fast ring file (bad magic)"),
    (wrong_version, "is a ring of format version 2; this moesif_fast reads version 1"),
    (truncated, "bytes; its header says"),
    (extended, "bytes; its header says"),
    (shorter_than_a_header, "is not a moesif_fast ring file"),
    (empty, "is not a moesif_fast ring file"),
    (no_lanes, "lane count 0"),
])
def test_a_file_of_another_format_is_refused_with_the_reason(
        ring_dir: str, alter: Callable[[bytes], bytes], reason: str) -> None:
    path = os.path.join(ring_dir, "ring")
    RingFile.create(path, SMALL).close()
    altered = alter(Path(path).read_bytes())
    Path(path).write_bytes(altered)
    with pytest.raises(RingFormatError) as refused:
        RingFile.attach(path)
    assert path in str(refused.value)
    assert reason in str(refused.value)
    with pytest.raises(RingFormatError):
        RingFile.open(path, SMALL)
    assert Path(path).read_bytes() == altered, "refusing must leave the file alone"


def test_open_refuses_an_existing_ring_of_another_geometry(ring_dir: str) -> None:
    path = os.path.join(ring_dir, "ring")
    geometry = Geometry(lane_count=3, lane_capacity=64 * KiB, max_records=100)
    RingFile.create(path, geometry).close()
    for other in (Geometry(4, 64 * KiB, 100), Geometry(3, 128 * KiB, 100),
                  Geometry(3, 64 * KiB, 101)):
        with pytest.raises(RingFormatError, match="differs from the expected"):
            RingFile.open(path, other)
    same = RingFile.open(path, geometry)
    assert same.geometry == geometry
    same.close()


def test_ring_files_are_private_to_their_owner(ring_dir: str) -> None:
    path = os.path.join(ring_dir, "ring")
    umask = os.umask(0)  # whatever the umask, the ring must not be readable by others
    try:
        ring = RingFile.create(path, SMALL)
        producer, reader = Producer(ring), Reader(ring)
        assert producer.append(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ring.locks_dir).st_mode) == 0o700
    lock_files = os.listdir(ring.locks_dir)
    assert "reader" in lock_files
    for name in lock_files:
        assert stat.S_IMODE(os.stat(ring.lock_path(name)).st_mode) == 0o600, name
    reader.close()
    producer.close()
    ring.close()


# -- locked publish ---------------------------------------------------------------------------


def test_locked_publish_holds_the_sync_lock_of_the_lane_it_publishes_to(
        make_ring: Callable[..., RingFile]) -> None:
    """A producer starts on the overflow lane (the only dedicated lane is taken), then claims
    the dedicated lane once it is freed. Its publish into lane 0 must wait for `sync-000`."""
    ring = make_ring(SMALL, locked_publish=True)
    holder, producer = Producer(ring), Producer(ring)
    assert holder.append(make_record(0, 0, 100))
    assert producer.append(make_record(1, 0, 100))
    assert producer.lane is None
    holder.close()
    assert producer.append(make_record(1, 1, 100))
    assert producer.lane == 0

    appended_before = ring.stats().lanes[0].appended
    sync_fd = ring.open_lock("sync-000")
    fcntl.flock(sync_fd, fcntl.LOCK_EX)
    appending = threading.Thread(target=producer.append, args=(make_record(1, 2, 100),))
    try:
        appending.start()
        appending.join(0.5)
        published_while_locked = not appending.is_alive()
        appended_while_locked = ring.stats().lanes[0].appended
    finally:
        fcntl.flock(sync_fd, fcntl.LOCK_UN)
        os.close(sync_fd)
        appending.join(PATIENCE)
    assert not published_while_locked, "the tail of lane 0 was stored without sync-000"
    assert appended_while_locked == appended_before
    assert ring.stats().lanes[0].appended == appended_before + 1
