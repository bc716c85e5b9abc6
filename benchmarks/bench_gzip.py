"""gzip of real event batches: zlib at level 1 (the fallback) against ISA-L (`isal`).

    python -m pytest benchmarks/bench_gzip.py --benchmark-only

The batches are what the shipper compresses: records as in bench_events.py (ten request
headers, two response headers, the same 1 KB body on both sides) decoded, built into events by
`EventBuilder.encode` and joined by `serialize_batch`, BATCH_SIZES events per batch. Two kinds of
body: the same JSON, made mostly of one long string, in every event (bench_events.py's; it
compresses very well), and a different JSON of random hexadecimal ids, amounts and codes in each
event (it compresses far less, like distinct real API payloads). Each round
compresses every batch of EVENTS events, timed with `time.process_time`. extra_info has the CPU
per event in microseconds (median round and fastest), the compressed bytes per event and the
compressed size as a fraction of the JSON. Every output is checked to be standard gzip that
`gzip.decompress` turns back into the batch.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from bench_events import BODIES, captured_call

from moesif_fast.event import EventBuilder, serialize_batch
from moesif_fast.record import decode
from moesif_fast.settings import MoesifOptions

EVENTS = 2_000
ROUNDS = 15
BATCH_SIZES = [25, 100]


def _random_json(seed: int) -> bytes:
    """About 1 KB of JSON with little repetition, different for each seed: random ids, amounts
    and codes."""
    generator = random.Random(seed)
    items = [{"id": f"{generator.getrandbits(64):016x}", "amount": generator.randrange(10**9),
              "code": generator.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") + str(generator.random())}
             for _ in range(14)]
    return json.dumps({"items": items}).encode()


PAYLOADS: dict[str, Callable[[int], bytes]] = {
    "json-string": lambda number: BODIES["json-string"],
    "json-random": _random_json,
}


def _zlib(level: int) -> Callable[[bytes], bytes]:
    return lambda data: gzip.compress(data, compresslevel=level, mtime=0)


def _isal(level: int) -> Callable[[bytes], bytes]:
    igzip = pytest.importorskip("isal.igzip")
    return lambda data: igzip.compress(data, compresslevel=level, mtime=0)


CODECS: dict[str, Callable[[], Callable[[bytes], bytes]]] = {
    "zlib-1": lambda: _zlib(1),
    "isal-0": lambda: _isal(0),
    "isal-1": lambda: _isal(1),
    "isal-2": lambda: _isal(2),
}


def batch_bodies(body: Callable[[int], bytes], batch_size: int) -> list[bytes]:
    """EVENTS events, event n with request and response body `body(n)`, as JSON batches of
    `batch_size`."""
    builder = EventBuilder(MoesifOptions())
    events = [builder.encode(decode(captured_call(number, body(number))))
              for number in range(EVENTS)]
    return [serialize_batch(events[start:start + batch_size])
            for start in range(0, EVENTS, batch_size)]


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.benchmark(timer=time.process_time)
def test_gzip_cpu_and_size_per_event(benchmark: Any, payload: str, batch_size: int,
                                     codec: str) -> None:
    compress = CODECS[codec]()
    bodies = batch_bodies(PAYLOADS[payload], batch_size)
    compressed = [compress(body) for body in bodies]
    assert [gzip.decompress(data) for data in compressed] == bodies
    benchmark.group = f"{payload} body, {batch_size} events per batch"
    benchmark.pedantic(lambda: [compress(body) for body in bodies], rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    raw_bytes = sum(map(len, bodies))
    compressed_bytes = sum(map(len, compressed))
    benchmark.extra_info["us_per_event"] = round(stats.median / EVENTS * 1e6, 2)
    benchmark.extra_info["us_per_event_fastest"] = round(stats.min / EVENTS * 1e6, 2)
    benchmark.extra_info["json_bytes_per_event"] = round(raw_bytes / EVENTS)
    benchmark.extra_info["gzip_bytes_per_event"] = round(compressed_bytes / EVENTS)
    benchmark.extra_info["compressed_fraction"] = round(compressed_bytes / raw_bytes, 3)
