"""The shipper's CPU per event, stage by stage, in process: from a ring record to gzipped bytes.

    python -m pytest benchmarks/bench_events.py --benchmark-only

Records as in bench_shipper.py (ten request headers, two response headers, the same kind of body
on both sides), with three kinds of 1 KB body: JSON made mostly of one long string, JSON made of
35 small objects, and plain text (sent as base64). The stages, side by side for each kind:

* decode: `record.decode`, payload → CapturedCall (MessagePack and the record's type checks),
  through the compiled decoder `moesif_fast._recorddecode` when it is built and not forced off;
* decode-python: the same with the pure-Python path (the compiled decoder set aside for the
  round), side by side in the same run; with the extension missing, both rows are the Python
  path;
* encode: `EventBuilder.encode`, CapturedCall → the event's JSON text (header naming, IP, user,
  times, body detection and JSON validation, writing the text), through the compiled extension
  `moesif_fast._eventjson` when it is built and not forced off;
* encode-python: the same with the pure-Python path (the builder's compiled encoder removed),
  side by side in the same run; with the extension missing, both rows are the Python path;
* batch: BATCH_SIZE CapturedCalls → the gzipped JSON array, as the shipper's loop makes it
  (`event.BatchWriter` writing the events into a `transport.GzipStream`: ISA-L level 1 where
  `isal` is installed, else zlib level 1): encode and gzip together, with no bytes object per
  event.

Each round runs its stage over EVENTS events, BATCH_SIZE at a time as the shipper does, timed
with `time.process_time` (CPU of this process only: other processes on the machine do not count,
though they still disturb caches). extra_info has the CPU per event in microseconds, from the
median round and from the fastest one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest

from moesif_fast import record
from moesif_fast.event import BatchWriter, EventBuilder
from moesif_fast.record import CapturedCall, decode, encode_call, header_columns
from moesif_fast.settings import MoesifOptions
from moesif_fast.shipper.transport import GzipStream

EVENTS = 2_000
BATCH_SIZE = 25
ROUNDS = 15
HEADERS = tuple((f"HTTP_X_HEADER_{number}", f"value {number}") for number in range(8)) + (
    ("HTTP_HOST", "api.example.com"), ("CONTENT_TYPE", "application/json"))
BODIES = {
    "json-string": json.dumps({"user": "ada", "note": "x" * 960}).encode(),
    "json-objects": json.dumps({"ok": True, "items": [{"id": number, "label": f"label {number}"}
                                                      for number in range(35)]}).encode(),
    "text": b"Lorem ipsum dolor sit amet. " * 36,
}
STAGES = ["decode", "decode-python", "encode", "encode-python", "batch"]


def captured_call(number: int, body: bytes) -> bytes:
    now = time.time_ns()
    return encode_call((
        "Incoming", now, now + 1_000_000, "POST", f"http://api.example.com/api/echo?n={number}",
        header_columns(HEADERS), "203.0.113.9", body, 201,
        (("Content-Type", "application/json"), ("x-moesif-transaction-id", f"t-{number}")),
        body, f"t-{number}", None, None, None, None, 1, None, 0))


def batches(items: list[Any]) -> list[list[Any]]:
    return [items[start:start + BATCH_SIZE] for start in range(0, len(items), BATCH_SIZE)]


def decode_python(records: list[list[bytes]]) -> list[list[CapturedCall]]:
    """`decode` over all records with the compiled decoder set aside: the pure-Python path."""
    with mock.patch.object(record, "compiled_decode", None):
        return [[decode(payload) for payload in batch] for batch in records]


def stage_runs(body: bytes) -> dict[str, Callable[[], object]]:
    """Each stage as a function over all EVENTS, its input prepared outside the timed region."""
    builder = EventBuilder(MoesifOptions())
    python_builder = EventBuilder(MoesifOptions())
    python_builder._compiled_encode = None
    records = batches([captured_call(number, body) for number in range(EVENTS)])
    calls: list[list[CapturedCall]] = [[decode(payload) for payload in batch]
                                       for batch in records]
    writer = BatchWriter(builder)
    return {
        "decode": lambda: [[decode(payload) for payload in batch] for batch in records],
        "decode-python": lambda: decode_python(records),
        "encode": lambda: [[builder.encode(call) for call in batch] for batch in calls],
        "encode-python": lambda: [[python_builder.encode(call) for call in batch]
                                  for batch in calls],
        "batch": lambda: [gzipped_batch(writer, batch) for batch in calls],
    }


def gzipped_batch(writer: BatchWriter, calls: list[CapturedCall]) -> bytes:
    gzip = GzipStream()
    writer.start(gzip.write)
    for call in calls:
        writer.add(call)
    writer.finish()
    return gzip.finish()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("body_kind", list(BODIES))
@pytest.mark.benchmark(timer=time.process_time)
def test_stage_cpu_per_event(benchmark: Any, body_kind: str, stage: str) -> None:
    run = stage_runs(BODIES[body_kind])[stage]
    benchmark.group = f"{body_kind} body, {EVENTS} events"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    benchmark.extra_info["us_per_event"] = round(stats.median / EVENTS * 1e6, 2)
    benchmark.extra_info["us_per_event_fastest"] = round(stats.min / EVENTS * 1e6, 2)
