"""Whole-server throughput: gunicorn requests/s with capture over without capture.

Side by side in one run, same machine: the example API under gunicorn (2 sync workers, the
hooks) without the middleware, with it at the reference's default BATCH_SIZE
of 25, and with it at 250 (ring, shipper and local collector sharing the same cores). Load: 2
client processes x 4 threads, a 1 KB JSON POST per request, a new connection per request
(gunicorn's sync workers close them).

The three servers run at once, idle but for the one under load, and their rounds are
interleaved (the order rotates each cycle): on a shared machine, load from other tenants drifts
over a minute by more than the effect measured, and a server measured after another would
carry that drift into the ratio. After each capture round the next round waits, untimed, until
the collector holds every event of it, so that no shipper works during another server's round.
(The capture round's time thus leaves out the shipper's last fraction of a second of work,
about one batch. The summary shows how many events were still undelivered when each round's
last answer came: a shipper that fell behind would show it there.) Rings live where they do by
default (`/dev/shm`), not in the collector's temporary directory on disk.

The local collector stands in for Moesif's servers, whose work is not on the host at all: it
runs at nice 19, so that it takes only CPU time the server leaves idle. The shipper shares the
cores at its own priorities (`moesif_fast/shipper/priority.py`).

    python -m pytest benchmarks/bench_gunicorn.py --benchmark-only

The benchmark's own row is one cycle (a round of each server); the result is in extra_info
and in the summary printed after the table: each server's median requests/s and the ratios.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import psutil
import pytest

from moesif_fast.demo.run import collector_stats, start_collector, start_gunicorn, stop
from moesif_fast.settings import MoesifOptions

REQUESTS_PER_ROUND = 3000
CYCLES = 7
CLIENT_PROCESSES = 2
THREADS_PER_PROCESS = 4
BODY = json.dumps({"user": "ada", "note": "x" * 960}).encode()
DELIVERY_TIMEOUT = 60.0
COLLECTOR_NICE = 19
SERVERS: dict[str, dict[str, object] | None] = {  # name: MOESIF_MIDDLEWARE options, or no capture
    "without capture": None,
    "BATCH_SIZE 25": {"BATCH_SIZE": 25},
    "BATCH_SIZE 250": {"BATCH_SIZE": 250},
}


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


def wait_for_events(collector_url: str, count: int) -> None:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while collector_stats(collector_url)["events"] < count:
        assert time.monotonic() < deadline, "the shipper did not deliver the round's events"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def clients() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(CLIENT_PROCESSES) as pool:
        yield pool


@pytest.fixture(scope="module")
def collector() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_collector(directory)
        for thread in psutil.Process(process.pid).threads():  # new threads inherit it
            os.setpriority(os.PRIO_PROCESS, thread.id, COLLECTOR_NICE)
        yield url
        stop(process)


def test_gunicorn_capture_ratio(benchmark, collector: str, clients,
                                report: Callable[[str], None]) -> None:
    ring_dir = MoesifOptions().ring_dir
    urls: dict[str, str] = {}
    rounds: dict[str, list[float]] = {name: [] for name in SERVERS}
    answered = dict.fromkeys(SERVERS, 0)
    undelivered: dict[str, list[int]] = {name: [] for name in SERVERS if SERVERS[name]}
    events_expected = collector_stats(collector)["events"]

    def round_of(name: str) -> float:
        nonlocal events_expected
        started = time.perf_counter()
        count = load(urls[name], clients)
        elapsed = time.perf_counter() - started
        answered[name] += count
        if SERVERS[name] is not None:
            events_expected += count
            undelivered[name].append(events_expected - collector_stats(collector)["events"])
            wait_for_events(collector, events_expected)
        return elapsed

    def cycle() -> None:
        names = list(SERVERS)
        turn = len(rounds[names[0]]) % len(names)
        for name in names[turn:] + names[:turn]:
            rounds[name].append(round_of(name))

    with tempfile.TemporaryDirectory(dir=ring_dir) as directory:
        servers = []
        try:
            for name, options in SERVERS.items():
                os.environ["MOESIF_DEMO_CAPTURE"] = "0" if options is None else "1"
                try:
                    server_directory = os.path.join(directory, str(len(servers)))
                    os.mkdir(server_directory)
                    server, urls[name] = start_gunicorn(server_directory, collector, workers=2,
                                                        options=options)
                finally:
                    del os.environ["MOESIF_DEMO_CAPTURE"]
                servers.append(server)
                round_of(name)  # warm-up, not timed
            benchmark.pedantic(cycle, rounds=CYCLES, iterations=1)
        finally:
            exit_codes = [stop(server) for server in servers]
    assert exit_codes == [0] * len(servers)
    assert answered == dict.fromkeys(SERVERS, (CYCLES + 1) * REQUESTS_PER_ROUND)
    assert collector_stats(collector)["events"] == events_expected  # no event twice either

    per_second = {name: REQUESTS_PER_ROUND / statistics.median(times)
                  for name, times in rounds.items()}
    baseline = per_second["without capture"]
    benchmark.extra_info.update(
        requests_per_second={name: round(rate) for name, rate in per_second.items()},
        ratio={name: round(rate / baseline, 3) for name, rate in per_second.items()},
        undelivered_at_round_end=undelivered,
        rounds_requests_per_second={name: [round(REQUESTS_PER_ROUND / t) for t in times]
                                    for name, times in rounds.items()})
    report("gunicorn requests/s, median of interleaved rounds (ratio to without capture): "
           + ", ".join(f"{name} {rate:,.0f} ({rate / baseline:.2f})"
                       for name, rate in per_second.items()))
    report("events not delivered yet when a round's last answer came, median (most): "
           + ", ".join(f"{name} {statistics.median(counts):.0f} ({max(counts)})"
                       for name, counts in undelivered.items()))
