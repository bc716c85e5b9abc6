"""CPU the local collector spends per ingested event.

The collector runs as a process of its own (`start_collector`, as in bench_gunicorn.py, where
it shares the cores with the server). 4 threads post 2,000 gzipped batches of 25 events, shaped
like the shipper's (about 2.7 KB of JSON each), over keep-alive connections, and the collector
process's CPU time (user + system, psutil) is read before and after: extra_info
`cpu_us_per_event` (over all rounds) is what the collector costs the machine per event.

    python -m pytest benchmarks/bench_collector.py --benchmark-only
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import json
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit

import psutil
import pytest

from moesif_fast.demo.run import APPLICATION_ID, collector_stats, start_collector, stop

BATCHES = 2000
BATCH_SIZE = 25
THREADS = 4
NOTE = "x" * 960


def shipped_event(number: int) -> dict[str, object]:
    """An event as the shipper builds it from a captured 1 KB JSON POST (bench_shipper.py)."""
    transaction_id = f"1f0c8e2a-6b1d-4c3e-9a57-{number:012d}"
    return {
        "request": {
            "time": "2026-11-24T11:13:46.114",
            "uri": f"http://api.example.com/api/echo?n={number}",
            "verb": "POST",
            "headers": {**{f"X-HEADER-{n}": f"value {n}" for n in range(8)},
                        "HOST": "api.example.com", "CONTENT-TYPE": "application/json",
                        "X-MOESIF-TRANSACTION-ID": transaction_id},
            "api_version": None,
            "ip_address": "203.0.113.9",
            "body": {"user": "ada", "note": NOTE},
            "transfer_encoding": "json",
        },
        "response": {
            "time": "2026-11-24T11:13:46.115",
            "status": 201,
            "headers": {"Content-Type": "application/json",
                        "x-moesif-transaction-id": transaction_id},
            "body": {"user": "ada", "note": NOTE},
            "ip_address": None,
            "transfer_encoding": "json",
        },
        "session_token": None,
        "tags": None,
        "user_id": None,
        "company_id": None,
        "metadata": None,
        "direction": "Incoming",
        "weight": 1,
        "blocked_by": None,
        "transaction_id": transaction_id,
    }


def batch_bodies() -> list[bytes]:
    """The gzipped batch bodies, serialized and compressed the way the shipper does."""
    return [
        gzip.compress(json.dumps([shipped_event(batch * BATCH_SIZE + n) for n in range(BATCH_SIZE)],
                                 separators=(",", ":")).encode(), compresslevel=1, mtime=0)
        for batch in range(BATCHES)
    ]


def post_batches(url: str, bodies: list[bytes]) -> None:
    """POST `bodies` to /v1/events/batch over one keep-alive connection; each must be a 201."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    headers = {"X-Moesif-Application-Id": APPLICATION_ID, "Content-Encoding": "gzip",
               "Content-Type": "application/json; charset=utf-8"}
    try:
        for body in bodies:
            connection.request("POST", "/v1/events/batch", body, headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 201, response.status
    finally:
        connection.close()


def ingest(url: str, bodies: list[bytes]) -> None:
    """Post every body, split between THREADS threads."""
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        shares = [bodies[thread::THREADS] for thread in range(THREADS)]
        list(pool.map(post_batches, [url] * THREADS, shares))


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[psutil.Process, str]]:
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_collector(directory)
        try:
            yield psutil.Process(process.pid), url
        finally:
            stop(process)


def test_collector_ingestion_cpu(benchmark, collector: tuple[psutil.Process, str]) -> None:
    process, url = collector
    bodies = batch_bodies()
    ingest(url, bodies[:100])  # warm-up: connections, first pages of the database
    events_before = collector_stats(url)["events"]
    cpu_before = cpu_seconds(process)

    benchmark.pedantic(ingest, args=(url, bodies), rounds=3, iterations=1)

    cpu = cpu_seconds(process) - cpu_before
    events = collector_stats(url)["events"] - events_before  # after the CPU reading: it costs
    assert events == 3 * BATCHES * BATCH_SIZE
    benchmark.extra_info["cpu_us_per_event"] = round(cpu / events * 1e6, 1)
    benchmark.extra_info["cpu_ms_per_batch"] = round(cpu / (3 * BATCHES) * 1e3, 2)
