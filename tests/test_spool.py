"""The on-disk spool (moesif_fast.spool): order, positions, damage, bounds, errors, the lock.

Real files in private folders under tmp_path; no mocks. Tests that need several segments make
them small (SEGMENT_BYTES, ten 100-byte records each). A free-space floor would make results
depend on the disk the tests run on, so it is off except where a test sets it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesif_fast import spool as spool_module
from moesif_fast.private import UnsafePathError
from moesif_fast.spool import (
    BLOCK,
    BLOCK_BYTES,
    ENTRY_BYTES,
    HEADER_BYTES,
    SYNC,
    Spool,
    SpoolBusyError,
)

RECORD_BYTES = 100
PER_SEGMENT = 10
KiB = 1 << 10


def block_bytes(count: int, size: int = RECORD_BYTES) -> int:
    """What a block of `count` records of `size` bytes takes in a segment."""
    return BLOCK_BYTES + count * (ENTRY_BYTES + size)


SMALL_SEGMENT = HEADER_BYTES + block_bytes(PER_SEGMENT)  # ten records, if in one block


def record(number: int, size: int = RECORD_BYTES) -> bytes:
    return f"record {number:08d} ".encode().ljust(size, b".")


def records(start: int, stop: int) -> list[bytes]:
    return [record(number) for number in range(start, stop)]


def drain(spool: Spool, max_records: int = 7, max_bytes: int = 1 << 20) -> list[bytes]:
    """Read and commit until nothing is unread; every record read, in order."""
    got: list[bytes] = []
    for _ in range(100_000):
        batch = spool.read(max_records, max_bytes)
        if not batch.records:
            return got
        got += batch.records
        spool.commit(batch)
    pytest.fail("read() kept returning records: it never reached the end")


def segment_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.seg"))


@pytest.fixture(autouse=True)
def no_free_space_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(spool_module, "MIN_FREE_SHARE", 0.0)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", SMALL_SEGMENT)


@pytest.fixture
def spool(folder: Path) -> Iterator[Spool]:
    opened = Spool(str(folder))
    yield opened
    opened.close()


# --- order and positions -------------------------------------------------------------------


@pytest.mark.usefixtures("small_segments")
def test_records_come_back_in_order_across_segments(spool: Spool, folder: Path) -> None:
    taken = [spool.append(records(start, stop))
             for start, stop in [(0, 1), (1, 8), (8, 38), (38, 95)]]
    assert taken == [1, 7, 30, 57]
    # one block per call and segment: 1 + 7 + 1, 10, 10, 9, then 57 as 10 * 5 + 7
    stats = spool.stats()
    assert (stats.records, stats.segments, stats.appended) == (95, 10, 95)
    assert len(segment_files(folder)) == 10
    assert spool.unread() == 95

    assert drain(spool) == records(0, 95)
    stats = spool.stats()
    assert (stats.records, stats.committed, stats.bytes) == (0, 95, 0)
    assert spool.unread() == 0
    assert spool.read(10, 1 << 20).records == []


def test_a_batch_keeps_to_max_records_and_about_max_bytes(spool: Spool) -> None:
    spool.append(records(0, 20) + [b"x" * 5000] + records(21, 30))
    assert len(spool.read(3, 1 << 20).records) == 3
    assert len(spool.read(100, 250).records) == 3  # 300 bytes: the one that passes 250 is in
    assert spool.read(100, 1).records == [record(6)]
    assert len(spool.read(100, 1 << 20).records) == 23
    assert spool.read(1, 1).records == []


def test_a_record_larger_than_a_segment_gets_one_of_its_own(spool: Spool, folder: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 4 * KiB)
    big = os.urandom(10 * KiB)
    assert spool.append([b"a", big, b"b"]) == 3
    assert [path.stat().st_size for path in segment_files(folder)] == [
        HEADER_BYTES + block_bytes(1, 1), HEADER_BYTES + block_bytes(1, len(big)),
        HEADER_BYTES + block_bytes(1, 1)]
    assert spool.read(10, 10).records == [b"a", big]
    assert drain(spool) == [b"b"]


def test_reopening_resumes_at_the_committed_position(folder: Path) -> None:
    spool = Spool(str(folder))
    spool.append(records(0, 30))
    first, second, third = (spool.read(4, 1 << 20) for _ in range(3))
    spool.commit(first)
    spool.commit(second)
    spool.read(4, 1 << 20)  # read, never committed: comes again
    spool.close()

    again = Spool(str(folder))
    assert (again.stats().records, again.unread()) == (22, 22)
    again.commit(third)  # a batch of the closed spool: no effect
    assert again.stats().records == 22
    assert drain(again) == records(8, 30)
    again.close()
    assert third.records == records(8, 12)


@pytest.mark.usefixtures("small_segments")
def test_out_of_order_commits_move_the_position_only_over_a_committed_prefix(
        folder: Path) -> None:
    spool = Spool(str(folder))
    spool.append(records(0, 30))
    first, second, third = (spool.read(10, 1 << 20) for _ in range(3))
    assert third.records == records(20, 30)
    spool.commit(third)
    spool.commit(second)
    spool.commit(second)  # twice: no effect
    assert spool.stats().records == 30
    assert len(segment_files(folder)) == 3
    spool.close()  # the ledger still says: nothing delivered

    spool = Spool(str(folder))
    first, second, third = (spool.read(10, 1 << 20) for _ in range(3))
    assert first.records + second.records + third.records == records(0, 30)
    spool.commit(second)
    assert len(segment_files(folder)) == 3
    spool.commit(first)
    assert spool.stats().records == 10
    assert len(segment_files(folder)) == 1  # the first two went; the one being written stays
    spool.commit(third)
    stats = spool.stats()
    assert (stats.records, stats.committed) == (0, 30)
    spool.close()
    assert drain(reopened := Spool(str(folder))) == []
    reopened.close()


@pytest.mark.usefixtures("small_segments")
def test_fully_committed_segments_are_deleted_but_not_the_one_being_written(
        spool: Spool, folder: Path) -> None:
    spool.append(records(0, 25))
    names = [path.name for path in segment_files(folder)]
    assert names == ["0000000000000000.seg", "000000000000000a.seg", "0000000000000014.seg"]
    spool.commit(spool.read(15, 1 << 20))
    assert [path.name for path in segment_files(folder)] == names[1:]
    assert drain(spool) == records(15, 25)
    assert [path.name for path in segment_files(folder)] == names[2:]

    spool.append(records(25, 29))  # fills the segment being written (a second block), which
    assert drain(spool) == records(25, 29)  # stays
    assert [path.name for path in segment_files(folder)] == names[2:]
    spool.append([record(29)])  # rolls over: the committed segment goes
    assert [path.name for path in segment_files(folder)] == ["000000000000001d.seg"]
    assert drain(spool) == [record(29)]


def test_stats_name_the_oldest_held_record_and_what_is_unread(spool: Spool) -> None:
    assert spool.stats().oldest_ns == 0
    before = time.time_ns()
    spool.append(records(0, 5))
    after = time.time_ns()
    spool.append(records(5, 8))
    oldest = spool.stats().oldest_ns
    assert before <= oldest <= after
    batch = spool.read(3, 1 << 20)
    assert (spool.unread(), spool.stats().oldest_ns) == (5, oldest)
    spool.commit(batch)
    assert before <= spool.stats().oldest_ns <= after  # record 3, same append call
    spool.commit(spool.read(2, 1 << 20))
    assert spool.stats().oldest_ns > after
    assert spool.stats().records == 3


@pytest.mark.usefixtures("small_segments")
def test_a_writer_thread_and_a_reader_thread_share_a_spool(spool: Spool, folder: Path) -> None:
    total, taken = 3000, []

    def write() -> None:
        for start in range(0, total, 30):
            taken.append(spool.append(records(start, start + 30)))
            if start % 300 == 0:
                spool.sync()

    writer = threading.Thread(target=write)
    writer.start()
    got: list[bytes] = []
    while writer.is_alive() or spool.unread():
        batch = spool.read(17, 1 << 20)
        got += batch.records
        spool.commit(batch)
    writer.join()
    assert taken == [30] * (total // 30)
    assert got == records(0, total)
    stats = spool.stats()
    assert (stats.records, stats.segments, stats.committed) == (0, 1, total)
    assert len(segment_files(folder)) == 1


# --- crashes -------------------------------------------------------------------------------


def append_until_killed(folder: str, report: multiprocessing.connection.Connection) -> None:
    """A child process: 100 records delivered and synced, 50 delivered and not synced, then
    append 10 records at a time, reporting each call's return, until killed."""
    spool = Spool(folder)
    spool.append(records(0, 100))
    spool.commit(spool.read(100, 1 << 20))
    spool.sync()
    spool.commit(spool.read(50, 1 << 20))
    number = 100
    while True:
        assert spool.append(records(number, number + 10)) == 10
        number += 10
        report.send(number)


def test_a_killed_process_loses_nothing_append_returned_and_sends_uncommitted_again(
        folder: Path) -> None:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=append_until_killed, args=(str(folder), sender))
    child.start()
    appended = 0
    while appended < 3000:
        assert receiver.poll(60), "the child stopped appending"
        appended = receiver.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL

    spool = Spool(str(folder))
    got = drain(spool, max_records=500)
    spool.close()
    assert got[:appended - 100] == records(100, appended)  # from the synced ledger on
    assert got == records(100, 100 + len(got))  # then whatever else it wrote, in order


# --- damage --------------------------------------------------------------------------------


def write_closed(folder: Path, *calls: list[bytes]) -> Path:
    """Append each of `calls` (a block each) to a new spool in `folder` and close it; the
    newest segment's path."""
    spool = Spool(str(folder))
    for items in calls:
        assert spool.append(items) == len(items)
    spool.close()
    return segment_files(folder)[-1]


def header(count: int, body: int, body_crc: int, written_ns: int = 1) -> bytes:
    """A block header whose own CRC checks out."""
    fields = BLOCK.pack(SYNC, 0, count, body, written_ns, body_crc)[8:]
    return SYNC + zlib.crc32(fields).to_bytes(4, "little") + fields


def damage(path: Path, at: int, data: bytes) -> None:
    content = bytearray(path.read_bytes())
    content[at:at + len(data)] = data
    path.write_bytes(bytes(content))


def test_a_torn_tail_is_cut_off_and_counted(folder: Path) -> None:
    segment = write_closed(folder, records(0, 9), records(9, 12))
    os.truncate(segment, segment.stat().st_size - 30)  # the second block is torn: all of it

    spool = Spool(str(folder))
    assert spool.stats().truncated_bytes == block_bytes(3) - 30
    assert segment.stat().st_size == HEADER_BYTES + block_bytes(9)
    assert drain(spool) == records(0, 9)
    spool.append([record(10)])  # the segment goes on from its last good frame
    spool.close()
    spool = Spool(str(folder))
    assert spool.stats().truncated_bytes == 0
    assert drain(spool) == [record(10)]
    spool.close()


def test_a_segment_created_but_never_written_is_removed(folder: Path) -> None:
    write_closed(folder, records(0, 3))
    empty = folder / f"{3:016x}.seg"  # killed between creating it and writing its header
    os.close(os.open(empty, os.O_WRONLY | os.O_CREAT, 0o600))
    spool = Spool(str(folder))
    assert empty.read_bytes()[:8] == b"MFSPOOL\x02"  # made again, with its header, and used
    assert spool.append([record(3)]) == 1
    assert drain(spool) == records(0, 4)
    spool.close()


@pytest.mark.parametrize("garbage", [
    b"\0 not a block at all " * 2,
    header(3, 5000, 0) + b"a block header, its body missing",
    header(1, 7, 0) + (3).to_bytes(4, "little") + b"abc",  # whole, but the body's CRC is bad
], ids=["zeros", "header-only", "bad-crc"])
def test_garbage_after_the_last_frame_is_cut_off_and_counted(folder: Path, garbage: bytes
                                                             ) -> None:
    segment = write_closed(folder, records(0, 10))
    with segment.open("ab") as file:
        file.write(garbage)
    spool = Spool(str(folder))
    stats = spool.stats()
    assert (stats.truncated_bytes, stats.dropped_corrupt) == (len(garbage), 0)
    assert drain(spool) == records(0, 10)
    spool.close()


SECOND = HEADER_BYTES + block_bytes(3)  # where the second of blocks of 3, 3, 2, 2 records starts
THIRD = SECOND + block_bytes(3)


@pytest.mark.parametrize(("where", "data", "lost", "counted"), [
    (SECOND + BLOCK_BYTES + 3 * ENTRY_BYTES + RECORD_BYTES + 50, b"\xff", [3, 4, 5], 3),
    (SECOND + BLOCK_BYTES + ENTRY_BYTES, (7).to_bytes(4, "little"), [3, 4, 5], 3),
    (SECOND, b"\0\0", [3, 4, 5], 3),  # the header still counts its records
    (SECOND + 12, b"\xff\xff", [3, 4, 5], 3),  # a bad header CRC (the body size changed:
    # a field of known value, so the bytes surely change), its count still plausible
    (SECOND + 8, b"\xf0\xff\xff\xff", [3, 4, 5], 1),  # the count itself: one, at least
    (THIRD - 32, b"\xa5" * 36, [3, 4, 5, 6, 7], 5),  # a payload, the next block's marker
], ids=["payload", "table", "marker", "header", "count", "two-blocks"])
def test_a_damaged_block_in_the_middle_is_skipped_and_counted(
        folder: Path, caplog: pytest.LogCaptureFixture, where: int, data: bytes,
        lost: list[int], counted: int) -> None:
    segment = write_closed(folder, records(0, 3), records(3, 6), records(6, 8), records(8, 10))
    damage(segment, where, data)
    with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
        spool = Spool(str(folder))
    assert spool.stats().dropped_corrupt == counted
    assert spool.stats().records == spool.unread() == 10 - len(lost)
    assert drain(spool) == [record(n) for n in range(10) if n not in lost]
    assert "damaged" in caplog.text and segment.name in caplog.text
    spool.close()


@pytest.mark.usefixtures("small_segments")
@pytest.mark.parametrize("header", [b"NOSPOOL\x02", b"MFSPOOL\x01"],
                         ids=["magic", "previous-version"])
def test_a_segment_with_a_bad_header_is_skipped_counted_and_deleted(
        folder: Path, caplog: pytest.LogCaptureFixture, header: bytes) -> None:
    write_closed(folder, records(0, 25))
    middle = segment_files(folder)[1]
    damage(middle, 0, header)
    with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
        spool = Spool(str(folder))
    assert spool.stats().dropped_corrupt == 10
    assert not middle.exists()
    assert drain(spool) == records(0, 10) + records(20, 25)
    assert "damaged" in caplog.text and middle.name in caplog.text
    spool.close()


def test_a_segment_of_the_previous_format_is_refused_and_its_records_counted(
        folder: Path) -> None:
    old_frame = SYNC + (3).to_bytes(4, "little") + bytes(12) + b"abc"  # a version 1 record
    path = folder / f"{0:016x}.seg"
    path.write_bytes(b"MFSPOOL\x01" + bytes(8) + old_frame * 4)
    path.chmod(0o600)
    spool = Spool(str(folder))
    assert spool.stats().dropped_corrupt == 4
    assert spool.append([b"new"]) == 1
    assert drain(spool) == [b"new"]
    spool.close()


SECOND_CALL = HEADER_BYTES + block_bytes(7)


@pytest.mark.parametrize(("damaged", "got", "lost"), [
    (lambda path: os.truncate(path, SECOND_CALL + BLOCK_BYTES + 3 * ENTRY_BYTES
                              + RECORD_BYTES + 10), 7, 3),  # record 7 is intact
    (lambda path: damage(path, SECOND_CALL, b"\0\0"), 7, 3),  # the block's marker
], ids=["truncated", "marker"])
def test_a_segment_changed_while_open_is_given_up_from_there(
        spool: Spool, folder: Path, damaged: Any, got: int, lost: int) -> None:
    """read checks that it got every byte it asked for and every block header in them against
    the index the spool keeps; the CRCs of the bodies were checked when the blocks were written
    or scanned at open."""
    spool.append(records(0, 7))
    spool.append(records(7, 10))
    spool.commit(first := spool.read(7, 1 << 20))
    damaged(segment_files(folder)[0])
    spool.commit(second := spool.read(7, 1 << 20))
    assert first.records + second.records == records(0, got)
    stats = spool.stats()
    assert (stats.dropped_corrupt, stats.records, spool.unread()) == (lost, 0, 0)
    spool.append([record(10)])
    assert drain(spool) == [record(10)]
    assert spool.stats().records == 0


@pytest.mark.usefixtures("small_segments")
def test_a_ledger_naming_a_missing_segment_starts_at_the_first_existing_one(
        folder: Path) -> None:
    spool = Spool(str(folder))
    spool.append(records(0, 30))
    spool.commit(spool.read(15, 1 << 20))
    spool.close()
    (second, third) = segment_files(folder)
    second.unlink()
    spool = Spool(str(folder))
    assert drain(spool) == records(20, 30)
    spool.close()
    assert segment_files(folder) == [third]


@pytest.mark.usefixtures("small_segments")
def test_a_damaged_ledger_sends_everything_again(folder: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(str(folder))
    spool.append(records(0, 30))
    spool.commit(spool.read(15, 1 << 20))
    spool.close()
    damage(folder / "ledger", 10, b"\x99")
    with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
        spool = Spool(str(folder))
    assert drain(spool) == records(10, 30)  # the first segment was deleted: delivered
    assert "ledger" in caplog.text
    spool.close()


# --- bounds --------------------------------------------------------------------------------


@pytest.mark.usefixtures("small_segments")
def test_max_bytes_drops_the_oldest_segment_and_counts_its_unread_records(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(str(folder), max_bytes=3 * SMALL_SEGMENT + 30)
    assert spool.append(records(0, 30)) == 30
    in_flight = spool.read(4, 1 << 20)  # read from the oldest segment, not committed
    assert spool.stats().dropped_full == 0
    with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
        assert spool.append([record(30)]) == 1
    stats = spool.stats()
    assert (stats.dropped_full, stats.records, stats.segments) == (6, 21, 3)
    assert stats.bytes <= 3 * SMALL_SEGMENT + 30
    assert "spool full" in caplog.text
    assert spool.unread() == 21
    spool.commit(in_flight)  # harmless
    stats = spool.stats()
    assert (stats.records, stats.committed) == (21, 4)
    assert drain(spool) == records(10, 31)
    spool.close()


@pytest.mark.usefixtures("small_segments")
def test_max_records_drops_the_oldest_segment(folder: Path) -> None:
    spool = Spool(str(folder), max_records=25)
    for start in (0, 10, 20):
        assert spool.append(records(start, start + 10)) == 10
    stats = spool.stats()
    assert (stats.dropped_full, stats.records, stats.appended) == (10, 20, 30)
    assert drain(spool) == records(10, 30)
    spool.close()


def test_when_only_the_segment_being_written_is_left_the_newest_records_are_dropped(
        folder: Path) -> None:
    spool = Spool(str(folder), max_records=25,
                  max_bytes=HEADER_BYTES + block_bytes(20) + block_bytes(2))
    assert spool.append(records(0, 20)) == 20
    assert spool.append(records(20, 30)) == 10  # taken: 2 written, 8 dropped
    stats = spool.stats()
    assert (stats.dropped_full, stats.appended, stats.records) == (8, 22, 22)
    assert spool.append(records(30, 32)) == 2
    assert spool.stats().dropped_full == 10
    assert drain(spool) == records(0, 22)
    spool.close()


def free_bytes(path: Path) -> int:
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def test_a_file_system_under_the_default_floor_takes_nothing(
        tiny_filesystem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "MIN_FREE_BYTES", 64 << 20)  # the defaults
    monkeypatch.setattr(spool_module, "MIN_FREE_SHARE", 0.05)
    spool = Spool(str(tiny_filesystem / "spool"))
    assert spool.append(records(0, 100)) == 100
    stats = spool.stats()
    assert (stats.appended, stats.dropped_full, stats.write_errors) == (0, 100, 0)
    assert spool.read(10, 1 << 20).records == []
    spool.close()


def test_a_tiny_file_system_keeps_its_free_space_floor(
        tiny_filesystem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    floor = 256 * KiB
    monkeypatch.setattr(spool_module, "MIN_FREE_BYTES", floor)
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 64 * KiB)
    spool = Spool(str(tiny_filesystem / "spool"))
    offered = 0
    for call in range(100):  # 5 MiB into a 1 MiB file system
        batch = [record(offered + n, KiB) for n in range(50)]
        assert spool.append(batch) == 50
        offered += 50
        assert free_bytes(tiny_filesystem) >= floor - 16 * KiB, call  # pages, not bytes
    stats = spool.stats()
    assert stats.write_errors == 0
    assert stats.dropped_full > offered // 2
    assert stats.records + stats.dropped_full == offered
    got = drain(spool, max_records=100)
    assert len(got) == stats.records
    numbers = [int(item.split()[1]) for item in got]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # the newest ones
    assert got == [record(n, KiB) for n in numbers]
    spool.close()


def test_a_full_file_system_gives_write_errors_and_a_partial_count(
        tiny_filesystem: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 64 * KiB)
    monkeypatch.setattr(spool_module, "MIN_FREE_BYTES", -1 << 40)  # no floor at all: the
    monkeypatch.setattr(spool_module, "MIN_FREE_SHARE", -1.0)  # writes go on to ENOSPC
    spool = Spool(str(tiny_filesystem / "spool"))
    taken, offered = [], 0
    with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
        while offered < 4000 and (not taken or taken[-1] == 50):
            taken.append(spool.append([record(offered + n, KiB) for n in range(50)]))
            offered += 50
    assert taken[-1] < 50, "the file system never filled up"
    stats = spool.stats()
    assert stats.write_errors == 50 - taken[-1]
    assert stats.appended == sum(taken)
    assert "could not" in caplog.text
    assert drain(spool, max_records=100) == [record(n, KiB) for n in range(sum(taken))]
    assert spool.append([record(0, KiB)]) == 1  # room again once delivered
    spool.close()


@pytest.mark.usefixtures("small_segments")
def test_a_segment_that_cannot_be_created_gives_write_errors_not_an_exception(
        spool: Spool, folder: Path) -> None:
    spool.append(records(0, 10))
    in_the_way = folder / f"{10:016x}.seg"
    in_the_way.mkdir()
    assert spool.append(records(10, 15)) == 0
    assert spool.stats().write_errors == 5
    in_the_way.rmdir()
    assert spool.append(records(10, 15)) == 5
    assert drain(spool) == records(0, 15)


# --- the folder ----------------------------------------------------------------------------


def test_a_second_spool_on_the_same_folder_is_refused(folder: Path) -> None:
    first = Spool(str(folder))
    with pytest.raises(SpoolBusyError):
        Spool(str(folder))
    first.close()
    Spool(str(folder)).close()


def test_a_symbolic_link_is_refused(folder: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(UnsafePathError):
        Spool(str(link))


def test_a_folder_other_users_may_use_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(UnsafePathError):
        Spool(str(shared))
    assert not list(shared.iterdir())


def test_the_folder_and_segments_are_private(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "new"))
    spool.append([b"x"])
    spool.sync()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    for path in (tmp_path / "new").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    spool.close()


# --- random damage -------------------------------------------------------------------------


FUZZ_RECORDS = [record(n, size) for n, size in enumerate([0, 1, 5, 40, 90, 150, 200] * 9)]


@pytest.fixture(scope="module")
def fuzz_segments() -> Iterator[dict[str, bytes]]:
    """The segment files of a closed spool holding FUZZ_RECORDS in small segments."""
    with tempfile.TemporaryDirectory() as parent, pytest.MonkeyPatch.context() as patch:
        patch.setattr(spool_module, "SEGMENT_BYTES", 1 * KiB)
        patch.setattr(spool_module, "MIN_FREE_BYTES", 0)
        patch.setattr(spool_module, "MIN_FREE_SHARE", 0.0)
        spool = Spool(os.path.join(parent, "spool"))
        spool.append(FUZZ_RECORDS)
        spool.close()
        yield {path.name: path.read_bytes() for path in segment_files(Path(parent, "spool"))}


DAMAGE = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert", "overwrite"]),
                            st.integers(0, 20), st.integers(0, 1 << 16),
                            st.binary(min_size=1, max_size=40)),
                  min_size=1, max_size=6)


def apply(segments: dict[str, bytes], folder: str,
          operations: list[tuple[str, int, int, bytes]]) -> None:
    names = sorted(segments)
    for kind, which, where, data in operations:
        path = os.path.join(folder, names[which % len(names)])
        with open(path, "rb") as file:
            content = bytearray(file.read())
        at = where % (len(content) + 1)
        if kind == "flip" and content:
            content[min(at, len(content) - 1)] ^= 1 << (data[0] % 8)
        elif kind == "truncate":
            del content[at:]
        elif kind == "insert":
            content[at:at] = data
        else:
            content[at:at + len(data)] = data
        with open(path, "r+b") as file:  # in place: an open spool sees it
            file.write(content)
            file.truncate()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=DAMAGE, while_open=st.booleans())
def test_random_damage_never_raises_or_hangs_and_returns_only_appended_records(
        fuzz_segments: dict[str, bytes], operations: list[tuple[str, int, int, bytes]],
        while_open: bool) -> None:
    appended = set(FUZZ_RECORDS)
    with tempfile.TemporaryDirectory() as parent:
        folder = os.path.join(parent, "spool")
        os.mkdir(folder, 0o700)
        for name, content in fuzz_segments.items():
            descriptor = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(descriptor, content)
            os.close(descriptor)
        if not while_open:
            apply(fuzz_segments, folder, operations)
        spool = Spool(folder)
        if while_open:
            apply(fuzz_segments, folder, operations)
        got = drain(spool, max_records=13, max_bytes=700)
        if not while_open:  # else a payload changed since the scan at open can come back
            assert set(got) <= appended
        stats = spool.stats()
        assert (stats.records, spool.unread()) == (0, 0)
        assert spool.append([b"after"]) == 1
        assert drain(spool) == [b"after"]
        spool.close()
