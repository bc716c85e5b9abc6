"""Poison records: a ring record that crashed or hung two shippers in a row while they decoded
the record or built its event is skipped (and counted) by the next shipper, and every other
record is still delivered. One death only makes it a suspect, read again: a shipper killed from
outside dies on whatever record it is decoding.

The reader's side runs against real ring files; the rest runs real processes (`python -m
moesif_fast ship`, the supervisor, the local collector) with a settings module whose
MASK_EVENT_MODEL crashes the shipper (SIGSEGV) or hangs it on the events of chosen records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, moesif_processes, wait_until

from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.record import encode_call, header_columns
from moesif_fast.ringbuffer import Batch, Geometry, Producer, Reader, RingFile
from moesif_fast.ringbuffer.layout import (
    POISON_SLOTS,
    WORD_COMMITTED,
    WORD_DECODING_LANE,
    WORD_DECODING_POSITION,
    WORD_POISON_COUNT,
    WORD_READER_HEARTBEAT,
    WORD_SUSPECT_LANE,
    WORD_SUSPECT_POSITION,
    record_span,
)
from moesif_fast.ringfile import shipper_stats_path, spool_folder
from moesif_fast.settings import load
from moesif_fast.spool import Spool

LANES = 3  # lanes the tests write to (the ring has one more: overflow)
PER_LANE = 4
T0_NS = 1_795_510_036_321_000_000
SETTINGS_MODULE = "poison_settings"
SETTINGS = '''\
"""The example API's settings, with a MASK_EVENT_MODEL that crashes or hangs the shipper."""

import ctypes
import time

from moesif_fast.demo.settings import *  # noqa: F403
from moesif_fast.demo.settings import MOESIF_MIDDLEWARE as DEMO_OPTIONS


def mask(event):
    if "/crash/" in event.request.uri:
        ctypes.string_at(0)  # reads address 0: SIGSEGV, in this thread, now
    if "/hang/" in event.request.uri:
        time.sleep(3600)
    return event


MOESIF_MIDDLEWARE = {**DEMO_OPTIONS, "MASK_EVENT_MODEL": mask}
'''
ENCODER_SETTINGS_MODULE = "poison_encoder_settings"
ENCODER_SETTINGS = '''\
"""The example API's settings, and a crash while the event of a request with an X-Crash header
is built: no MASK_EVENT_MODEL, so that the shipper builds events in C where it is compiled (the
encoder asks the builder for the header's name, once)."""

import ctypes

from moesif_fast.demo.settings import *  # noqa: F403
from moesif_fast.event import EventBuilder

header_name = EventBuilder._incoming_header_name


def crashing_header_name(builder, meta_key):
    if meta_key == "HTTP_X_CRASH":
        ctypes.string_at(0)  # reads address 0: SIGSEGV, in this thread, now
    return header_name(builder, meta_key)


EventBuilder._incoming_header_name = crashing_header_name
'''


def make_ring(directory: Path) -> RingFile:
    folder = directory / "rings"
    folder.mkdir(mode=0o700)
    return RingFile.create(str(folder / "poison.ring"),
                           Geometry(lane_count=LANES + 1, lane_capacity=1 << 16,
                                    max_records=1_000))


def fill(ring: RingFile, payload: Any = None) -> None:
    """PER_LANE records in each of lanes 0 .. LANES-1, `payload(lane, number)` (default: the
    text "lane-number"); the producers let go of their lanes afterwards."""
    producers = [Producer(ring, preferred_lane=lane) for lane in range(LANES)]
    for lane, producer in enumerate(producers):
        for number in range(PER_LANE):
            record = payload(lane, number) if payload else f"{lane}-{number}".encode()
            assert producer.append(record)
        assert producer.lane == lane
    for producer in producers:
        producer.close()


def all_records() -> set[bytes]:
    return {f"{lane}-{number}".encode() for lane in range(LANES) for number in range(PER_LANE)}


def where(batch: Batch, record: bytes) -> tuple[int, int]:
    index = batch.records.index(record)
    return batch.lanes[index], batch.positions[index]


def die_while_decoding(ring: RingFile, record: bytes) -> tuple[int, int]:
    """A shipper's reader that reads everything, marks each record as it would before
    decoding it, and dies (commits nothing, clears nothing) while on `record`."""
    reader = Reader(ring)
    batch = reader.read(1_000, 1 << 20)
    for payload, lane, position in zip(batch.records, batch.lanes, batch.positions,
                                       strict=True):
        reader.mark(lane, position)
        if payload == record:
            break
    else:
        pytest.fail(f"{record!r} was not read")
    reader.close()
    return lane, position


def die_twice_while_decoding(ring: RingFile, record: bytes) -> tuple[int, int]:
    """Two shippers in a row die on `record`: the first makes it the suspect, the second
    (which reads it again) makes the next reader take it for poison."""
    die_while_decoding(ring, record)
    return die_while_decoding(ring, record)


# --- the reader ------------------------------------------------------------------------------


def test_a_batch_knows_the_lane_and_position_of_each_record(tmp_path: Path) -> None:
    ring = make_ring(tmp_path)
    fill(ring)
    batch = Reader(ring).read(1_000, 1 << 20)
    assert set(batch.records) == all_records()
    for record, lane, position in zip(batch.records, batch.lanes, batch.positions, strict=True):
        number = int(record.split(b"-")[1])
        assert lane == int(record.split(b"-")[0])
        assert position == number * 32  # a 3-byte record takes 32 bytes of its lane


def test_a_record_one_dead_shipper_was_decoding_is_read_again(tmp_path: Path) -> None:
    """A shipper killed from outside dies wherever it is: one death names a suspect only."""
    ring = make_ring(tmp_path)
    fill(ring)
    lane, position = die_while_decoding(ring, b"1-2")
    reader = Reader(ring)
    assert (ring.words[WORD_SUSPECT_LANE], ring.words[WORD_SUSPECT_POSITION]) == (
        lane + 1, position)
    assert ring.words[WORD_DECODING_LANE] == 0 and ring.words[WORD_POISON_COUNT] == 0
    batch = reader.read(1_000, 1 << 20)
    assert set(batch.records) == all_records() and batch.skipped == []
    reader.close()


def test_a_record_two_dead_shippers_were_decoding_is_skipped_and_released(tmp_path: Path
                                                                          ) -> None:
    ring = make_ring(tmp_path)
    fill(ring)
    lane, position = die_twice_while_decoding(ring, b"1-2")
    assert (ring.words[WORD_DECODING_LANE], ring.words[WORD_DECODING_POSITION]) == (
        lane + 1, position)

    reader = Reader(ring)
    assert ring.words[WORD_DECODING_LANE] == 0  # the mark moved into the poison table
    assert ring.words[WORD_SUSPECT_LANE] == 0
    assert ring.words[WORD_POISON_COUNT] == 1
    batch = reader.read(1_000, 1 << 20)
    assert set(batch.records) == all_records() - {b"1-2"}
    assert batch.skipped == [(1, 64, 3)]
    assert len(batch.lanes) == len(batch.positions) == len(batch.records)
    reader.commit(batch)
    stats = ring.stats()
    assert stats.records_in_use == 0 and stats.bytes_in_use == 0  # its space is released too
    assert [lane.consumed for lane in stats.lanes[:LANES]] == [PER_LANE] * LANES
    assert ring.words[WORD_COMMITTED] == LANES * PER_LANE
    reader.close()


def test_poison_records_that_crash_shippers_in_turn_are_all_skipped(tmp_path: Path) -> None:
    """Two poison records in one uncommitted batch: the shipper that skips the first dies on
    the second, the next one must still skip the first (no endless turns)."""
    ring = make_ring(tmp_path)
    fill(ring)
    die_twice_while_decoding(ring, b"0-1")
    for _ in range(2):  # dies on "2-3" without committing the batch that skipped "0-1"
        reader = Reader(ring)
        batch = reader.read(1_000, 1 << 20)
        assert b"0-1" not in batch.records
        for payload, lane, position in zip(batch.records, batch.lanes, batch.positions,
                                           strict=True):
            reader.mark(lane, position)
            if payload == b"2-3":
                break
        reader.close()

    reader = Reader(ring)
    batch = reader.read(1_000, 1 << 20)
    assert set(batch.records) == all_records() - {b"0-1", b"2-3"}
    assert sorted(batch.skipped) == [(0, 32, 3), (2, 96, 3)]
    assert ring.words[WORD_POISON_COUNT] == 2
    reader.commit(batch)
    assert ring.stats().records_in_use == 0
    reader.close()


def test_a_batch_of_only_a_poison_record_is_committed(tmp_path: Path) -> None:
    ring = make_ring(tmp_path)
    producer = Producer(ring, preferred_lane=0)
    assert producer.append(b"only")
    producer.close()
    die_twice_while_decoding(ring, b"only")
    reader = Reader(ring)
    batch = reader.read(1_000, 1 << 20)
    assert batch.records == [] and batch.skipped == [(0, 0, 4)]
    assert batch and not reader.pending()
    reader.commit(batch)
    assert ring.stats().records_in_use == 0
    reader.close()


def test_a_finished_batch_leaves_no_mark_and_no_skip(tmp_path: Path) -> None:
    ring = make_ring(tmp_path)
    fill(ring)
    reader = Reader(ring)
    batch = reader.read(1_000, 1 << 20)
    before = ring.words[WORD_READER_HEARTBEAT]
    for lane, position in zip(batch.lanes, batch.positions, strict=True):
        reader.mark(lane, position)
        assert ring.words[WORD_DECODING_LANE] == lane + 1
        assert ring.words[WORD_DECODING_POSITION] == position
    assert ring.words[WORD_READER_HEARTBEAT] > before  # marking is a heartbeat too
    reader.clear_mark()
    reader.close()  # dies after the batch: nothing was committed, nothing is poison
    reader = Reader(ring)
    assert set(reader.read(1_000, 1 << 20).records) == all_records()
    assert ring.words[WORD_POISON_COUNT] == 0
    reader.close()


def test_a_mark_killed_half_way_or_of_a_released_record_names_nothing(tmp_path: Path) -> None:
    ring = make_ring(tmp_path)
    fill(ring)
    ring.words[WORD_DECODING_LANE] = 0  # `mark` clears the lane word first: lane 0 = none
    ring.words[WORD_DECODING_POSITION] = 32
    reader = Reader(ring)
    batch = reader.read(1_000, 1 << 20)
    assert set(batch.records) == all_records() and batch.skipped == []
    lane, position = where(batch, b"2-0")
    reader.mark(lane, position)
    reader.commit(batch)  # "2-0" was delivered: its space is released, the mark is stale
    reader.close()

    fill(ring)  # new records, at new positions
    reader = Reader(ring)
    assert ring.words[WORD_SUSPECT_LANE] == lane + 1  # a suspect, of a record that is gone
    batch = reader.read(1_000, 1 << 20)
    assert set(batch.records) == all_records() and batch.skipped == []
    reader.close()


def test_the_poison_table_keeps_the_latest_records(tmp_path: Path) -> None:
    ring = make_ring(tmp_path)
    producer = Producer(ring, preferred_lane=0)
    records = [f"r{number:02d}".encode() for number in range(POISON_SLOTS + 2)]
    for record in records:
        assert producer.append(record)
    producer.close()
    for record in records:  # each in turn kills two shippers before anything is committed
        die_twice_while_decoding(ring, record)
        reader = Reader(ring)  # moves the mark into the table, then dies at once too
        reader.close()
    reader = Reader(ring)
    batch = reader.read(1_000, 1 << 20)
    assert batch.records == records[:2]  # the two oldest fell out of the table
    assert len(batch.skipped) == POISON_SLOTS
    reader.close()


# --- real shippers ---------------------------------------------------------------------------


def call_record(lane: int, number: int, kind: str = "items") -> bytes:
    """The record of a GET whose URI names its lane and number (and, for "crash" and "hang",
    makes the test settings' MASK_EVENT_MODEL crash or hang the shipper; for "crash-header", it
    carries the header that crashes the encoder settings' shipper, and no metadata: a record
    the compiled decoder reads, so that the crash is in `BatchWriter.add_records`)."""
    time_ns = T0_NS + lane * 1_000_000_000 + number * 1_000_000
    crash = [("HTTP_X_CRASH", "1")] if kind == "crash-header" else []
    return encode_call((
        "Incoming", time_ns, time_ns + 2_000_000, "GET",
        f"http://api.example.com/{kind}/{lane}-{number}?q=1",
        header_columns([("HTTP_HOST", "api.example.com"), ("HTTP_X_LANE", str(lane)), *crash]),
        "203.0.113.9", None, 200, (("Content-Type", "application/json"),),
        json.dumps({"lane": lane, "number": number}).encode(), f"tx-{lane}-{number}",
        f"user-{lane}", None, None, None if crash else {"number": number, "tags": ["a"]}, 1,
        None, 0))


@pytest.fixture
def deployment(workspace: Path, collector: Collector) -> Iterator[dict[str, Any]]:
    """A ring, the settings modules that crash shippers, and the environment for shippers."""
    (workspace / "settings").mkdir()
    (workspace / "settings" / f"{SETTINGS_MODULE}.py").write_text(SETTINGS)
    (workspace / "settings" / f"{ENCODER_SETTINGS_MODULE}.py").write_text(ENCODER_SETTINGS)
    ring = make_ring(workspace)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DJANGO_SETTINGS_MODULE", "MOESIF_FAST_RING")}
    environment.update(
        PYTHONPATH=os.pathsep.join([str(workspace / "settings"),
                                    environment.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        MOESIF_DEMO_BASE_URI=collector.url, MOESIF_DEMO_APPLICATION_ID=APPLICATION_ID,
        MOESIF_DEMO_OPTIONS=json.dumps({"RING_DIR": str(workspace / "rings")}))
    yield {"ring": ring, "environment": environment, "workspace": workspace,
           "collector": collector}
    ring.close()


def ship(deployment: dict[str, Any], *extra: str, log: str = "shipper.log",
         settings: str = SETTINGS_MODULE) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "moesif_fast", "ship", "--ring", deployment["ring"].path,
               "--settings", settings, *extra]
    with open(deployment["workspace"] / log, "a") as output:
        return subprocess.Popen(command, env=deployment["environment"], stdout=output,
                                stderr=output, stdin=subprocess.DEVNULL, text=True)


def fill_calls(ring: RingFile, poison: tuple[int, int], kind: str) -> set[str]:
    """Call records in every lane, the one at `poison` (lane, number) of `kind`; the
    transaction ids of the others."""
    fill(ring, lambda lane, number: call_record(
        lane, number, kind if (lane, number) == poison else "items"))
    return {f"tx-{lane}-{number}" for lane in range(LANES) for number in range(PER_LANE)
            if (lane, number) != poison}


def assert_delivered_field_by_field(collector: Collector, expected: set[str]) -> None:
    events = {event["transaction_id"]: event for event in collector.events()}
    assert events.keys() == expected
    for transaction_id, event in events.items():
        lane, number = (int(part) for part in transaction_id.split("-")[1:])
        assert event["request"]["uri"] == f"http://api.example.com/items/{lane}-{number}?q=1"
        assert event["request"]["verb"] == "GET"
        assert event["request"]["headers"]["X-LANE"] == str(lane)
        assert event["request"]["headers"]["X-MOESIF-TRANSACTION-ID"] == transaction_id
        assert event["request"]["ip_address"] == "203.0.113.9"
        assert event["response"]["status"] == 200
        assert event["response"]["body"] == {"lane": lane, "number": number}
        assert (event["user_id"], event["metadata"]) == (f"user-{lane}", {"number": number,
                                                                            "tags": ["a"]})


def shipper_counters(ring: RingFile) -> dict[str, Any]:
    """The counters the ring's shipper last published ({} before it did)."""
    try:
        return json.loads(Path(shipper_stats_path(ring.path)).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def ship_until_delivered(deployment: dict[str, Any], delivered: int,
                         settings: str = SETTINGS_MODULE) -> dict[str, Any]:
    """Run a shipper until its counters show `delivered` events, then stop it (SIGTERM: a
    shipper with --idle-exit would remove its counters with the ring); its last counters."""
    shipper = ship(deployment, settings=settings)
    try:
        wait_until(lambda: (counters := shipper_counters(deployment["ring"])).get("pid")
                   == shipper.pid and counters["delivered"] >= delivered, 180,
                   f"{delivered} events delivered")
    finally:
        shipper.send_signal(signal.SIGTERM)
    assert shipper.wait(timeout=60) == 0, (deployment["workspace"] / "shipper.log").read_text()
    return shipper_counters(deployment["ring"])


def test_a_shipper_skips_the_record_the_ring_header_marks(deployment: dict[str, Any]) -> None:
    """As the two previous shippers leave it when both die on a record: the record the header
    suspects, marked again. The marked record would hang the shipper if it were built."""
    ring, collector = deployment["ring"], deployment["collector"]
    expected = fill_calls(ring, (1, 2), "hang")
    lane, position = die_twice_while_decoding(ring, call_record(1, 2, "hang"))
    assert (ring.words[WORD_DECODING_LANE], ring.words[WORD_DECODING_POSITION]) == (2, position)

    counters = ship_until_delivered(deployment, len(expected))
    assert_delivered_field_by_field(collector, expected)
    assert (counters["poison"], counters["delivered"], counters["undecodable"]) == (
        1, len(expected), 0)
    log = (deployment["workspace"] / "shipper.log").read_text()
    assert f"skipped the ring record at lane {lane}, position {position}" in log
    assert ring.stats().records_in_use == 0 and ring.words[WORD_DECODING_LANE] == 0


@pytest.mark.parametrize("kind, settings", [
    ("crash", SETTINGS_MODULE), ("crash-header", ENCODER_SETTINGS_MODULE)],
    ids=["in-mask-event-model", "in-the-encoder"])
def test_a_record_that_crashes_two_shippers_is_skipped_by_the_next(
        deployment: dict[str, Any], kind: str, settings: str) -> None:
    """Crashing in MASK_EVENT_MODEL, and while the event is built without it: where the
    extensions are compiled, in the one call that decodes and builds the batch's events in C
    (`BatchWriter.add_records`), which marks each record itself."""
    ring, collector = deployment["ring"], deployment["collector"]
    expected = fill_calls(ring, (2, 1), kind)

    crash_at = (2, record_span(len(call_record(2, 0))))  # the second record of lane 2
    for _ in range(2):  # the first death makes it a suspect only: it is read again
        crashed = ship(deployment, settings=settings)
        assert crashed.wait(timeout=180) == -signal.SIGSEGV
        assert (ring.words[WORD_DECODING_LANE] - 1,
                ring.words[WORD_DECODING_POSITION]) == crash_at
        assert ring.words[WORD_POISON_COUNT] == 0
    assert (ring.words[WORD_SUSPECT_LANE] - 1, ring.words[WORD_SUSPECT_POSITION]) == crash_at

    assert ship_until_delivered(deployment, len(expected), settings)["poison"] == 1
    assert_delivered_field_by_field(collector, expected)
    log = (deployment["workspace"] / "shipper.log").read_text()
    assert "skipped the ring record at lane {}, position {}".format(*crash_at) in log
    assert ring.stats().records_in_use == 0
    assert ring.words[WORD_POISON_COUNT] == 1 and ring.words[WORD_DECODING_LANE] == 0


SUPERVISOR = """\
import sys
from moesif_fast.shipper.parent import ParentWatch
from moesif_fast.shipper.supervisor import supervise
ring, settings, parent = sys.argv[1:4]
command = [sys.executable, "-m", "moesif_fast", "ship", "--ring", ring, "--settings", settings,
           "--parent", parent]
sys.exit(supervise(command, ParentWatch(int(parent)), deadline=5.0, stall_timeout=6.0))
"""


def test_the_supervisor_kills_hung_shippers_and_the_third_skips_the_record(
        deployment: dict[str, Any]) -> None:
    ring, collector, workspace = (deployment["ring"], deployment["collector"],
                                  deployment["workspace"])
    expected = fill_calls(ring, (0, 3), "hang")
    with open(workspace / "supervisor.log", "w") as output:
        supervisor = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, ring.path, SETTINGS_MODULE, str(os.getpid())],
            env=deployment["environment"], stdout=output, stderr=output,
            stdin=subprocess.DEVNULL, text=True)
    try:
        wait_until(lambda: {event["transaction_id"] for event in collector.events()}
                   >= expected, 180, "every event but the one that hangs the shipper")
        wait_until(lambda: shipper_counters(ring).get("poison") == 1
                   and shipper_counters(ring)["delivered"] >= len(expected), 60,
                   "the second shipper's counters")
        log = (workspace / "supervisor.log").read_text()
        assert "has not heartbeated" in log and "killing it" in log, log
        assert "exited with -9" in log, log
        assert len(moesif_processes(workspace, "ship")) == 1  # the one that took over
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)
    assert supervisor.returncode == 0
    assert_delivered_field_by_field(collector, expected)
    assert ring.stats().records_in_use == 0


def test_a_batch_never_holds_more_records_than_asked(tmp_path: Path) -> None:
    """Every lane with records gets a share of at least one: the last lanes of a round must
    not take theirs once the count is reached (3 lanes, 7 records: 2 + 2 + 2, then 1)."""
    ring = make_ring(tmp_path)
    fill(ring)
    reader = Reader(ring)
    sizes = []
    while batch := reader.read(7, 1 << 20):
        sizes.append(len(batch))
        reader.commit(batch)
    assert sizes == [7, 5]
    reader.close()


def test_a_spool_record_that_crashes_two_shippers_is_skipped_by_the_next(
        deployment: dict[str, Any]) -> None:
    """The same for records read back from the spool: the mark names them by the reader's
    outside lane and their spool sequence number."""
    ring, collector, workspace = (deployment[key] for key in ("ring", "collector", "workspace"))
    options = json.loads(deployment["environment"]["MOESIF_DEMO_OPTIONS"])
    deployment["environment"]["MOESIF_DEMO_OPTIONS"] = json.dumps(
        {**options, "SPOOL_DIR": str(workspace / "spool")})
    folder = spool_folder(load({"APPLICATION_ID": APPLICATION_ID, "BASE_URI": collector.url,
                                "SPOOL_DIR": str(workspace / "spool")}), SETTINGS_MODULE, "")
    os.makedirs(os.path.dirname(folder), mode=0o700)
    spool = Spool(folder)
    records = [call_record(0, number, "crash" if number == 2 else "items")
               for number in range(5)]
    assert spool.append(records) == 5
    spool.close()

    outside_lane = ring.geometry.lane_count
    for _ in range(2):
        crashed = ship(deployment)
        assert crashed.wait(timeout=180) == -signal.SIGSEGV
        assert (ring.words[WORD_DECODING_LANE] - 1, ring.words[WORD_DECODING_POSITION]) == (
            outside_lane, 2)  # the third record the spool ever took

    assert ship_until_delivered(deployment, 4)["poison"] == 1
    assert {event["transaction_id"] for event in collector.events()} == {
        f"tx-0-{number}" for number in (0, 1, 3, 4)}
    assert "skipped the spool record of sequence number 2" in (
        workspace / "shipper.log").read_text()
    reopened = Spool(folder)
    assert reopened.stats().records == 0
    reopened.close()
