"""The ring: append latency next to baselines, and one reader's drain rate.

    python -m pytest benchmarks/bench_ringbuffer.py --benchmark-only

Append, 1 KB and 20 KB records (goals: median <= 2 us and <= 4 us). Each round times one call.
Outside the timed region the reader empties the lane every DRAIN_EVERY rounds, so the lane
never fills (checked: nothing is dropped). The reader lives in the same process here, so the
cache-line traffic of a reader on another core is not in these numbers. In the same run, on the
same bytes, two baselines:

* `queue.Queue.put`: what the reference moesif-django middleware does per event (a bounded
  in-process queue drained by a sender thread). It links a reference into a deque: no copy and
  nothing another process can see. The floor for "hand the event to a thread".
* a slice assignment into the same mapping, at successive offsets as the ring writes them: the
  copy any shared-memory ring written from Python has to make. Append minus this is the ring's
  own bookkeeping (lock, bounds, header, publish, counters).

`multiprocessing.Queue.put` is left out on purpose: it appends to a buffer that a feeder thread
pickles and writes to a pipe later, so timing the call measures neither the copy nor the
hand-off to the other process.

Drain: three producer processes keep their lanes fed with 1 KB records while each round times
one `read` of up to BATCH records plus its `commit` (goal: >= 500,000 records/s). Before each
round, untimed, the reader waits until a full batch is ready, so the rounds measure the reader,
not how fast the producers refill lanes on two shared cores. The rate (records read and
committed per second of timed reading) is in extra_info and printed.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moesif_fast.ringbuffer import Geometry, Producer, Reader, RingFile

KiB = 1 << 10
MiB = 1 << 20
FORK = multiprocessing.get_context("fork")
APPEND_ROUNDS = 20_000
WARMUP_ROUNDS = 1_000
DRAIN_EVERY = 200  # rounds between two drains: 200 records of 20 KB fill half a lane
LANE_CAPACITY = 8 * MiB
PRODUCERS = 3
BATCH = 1_000
DRAIN_ROUNDS = 300
SIZES = pytest.mark.parametrize("size", [1 * KiB, 20 * KiB], ids=["1KB", "20KB"])


@pytest.fixture
def ring() -> Iterator[RingFile]:
    """A ring of three dedicated 8 MiB lanes and the overflow lane, on tmpfs when there is one."""
    directory = tempfile.mkdtemp(prefix="ring-bench-",
                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ring = RingFile.create(os.path.join(directory, "ring"),
                           Geometry(PRODUCERS + 1, LANE_CAPACITY, max_records=1_000_000))
    yield ring
    ring.close()
    shutil.rmtree(directory, ignore_errors=True)


def every(rounds: int, action: Callable[[], object]) -> Callable[[], None]:
    """A pedantic `setup` (run untimed before each round) that runs `action` every `rounds`."""
    calls = itertools.count(1)

    def setup() -> None:
        if next(calls) % rounds == 0:
            action()

    return setup


def drain(reader: Reader) -> None:
    while batch := reader.read(max_records=10_000, max_bytes=64 * MiB):
        reader.commit(batch)


def empty_queue(events: queue.Queue[bytes]) -> None:
    while not events.empty():
        events.get_nowait()


@SIZES
def test_append_ring(benchmark: Any, ring: RingFile, size: int) -> None:
    benchmark.group = f"append {size // KiB} KB"
    producer, reader = Producer(ring), Reader(ring)
    record = os.urandom(size)
    assert producer.append(record)  # the lane is claimed before timing starts
    benchmark.pedantic(producer.append, args=(record,),
                       setup=every(DRAIN_EVERY, lambda: drain(reader)),
                       rounds=APPEND_ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    drain(reader)
    stats = ring.stats()
    assert stats.dropped == 0, "the lane filled up: the timings include drops"
    assert stats.committed_records == 1 + WARMUP_ROUNDS + APPEND_ROUNDS
    benchmark.extra_info["goal_median_us"] = 2 if size == 1 * KiB else 4
    reader.close()
    producer.close()


@SIZES
def test_append_baseline_queue_put(benchmark: Any, size: int) -> None:
    benchmark.group = f"append {size // KiB} KB"
    events: queue.Queue[bytes] = queue.Queue(maxsize=1_000_000)
    record = os.urandom(size)
    benchmark.pedantic(events.put, args=(record,),
                       setup=every(DRAIN_EVERY, lambda: empty_queue(events)),
                       rounds=APPEND_ROUNDS, warmup_rounds=WARMUP_ROUNDS)


@SIZES
def test_append_baseline_copy_into_the_mapping(benchmark: Any, ring: RingFile, size: int
                                               ) -> None:
    benchmark.group = f"append {size // KiB} KB"
    view, lane_start = ring.bytes, ring.lane_offset(0)
    stride = (size + 31) & -16  # a record's footprint in a lane, header included
    offsets = itertools.cycle(range(lane_start, lane_start + LANE_CAPACITY - stride, stride))
    record = os.urandom(size)

    def copy_into_the_mapping() -> None:
        start = next(offsets) + 16
        view[start:start + size] = record

    benchmark.pedantic(copy_into_the_mapping, rounds=APPEND_ROUNDS, warmup_rounds=WARMUP_ROUNDS)


def keep_lane_fed(path: str, stop: Any) -> None:
    """A producer process: append 1 KB records until stopped, pausing briefly when full."""
    producer = Producer(RingFile.attach(path))
    record = os.urandom(1 * KiB)
    while not stop.value:
        if not producer.append(record):
            time.sleep(0.0002)


def test_drain_rate(benchmark: Any, ring: RingFile, capsys: pytest.CaptureFixture[str]) -> None:
    benchmark.group = f"drain 1 KB records, {PRODUCERS} producer processes"
    stop = FORK.RawValue("b", 0)
    producers = [FORK.Process(target=keep_lane_fed, args=(ring.path, stop), daemon=True)
                 for _ in range(PRODUCERS)]
    for process in producers:
        process.start()
    reader = Reader(ring)
    batch_sizes: list[int] = []

    def wait_for_a_full_batch() -> None:
        give_up_at = time.monotonic() + 60
        while ring.stats().records_in_use < BATCH:
            assert time.monotonic() < give_up_at, "the producers stopped feeding the ring"
            time.sleep(0.0002)

    def read_and_commit() -> None:
        batch = reader.read(max_records=BATCH, max_bytes=BATCH * 2 * KiB)
        reader.commit(batch)
        batch_sizes.append(len(batch))

    try:
        benchmark.pedantic(read_and_commit, setup=wait_for_a_full_batch, rounds=DRAIN_ROUNDS,
                           warmup_rounds=10)
    finally:
        stop.value = 1
        for process in producers:
            process.join(60)
        reader.close()
    timed = batch_sizes[-DRAIN_ROUNDS:]
    assert min(timed) == BATCH, "a round read less than a full batch"
    rate = sum(timed) / benchmark.stats.stats.total
    benchmark.extra_info["records_per_second"] = round(rate)
    benchmark.extra_info["records_per_round"] = BATCH
    benchmark.extra_info["goal_records_per_second"] = 500_000
    with capsys.disabled():
        print(f"\n  drain: {rate:,.0f} records/s of 1 KB ({BATCH}-record batches, "
              f"{PRODUCERS} producer processes feeding)")
