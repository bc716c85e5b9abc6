"""Delivered events per second from one shipper.

A ring is filled with 20,000 captured calls (1 KB JSON request and response bodies, ten
headers), then one Shipper drains it to the local collector (a separate process): decode, build
the Moesif events, serialize, gzip, POST, commit. Measured for the reference's BATCH_SIZE (25)
and for larger batches. The shipper is told to finish at once, so it drains at the process's
CPU priority, as it does when catching up (`moesif_fast/shipper/priority.py`).

    python -m pytest benchmarks/bench_shipper.py --benchmark-only
"""

from __future__ import annotations

import os
import tempfile

import pytest
from bench_events import BODIES, captured_call

from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.ringbuffer import Geometry, Producer, RingFile
from moesif_fast.settings import MoesifOptions
from moesif_fast.shipper.loop import Shipper
from moesif_fast.shipper.transport import CollectorTransport

EVENTS = 20_000
BODY = BODIES["json-string"]


@pytest.mark.parametrize("batch_size", [25, 100, 500])
def test_shipper_delivery(benchmark, collector_url: str, batch_size: int) -> None:
    options = MoesifOptions(APPLICATION_ID=APPLICATION_ID, BASE_URI=collector_url,
                            BATCH_SIZE=batch_size)
    records = [captured_call(number, BODY) for number in range(EVENTS)]

    def fill() -> tuple[tuple[Shipper], dict[str, object]]:
        directory = tempfile.mkdtemp()
        ring = RingFile.create(os.path.join(directory, "bench.ring"),
                               Geometry.for_size(256 << 20, 1, 2 * EVENTS))
        producer = Producer(ring)
        assert all(producer.append(record) for record in records)
        producer.close()
        transport = CollectorTransport(collector_url, APPLICATION_ID, user_agent="bench")
        return (Shipper(ring, options, transport),), {}

    def drain(shipper: Shipper) -> None:
        assert shipper.run(lambda: True, finish_deadline=120)
        assert shipper.counters.delivered == EVENTS
        shipper.reader.close()
        shipper.ring.unlink()

    benchmark.pedantic(drain, setup=fill, rounds=3, iterations=1)
    benchmark.extra_info["events_per_second"] = round(EVENTS / benchmark.stats.stats.median)
