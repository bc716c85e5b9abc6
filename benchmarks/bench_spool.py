"""The spool: what a record costs to write to disk and read back.

    python -m pytest benchmarks/bench_spool.py --benchmark-only

Each round puts RECORDS records of 1 KiB through a spool in a folder on disk (the temp dir, not
/dev/shm), in batches of BATCH records, `sync()` (fdatasync) after every SYNC_EVERY bytes
appended, and reads and commits them back in batches of BATCH. Two orders:

* backlog: append them all, then drain them all (an outage, then the recovery), so reading
  crosses segments that are closed and deleted as they are committed;
* interleaved: append a batch, read and commit one (the spool as a steady pass-through).

Goals: at most 2 us of CPU per record written and read back, at least 300,000 records/s. The
CPU time of the process (getrusage: user and system; the best round after a warm-up, and the
worst, to show how much a shared machine moved it) and the rate (the fastest round) are in
extra_info and printed. The kernel's writeback threads are not in the CPU time; waiting for
fdatasync is in the rate.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moesif_fast.spool import Spool

KiB = 1 << 10
MiB = 1 << 20
RECORDS = 100_000
BATCH = 500
SYNC_EVERY = 4 * MiB
ROUNDS = 5
GOAL_CPU_US = 2.0
GOAL_RATE = 300_000


@pytest.fixture
def spool() -> Iterator[Spool]:
    directory = tempfile.mkdtemp(prefix="spool-bench-")
    spool = Spool(os.path.join(directory, "spool"), max_bytes=1 << 30,
                  max_records=1_000_000)
    yield spool
    spool.close()
    shutil.rmtree(directory, ignore_errors=True)


def batches() -> list[list[bytes]]:
    """RECORDS distinct records of 1 KiB in batches of BATCH (built once, outside timing)."""
    filler = os.urandom(KiB)
    made = [b"%08d" % number + filler[8:] for number in range(RECORDS)]
    return [made[start:start + BATCH] for start in range(0, RECORDS, BATCH)]


def append_all(spool: Spool, work: list[list[bytes]],
               between: Callable[[], int] = lambda: 0) -> int:
    """Append every batch, syncing every SYNC_EVERY bytes, calling `between` after each
    append; the sum of what `between` returned."""
    since_sync = total = 0
    for batch in work:
        spool.append(batch)
        since_sync += len(batch) * KiB
        if since_sync >= SYNC_EVERY:
            spool.sync()
            since_sync = 0
        total += between()
    spool.sync()
    return total


def drain_batch(spool: Spool) -> int:
    """Read and commit one batch; how many records it held."""
    read = spool.read(BATCH, BATCH * 2 * KiB)
    spool.commit(read)
    return len(read.records)


def backlog(spool: Spool, work: list[list[bytes]]) -> int:
    append_all(spool, work)
    drained = 0
    while count := drain_batch(spool):
        drained += count
    return drained


def interleaved(spool: Spool, work: list[list[bytes]]) -> int:
    return append_all(spool, work, lambda: drain_batch(spool))


def run(benchmark: Any, spool: Spool, capsys: pytest.CaptureFixture[str],
        order: Callable[[Spool, list[list[bytes]]], int], name: str) -> None:
    benchmark.group = "spool: 100,000 records of 1 KiB, written and read back"
    work = batches()
    cpu: list[tuple[float, float]] = []  # (user, system) seconds of each round
    drained: list[int] = []

    def one_round() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF)
        drained.append(order(spool, work))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    assert drained == [RECORDS] * (ROUNDS + 1), "a round did not read back every record"
    stats = spool.stats()
    assert (stats.records, stats.dropped_full, stats.dropped_corrupt, stats.write_errors) \
        == (0, 0, 0, 0)
    user, system = min(cpu[1:], key=sum)  # the warm-up round left out
    user_us, system_us = user / RECORDS * 1e6, system / RECORDS * 1e6
    cpu_us = user_us + system_us
    worst_us = max(map(sum, cpu[1:])) / RECORDS * 1e6
    wall_us = benchmark.stats.stats.min / RECORDS * 1e6
    rate = RECORDS / benchmark.stats.stats.min
    benchmark.extra_info.update(cpu_us_per_record=round(cpu_us, 3),
                                worst_round_cpu_us_per_record=round(worst_us, 3),
                                user_us_per_record=round(user_us, 3),
                                system_us_per_record=round(system_us, 3),
                                wall_us_per_record=round(wall_us, 3),
                                records_per_second=round(rate), goal_cpu_us=GOAL_CPU_US,
                                goal_records_per_second=GOAL_RATE)
    with capsys.disabled():
        print(f"\n  spool {name}: {cpu_us:.2f} us CPU ({user_us:.2f} user + {system_us:.2f} "
              f"system; worst round {worst_us:.2f}) and {wall_us:.2f} us wall per record, "
              f"{rate:,.0f} records/s (goals: <= {GOAL_CPU_US} us CPU, >= {GOAL_RATE:,}/s)")


def test_backlog(benchmark: Any, spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    run(benchmark, spool, capsys, backlog, "backlog")


def test_interleaved(benchmark: Any, spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    run(benchmark, spool, capsys, interleaved, "interleaved")
