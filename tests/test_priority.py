"""The shipper's CPU priority: below the workers' while it keeps up, the process's own while it
catches up (moesif_fast.shipper.priority), against a real ring and the real local collector."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, wait_until

from moesif_fast import settings as moesif_settings
from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.record import CapturedCall, encode_call, header_columns
from moesif_fast.ringbuffer import Geometry, Producer, RingFile
from moesif_fast.shipper.loop import IN_FLIGHT, Shipper
from moesif_fast.shipper.priority import HIGH_WATER, LOW_NICE, LOW_WATER, CatchUp, drive
from moesif_fast.shipper.transport import CollectorTransport, Outcome

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values")


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def recording_passes(count: int, seen: list[int]) -> Generator[None, None, str]:
    for _ in range(count):
        seen.append(thread_nice())
        yield
    return "finished"


@linux_only
def test_drive_runs_each_pass_at_the_priority_asked_for_and_returns_the_loops_value() -> None:
    own_nice = thread_nice()
    wanted = iter([False, False, True, True, False, True, False])  # before pass 1, after 1, ...
    seen: list[int] = []
    assert drive(recording_passes(6, seen), lambda: next(wanted)) == "finished"
    assert seen == [LOW_NICE, LOW_NICE, own_nice, own_nice, LOW_NICE, own_nice]
    assert thread_nice() == own_nice  # the caller's own thread is never lowered


def failing_passes(fail_at: int) -> Generator[None, None, None]:
    for number in range(10):
        if number == fail_at:
            raise ValueError(f"pass {number}")
        yield


@pytest.mark.parametrize("normal", [False, True], ids=["in-the-low-thread", "in-this-thread"])
def test_drive_raises_what_a_pass_raised(normal: bool) -> None:
    with pytest.raises(ValueError, match="pass 3"):
        drive(failing_passes(3), lambda: normal)
    assert not [thread for thread in threading.enumerate()
                if thread.name == "moesif-shipper-low"]


def test_drive_raises_what_the_priority_check_raised_in_the_low_thread() -> None:
    checks = 0

    def wants_normal() -> bool:  # the first check is made in this thread, the second in the low
        nonlocal checks
        checks += 1
        if checks == 2:
            raise ValueError("check 2")
        return False

    with pytest.raises(ValueError, match="check 2"):
        drive(recording_passes(3, []), wants_normal)


@pytest.mark.parametrize(("fills", "states", "started"), [
    ([0.0, HIGH_WATER - 0.01, HIGH_WATER, 0.3, LOW_WATER, LOW_WATER - 0.01, 0.3],
     [False, False, True, True, True, False, False], 1),
    ([1.0, 0.0, 1.0, 0.0], [True, False, True, False], 2),
])
def test_a_catch_up_starts_at_high_water_and_ends_under_low_water(
        fills: list[float], states: list[bool], started: int) -> None:
    catch_up = CatchUp()
    assert [catch_up.update(fill) for fill in fills] == states
    assert catch_up.started == started


# -- a shipper ----------------------------------------------------------------------------------

LANE_RECORDS = 40  # the lane's record limit: HIGH_WATER is 20 records


def call(number: int) -> bytes:
    return encode_call(tuple(CapturedCall(
        "Incoming", 1_700_000_000_000_000_000, 1_700_000_000_001_000_000, "GET",
        f"http://api.example.com/items?n={number}", header_columns([("HTTP_ACCEPT", "*/*")]),
        "10.0.0.1", None, 200, (("Content-Type", "application/json"),), b'{"ok": true}', None,
        None, None, None, None, 1, None)))


@pytest.fixture
def small_ring(workspace: Path) -> RingFile:
    return RingFile.create(str(workspace / "small.ring"),
                           Geometry.for_size(1 << 20, 1, LANE_RECORDS))


class NiceRecordingTransport(CollectorTransport):
    """The real transport, noting the nice value of the thread making each POST."""

    def __init__(self, base_uri: str) -> None:
        super().__init__(base_uri, APPLICATION_ID, user_agent="test", max_backoff=0.2)
        self.nice_of_posts: list[int] = []

    def post(self, *arguments: Any, **keywords: Any) -> Outcome:
        self.nice_of_posts.append(thread_nice())
        return super().post(*arguments, **keywords)


def new_shipper(ring: RingFile, collector: Collector) -> Shipper:
    options = moesif_settings.load({"APPLICATION_ID": APPLICATION_ID,
                                    "BASE_URI": collector.url, "BATCH_SIZE": 5})
    return Shipper(ring, options, NiceRecordingTransport(options.base_uri))


def start_shipper(ring: RingFile, collector: Collector) -> tuple[Shipper, Callable[[], bool]]:
    """A shipper running in a thread, and a function that finishes it (True when it
    delivered everything)."""
    shipper = new_shipper(ring, collector)
    transport = shipper.transport
    finish = threading.Event()
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(
        shipper.run(finish.is_set, finish_deadline=30)), daemon=True)
    thread.start()

    def stop() -> bool:
        finish.set()
        thread.join(60)
        shipper.reader.close()
        transport.close()
        return outcome == [True]
    return shipper, stop


@linux_only
def test_senders_and_loop_work_below_the_callers_priority_while_the_shipper_keeps_up(
        small_ring: RingFile, collector: Collector) -> None:
    shipper, stop = start_shipper(small_ring, collector)
    try:
        producer = Producer(small_ring)
        assert all(producer.append(call(number)) for number in range(10))
        producer.close()
        wait_until(lambda: shipper.counters.delivered == 10, 30, "the 10 events")
        threads = {thread.name: thread.native_id for thread in threading.enumerate()}
        nice = {name: os.getpriority(os.PRIO_PROCESS, native_id)
                for name, native_id in threads.items() if name.startswith("moesif-")}
        assert nice["moesif-shipper-low"] == LOW_NICE
        for number in range(IN_FLIGHT):
            assert nice[f"moesif-sender-low-{number}"] == LOW_NICE
            assert nice[f"moesif-sender-normal-{number}"] == thread_nice()
        assert (shipper.catch_up.active, shipper.catch_up.started) == (False, 0)
        assert set(shipper.transport.nice_of_posts) == {LOW_NICE}
    finally:
        assert stop()


@linux_only
def test_finishing_is_done_at_the_callers_priority_and_is_no_catch_up(
        small_ring: RingFile, collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    producer = Producer(small_ring)
    assert all(producer.append(call(number)) for number in range(10))
    producer.close()
    shipper = new_shipper(small_ring, collector)
    with caplog.at_level(logging.INFO, logger="moesif_fast.shipper"):
        assert shipper.run(lambda: True, finish_deadline=30)
    shipper.reader.close()
    shipper.transport.close()
    assert shipper.counters.delivered == 10
    assert shipper.transport.nice_of_posts == [thread_nice()] * 2
    assert (shipper.catch_up.started, shipper.counters.catch_ups) == (0, 0)
    assert "priority" not in caplog.text


def test_a_ring_past_half_full_is_caught_up_at_the_processs_priority_then_left_to_the_low_one(
        small_ring: RingFile, collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    collector.set_faults({"status": 503})  # every batch refused for now: the ring fills
    shipper, stop = start_shipper(small_ring, collector)
    try:
        producer = Producer(small_ring)
        with caplog.at_level(logging.INFO, logger="moesif_fast.shipper"):
            assert all(producer.append(call(number)) for number in range(30))
            producer.close()
            wait_until(lambda: shipper.catch_up.active, 30, "a catch-up")
            assert shipper.counters.delivered == 0
            collector.set_faults({})
            wait_until(lambda: shipper.counters.delivered >= 30, 30, "the 30 events")
            wait_until(lambda: not shipper.catch_up.active and "caught up" in caplog.text, 30,
                       "the end of the catch-up, logged")
        assert shipper.catch_up.started == 1
        assert [record.getMessage() for record in caplog.records
                if "priority" in record.getMessage()] == [
            "moesif_fast shipper: the backlog is over half full; catching up at the process's "
            "CPU priority",
            "moesif_fast shipper: caught up; back below the workers' CPU priority"]
    finally:
        assert stop()
    uris = {event["request"]["uri"] for event in collector.events()}
    assert uris == {f"http://api.example.com/items?n={number}" for number in range(30)}
    assert small_ring.stats().records_in_use == 0
    wait_until(lambda: not [thread for thread in threading.enumerate()
                            if thread.name.startswith("moesif-")], 10,
               "the shipper's threads to end with run()")
