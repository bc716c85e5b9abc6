"""Sustained saturation: what capture costs, and what is delivered, when the server is flat out.

The example API under gunicorn (2 sync workers, the hooks) takes unpaced load from 2 client
processes x 4 threads, a 1 KB JSON POST per request and a new connection per request, as in
bench_gunicorn.py, in alternating rounds of SATURATION_S seconds (10 by default;
MOESIF_BENCH_SATURATION_S overrides it): without capture (MOESIF_DEMO_CAPTURE=0), with it,
without, with... ROUNDS of each (3; MOESIF_BENCH_SATURATION_ROUNDS). Each round starts a server,
loads it untimed for WARMUP_S seconds (a fresh server's first seconds, its shipper's start among
them, are not the steady state a server spends its life in), then for the timed round, and
stops it with SIGTERM. A shared machine drifts by tens of percent over a minute, so each
capture round is compared with the rounds without capture beside it (its paired ratio); the
report has every round, the paired ratios and their median, and the ratio of the totals. The
capture servers share one ring folder, on tmpfs where rings live by default (RING_DIR), and one
spool folder on disk (SPOOL_DIR): what one leaves in the spool, the next delivers.

For each capture round the report has: requests answered and requests/s, the events the
collector holds when the load stops, the shipper's spool counters and the ring's drops (`python
-m moesif_fast stats --json`), and the events held once gunicorn has exited after SIGTERM (what
SHUTDOWN_DEADLINE let the shipper deliver). If events are still missing after the last round,
the server is started again with the same options, which delivers what was left in the spool;
the report adds the time until every answered request's event arrived. Asserted: every answered
request has an event in the end, and nothing was dropped (events delivered twice are allowed,
at-least-once, and reported). No timing is asserted.

The local collector stands in for Moesif's servers, whose work is not on the host at all: it
runs at nice 19, so that it takes as little as it can of the CPU time the server wants, and
the report gives the share of the machine it took in each capture round all the same (it must
keep up, or the shipper's POSTs would back up), which a real deployment does not pay.

    python -m pytest benchmarks/bench_saturation.py --benchmark-only -s

The benchmark's own row is the whole alternating run; the results are in extra_info, printed,
and in the summary after the table.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
from paired import paired_ratios

from moesif_fast.collector import read_events, read_stats
from moesif_fast.demo.run import start_gunicorn, stop
from moesif_fast.settings import MoesifOptions

SATURATION_S = float(os.environ.get("MOESIF_BENCH_SATURATION_S", "10"))  # one round
ROUNDS = int(os.environ.get("MOESIF_BENCH_SATURATION_ROUNDS", "3"))  # of each kind
WARMUP_S = 2.0  # untimed load on each new server before its round
CLIENT_PROCESSES = 2
THREADS_PER_PROCESS = 4
WORKERS = 2
BODY = json.dumps({"user": "ada", "note": "x" * 960}).encode()
REQUEST_ID_PARAMETER = "rid"  # names each request, to match events with answers
STOP_TIMEOUT = 120.0  # SIGTERM to exit: gunicorn's graceful stop, then SHUTDOWN_DEADLINE
DELIVERY_TIMEOUT = 600.0  # for the restarted server's backlog (a failure, not a timing)


def send_until(url: str, deadline: float, label: str) -> tuple[list[str], int]:
    """POST to /api/echo from one thread until `deadline` (time.monotonic, which is the same
    clock in every process on Linux); the ids of the requests answered 201, and the number of
    the others (errors or other statuses)."""
    address = urlsplit(url)
    answered: list[str] = []
    failed = 0
    number = 0
    while time.monotonic() < deadline:
        request_id = f"{label}-{number}"
        number += 1
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        try:
            connection.request("POST", f"/api/echo?{REQUEST_ID_PARAMETER}={request_id}", BODY,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status == 201:
                answered.append(request_id)
            else:
                failed += 1
        except (OSError, http.client.HTTPException):
            failed += 1
        finally:
            connection.close()
    return answered, failed


def client_process(url: str, deadline: float, label: str) -> tuple[list[str], int]:
    with concurrent.futures.ThreadPoolExecutor(THREADS_PER_PROCESS) as threads:
        results = list(threads.map(send_until, [url] * THREADS_PER_PROCESS,
                                   [deadline] * THREADS_PER_PROCESS,
                                   [f"{label}.{n}" for n in range(THREADS_PER_PROCESS)]))
    return [rid for answered, _ in results for rid in answered], sum(f for _, f in results)


def saturate(url: str, clients: concurrent.futures.ProcessPoolExecutor, label: str,
             seconds: float = SATURATION_S) -> tuple[list[str], int, float]:
    """Unpaced load for `seconds`: the answered ids, the failures, the time taken."""
    started = time.monotonic()
    deadline = started + seconds
    results = list(clients.map(client_process, [url] * CLIENT_PROCESSES,
                               [deadline] * CLIENT_PROCESSES,
                               [f"{label}{n}" for n in range(CLIENT_PROCESSES)]))
    elapsed = time.monotonic() - started
    return [rid for answered, _ in results for rid in answered], \
        sum(f for _, f in results), elapsed


def ring_reports(ring_dir: str) -> list[dict[str, Any]]:
    """`python -m moesif_fast stats --dir <ring_dir> --json`."""
    completed = subprocess.run(
        [sys.executable, "-m", "moesif_fast", "stats", "--dir", ring_dir, "--json"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(completed.stdout)


def spool_of(report: dict[str, Any]) -> dict[str, int] | None:
    shipper = report["shipper"] or {}
    spool = shipper.get("spool")
    return None if spool is None else {key: spool[key] for key in
                                       ("records", "bytes", "appended", "dropped_full",
                                        "dropped_corrupt", "write_errors")}


def events_by_request_id(db_path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in read_events(db_path):
        query = parse_qs(urlsplit(event["request"]["uri"]).query)
        request_id = query.get(REQUEST_ID_PARAMETER, [""])[0]
        counts[request_id] = counts.get(request_id, 0) + 1
    return counts


def all_arrived(db_path: str, answered: list[str]) -> bool:
    """Whether every answered request has an event (counted first: reading them all is slow;
    an event delivered twice makes the count alone pass too early)."""
    if read_stats(db_path)["events"] < len(answered):
        return False
    events = events_by_request_id(db_path)
    return all(rid in events for rid in answered)


@pytest.fixture(scope="module")
def clients() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(CLIENT_PROCESSES) as pool:
        yield pool


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_saturation_then_sigterm(benchmark, niced_collector: tuple[str, str, psutil.Process],
                                 clients, report: Callable[[str], None]) -> None:
    collector_url, db_path, collector_process = niced_collector
    info: dict[str, Any] = {"seconds_per_round": SATURATION_S, "rounds_of_each": ROUNDS}
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="bench-saturation-") as directory, \
            tempfile.TemporaryDirectory(prefix="bench-saturation-ring-",
                                        dir=MoesifOptions().ring_dir) as ring_dir:
        spool_dir = os.path.join(directory, "capture")
        os.mkdir(spool_dir, 0o700)
        options: dict[str, object] = {"RING_DIR": ring_dir, "SPOOL_DIR": spool_dir}
        without: list[dict[str, Any]] = []
        with_capture: list[dict[str, Any]] = []
        answered: list[str] = []
        in_order: list[tuple[str, float]] = []  # ("with" or "without", requests/s) per round

        def without_capture_round(number: int) -> None:
            round_dir = os.path.join(directory, f"baseline-{number}")
            os.mkdir(round_dir, 0o700)
            os.environ["MOESIF_DEMO_CAPTURE"] = "0"
            try:
                server, url = start_gunicorn(round_dir, collector_url, workers=WORKERS,
                                             options={"RING_DIR": round_dir,
                                                      "SPOOL_DIR": round_dir})
            finally:
                del os.environ["MOESIF_DEMO_CAPTURE"]
            try:
                saturate(url, clients, f"bw{number}-", WARMUP_S)
                ids, failed, elapsed = saturate(url, clients, f"b{number}-")
            finally:
                exit_code = stop(server, STOP_TIMEOUT)
            assert exit_code == 0, f"gunicorn exited with {exit_code}"
            without.append({"answered": len(ids), "failed": failed,
                            "requests_per_second": len(ids) / elapsed})
            in_order.append(("without", len(ids) / elapsed))
            say(f"round {2 * number + 1}, without capture: {len(ids):,} answered ({failed} "
                f"failed) in {elapsed:.1f} s, {len(ids) / elapsed:,.0f} requests/s")

        def capture_round(number: int) -> None:
            server, url = start_gunicorn(spool_dir, collector_url, workers=WORKERS,
                                         options=options)
            try:
                warmup_ids, _, _ = saturate(url, clients, f"cw{number}-", WARMUP_S)
                collector_cpu = cpu_seconds(collector_process)
                ids, failed, elapsed = saturate(url, clients, f"c{number}-")
                collector_cpu = cpu_seconds(collector_process) - collector_cpu
                held = read_stats(db_path)["events"]
                reports = ring_reports(ring_dir)
            finally:
                exit_code = stop(server, STOP_TIMEOUT)
            assert exit_code == 0, f"gunicorn exited with {exit_code}"
            assert len(reports) == 1, reports
            answered.extend(warmup_ids + ids)  # every answered request's event is checked
            held_after_sigterm = read_stats(db_path)["events"]
            result = {
                "answered": len(ids), "failed": failed,
                "requests_per_second": len(ids) / elapsed,
                "collector_cores": collector_cpu / elapsed,
                "answered_so_far": len(answered), "events_held_at_load_stop": held,
                "spool_at_load_stop": spool_of(reports[0]),
                "ring_dropped_at_load_stop": reports[0]["dropped"],
                "events_held_after_sigterm": held_after_sigterm}
            with_capture.append(result)
            in_order.append(("with", result["requests_per_second"]))
            say(f"round {2 * number + 2}, with capture: {len(ids):,} answered ({failed} "
                f"failed) in {elapsed:.1f} s, {len(ids) / elapsed:,.0f} requests/s (the "
                f"collector took {collector_cpu / elapsed:.2f} of the 2 cores meanwhile); of the "
                f"{len(answered):,} answered so far (warm-ups too), {held:,} events held when "
                f"the load stopped, {held_after_sigterm:,} after SIGTERM; spool "
                f"{result['spool_at_load_stop']}; ring dropped "
                f"{result['ring_dropped_at_load_stop']}")

        def alternating_rounds() -> None:
            for number in range(ROUNDS):
                without_capture_round(number)
                capture_round(number)
            without_capture_round(ROUNDS)  # the last capture round has a neighbour after it

        benchmark.pedantic(alternating_rounds, rounds=1, iterations=1)
        assert not any(str(rid).startswith("b") for rid in events_by_request_id(db_path)), \
            "a server without capture sent events"

        ratios = paired_ratios(in_order, "without")["with"]
        total_with = sum(r["answered"] for r in with_capture) / (ROUNDS * SATURATION_S)
        total_without = sum(r["answered"] for r in without) / ((ROUNDS + 1) * SATURATION_S)
        info["without_capture"] = without
        info["with_capture"] = with_capture
        info["paired_ratios"] = [round(ratio, 3) for ratio in ratios]
        info["median_paired_ratio"] = round(statistics.median(ratios), 3)
        info["ratio_of_totals"] = round(total_with / total_without, 3)
        say(f"paired ratios (each capture round over the rounds without capture beside it): "
            f"{', '.join(f'{ratio:.3f}' for ratio in ratios)}; median "
            f"{statistics.median(ratios):.3f}; ratio of the totals "
            f"{total_with / total_without:.3f}")

        # What the last server left in its spool: the next start delivers it.
        restart: dict[str, Any] = {"needed": not all_arrived(db_path, answered)}
        final_reports: list[dict[str, Any]] = []
        if restart["needed"]:
            started = time.monotonic()
            server, _ = start_gunicorn(spool_dir, collector_url, workers=WORKERS,
                                       options=options)
            try:
                while not all_arrived(db_path, answered):
                    assert time.monotonic() - started < DELIVERY_TIMEOUT, \
                        "the restarted server did not deliver the rest"
                    time.sleep(0.05)
                restart["seconds_to_all_delivered"] = round(time.monotonic() - started, 2)
                final_reports = ring_reports(ring_dir)
            finally:
                exit_code = stop(server, STOP_TIMEOUT)
            assert exit_code == 0, f"the restarted gunicorn exited with {exit_code}"
        events = events_by_request_id(db_path)
        count = len(answered)
        delivered_final = sum(1 for rid in answered if rid in events)
        twice = sum(number - 1 for number in events.values() if number > 1)
        unexpected = sorted(events.keys() - set(answered))
        restart["delivered_final"] = delivered_final
        restart["delivered_ratio_final"] = round(delivered_final / count, 4)
        restart["events_delivered_twice"] = twice
        restart["events_of_requests_not_answered"] = len(unexpected)
        info["restart"] = restart
        if restart["needed"]:
            say(f"restarted: every answered request's event arrived "
                f"{restart['seconds_to_all_delivered']:.1f} s after the start")
        say(f"final: {delivered_final:,} answered requests' events delivered "
            f"({delivered_final / count:.4f} of {count:,} answered); {twice} delivered twice, "
            f"{len(unexpected)} of requests not answered")

    benchmark.extra_info.update(info)
    for line in lines:
        report("saturation " + line.strip())

    missing = [rid for rid in answered if rid not in events]
    assert not missing, f"{len(missing)} answered requests have no event, e.g. {missing[:5]}"
    # Duplicates are allowed (at-least-once: a batch delivered just as the deadline or the
    # ring stage cancelled it is sent again), and reported above.
    if not any(r["failed"] for r in with_capture):  # a failed request may have an event
        assert not unexpected, f"events for requests not answered, e.g. {unexpected[:5]}"
    assert delivered_final / count == 1.0
    assert all(r["ring_dropped_at_load_stop"] == 0 for r in with_capture), with_capture
    for final in final_reports:
        assert final["dropped"] == 0, final["lanes"]
    for counters in [r["spool_at_load_stop"] for r in with_capture] + [
            spool_of(final) for final in final_reports]:
        if counters is not None:
            assert counters["dropped_full"] == counters["dropped_corrupt"] == 0, counters
            assert counters["write_errors"] == 0, counters
