"""The shipper's drop report logs what each count gained, by reason, at once the first time and
then at most once per REPORT_INTERVAL (a real ring whose producer drops records, a real
transport that has made no attempt)."""

from __future__ import annotations

import logging
import os
import tempfile
from types import SimpleNamespace

import pytest

from moesif_fast.ringbuffer import Geometry, Producer, RingFile
from moesif_fast.shipper.drops import DropReport
from moesif_fast.shipper.transport import CollectorTransport

RING_FULL = "events dropped by workers: the ring was full"
MASKED_OUT = "events dropped by MASK_EVENT_MODEL"


def fill_until_dropped(producer: Producer, drops: int) -> None:
    """Append until the ring has refused `drops` records (nothing reads it)."""
    refused = 0
    while refused < drops:
        refused += not producer.append(b"r" * 1000)


def test_each_reason_is_logged_with_what_it_gained(caplog: pytest.LogCaptureFixture) -> None:
    counters = SimpleNamespace(masked_out=1)  # counted before the report began: not logged
    with tempfile.TemporaryDirectory() as directory:
        ring = RingFile.create(os.path.join(directory, "drops.ring"),
                               Geometry(2, 64 << 10, 1_000_000))
        producer = Producer(ring)
        try:
            report = DropReport.for_shipper(
                ring, None, counters, CollectorTransport("http://127.0.0.1:9", "app",
                                                         user_agent="test"))
            with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
                report.report()
                assert caplog.messages == []

                fill_until_dropped(producer, 3)
                counters.masked_out += 2
                report.report()
                assert sorted(caplog.messages) == [
                    f"moesif_fast shipper: 2 {MASKED_OUT} since the last report (3 in all)",
                    f"moesif_fast shipper: 3 {RING_FULL} since the last report (3 in all)"]

                caplog.clear()  # within REPORT_INTERVAL: counted, not logged yet
                fill_until_dropped(producer, 4)
                report.report()
                assert caplog.messages == []

                report._next = dict.fromkeys(report._next, 0.0)  # REPORT_INTERVAL later
                report.report()
                assert caplog.messages == [
                    f"moesif_fast shipper: 4 {RING_FULL} since the last report (7 in all)"]
        finally:
            producer.close()
            ring.close()
