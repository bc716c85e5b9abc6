"""Whole-server throughput: gunicorn requests/s with capture over without capture.

Side by side in one run, same machine: the example API under gunicorn (2 sync workers, the
gunicorn_conf.py hooks) without the middleware, then with it (ring, shipper and local collector
sharing the same cores) at the reference's default BATCH_SIZE of 25 and at 250. Load: 2 client
processes x 4 threads, a 1 KB JSON POST per request, a new connection per request (gunicorn's
sync workers close them). After each capture run, gunicorn is stopped and every answered
request must have its event at the collector.

    python -m pytest benchmarks/bench_gunicorn.py --benchmark-only
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from moesif_fast.demo.run import collector_stats, start_collector, start_gunicorn, stop

REQUESTS_PER_ROUND = 3000
ROUNDS = 5
CLIENT_PROCESSES = 2
THREADS_PER_PROCESS = 4
BODY = json.dumps({"user": "ada", "note": "x" * 960}).encode()


def send(url: str, count: int) -> int:
    """POST `count` requests to /api/echo from one thread; returns how many were answered."""
    address = urlsplit(url)
    answered = 0
    for _ in range(count):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        connection.request("POST", "/api/echo", BODY, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        answered += response.status == 201
        connection.close()
    return answered


def client_process(url: str, count: int) -> int:
    with concurrent.futures.ThreadPoolExecutor(THREADS_PER_PROCESS) as threads:
        share = count // THREADS_PER_PROCESS
        return sum(threads.map(send, [url] * THREADS_PER_PROCESS, [share] * THREADS_PER_PROCESS))


def load(url: str, clients: concurrent.futures.ProcessPoolExecutor) -> int:
    share = REQUESTS_PER_ROUND // CLIENT_PROCESSES
    return sum(clients.map(client_process, [url] * CLIENT_PROCESSES, [share] * CLIENT_PROCESSES))


@pytest.fixture(scope="module")
def clients() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(CLIENT_PROCESSES) as pool:
        yield pool


@pytest.fixture(scope="module")
def workspace() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_collector(directory)
        yield directory, url
        stop(process)


def run_server(benchmark, workspace: tuple[str, str], clients, capture: bool,
               options: dict[str, object] | None = None) -> int:
    directory, collector_url = workspace
    os.environ["MOESIF_DEMO_CAPTURE"] = "1" if capture else "0"
    try:
        server, url = start_gunicorn(directory, collector_url, workers=2, options=options)
    finally:
        del os.environ["MOESIF_DEMO_CAPTURE"]
    try:
        answered = [load(url, clients)]  # warm-up round, not timed
        benchmark.pedantic(lambda: answered.append(load(url, clients)), rounds=ROUNDS,
                           iterations=1)
        benchmark.extra_info["requests_per_second"] = round(
            REQUESTS_PER_ROUND / benchmark.stats.stats.median)
    finally:
        assert stop(server) == 0
    return sum(answered)


def test_gunicorn_without_capture(benchmark, workspace, clients) -> None:
    answered = run_server(benchmark, workspace, clients, capture=False)
    assert answered == (ROUNDS + 1) * REQUESTS_PER_ROUND


@pytest.mark.parametrize("batch_size", [25, 250])
def test_gunicorn_with_capture(benchmark, workspace, clients, batch_size: int) -> None:
    """BATCH_SIZE 25 is the reference's default; with larger batches the shipper and the
    collector spend less CPU per event on HTTP (both share the cores here)."""
    before = collector_stats(workspace[1])["events"]
    answered = run_server(benchmark, workspace, clients, capture=True,
                          options={"BATCH_SIZE": batch_size})
    delivered = collector_stats(workspace[1])["events"] - before
    benchmark.extra_info["events_delivered"] = delivered
    assert answered == (ROUNDS + 1) * REQUESTS_PER_ROUND
    assert delivered == answered
