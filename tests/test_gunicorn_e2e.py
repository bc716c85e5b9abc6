"""The whole path under real gunicorn: workers → ring → supervised shipper → local collector.

Every test runs the example API (moesif_fast.demo) under gunicorn with the hooks, a real
collector subprocess, and client threads; it then compares what arrived at the collector with
what the clients were answered, request by request (each request carries a unique `rid` query
parameter).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gunicorn
import psutil
import pytest
import requests
from conftest import (
    Collector,
    Exchange,
    Load,
    Server,
    answered_ids,
    assert_answered_normally,
    assert_at_least_once,
    assert_exactly_once,
    moesif_processes,
    processes_of,
    ring_report,
    run_stats,
    send_requests,
    wait_until,
)
from event_shape import EVENT_KEYS, EVENT_TIME, REQUEST_KEYS, RESPONSE_KEYS

from moesif_fast.ringfile import producers_for_workers, shipper_stats_path
from moesif_fast.shipper.loop import IN_FLIGHT
from moesif_fast.shipper.priority import LOW_NICE

StartServer = Callable[..., Server]

WORKER_SETUPS = {
    "sync": (),
    "gthread": ("--worker-class", "gthread", "--threads", "4"),
    "preload": ("--preload",),
}
TIME_SLACK = 0.002  # event times are truncated to milliseconds
RSS_GROWTH_LIMIT = 10 << 20


def event_timestamp(text: str) -> float:
    assert EVENT_TIME.fullmatch(text), f"not the reference time format: {text!r}"
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f")
    return moment.replace(tzinfo=timezone.utc).timestamp()


def expected_bodies(exchange: Exchange) -> tuple[Any, str | None, Any, str | None]:
    """(request body, its transfer_encoding, response body, its transfer_encoding) as the
    reference middleware sends them for this exchange (protocol §2.2)."""
    response = exchange.response
    assert response is not None
    request_body, request_encoding = (exchange.json_body, "json") if exchange.json_body \
        else (None, None)
    if exchange.route == "stream":
        return request_body, request_encoding, None, None
    if exchange.route == "text":
        return (request_body, request_encoding,
                base64.standard_b64encode(response.content).decode(), "base64")
    return request_body, request_encoding, json.loads(response.content), "json"


def assert_event_matches(exchange: Exchange, event: dict[str, Any]) -> None:
    """The event carries, field by field, what the client sent and was answered."""
    response = exchange.response
    assert response is not None
    transaction_id = response.headers["x-moesif-transaction-id"]
    assert list(event) == EVENT_KEYS
    assert list(event["request"]) == REQUEST_KEYS
    assert list(event["response"]) == RESPONSE_KEYS
    request_body, request_encoding, response_body, response_encoding = expected_bodies(exchange)

    sent_headers = {name.upper(): value for name, value in response.request.headers.items()}
    assert event["request"] == {
        "time": event["request"]["time"],
        "uri": exchange.url,
        "verb": exchange.method,
        "headers": {**sent_headers, "HOST": urlsplit(exchange.url).netloc,
                    "X-MOESIF-TRANSACTION-ID": transaction_id},
        "api_version": None,
        "ip_address": "127.0.0.1",
        "body": request_body,
        "transfer_encoding": request_encoding,
    }
    if exchange.route == "echo":
        assert event["request"]["headers"]["X-TEST-ID"] == exchange.request_id
    response_headers = {"Content-Type": response.headers["Content-Type"],
                        "x-moesif-transaction-id": transaction_id}
    if exchange.route == "echo":
        response_headers["X-Echo-Id"] = exchange.request_id
    assert event["response"] == {
        "time": event["response"]["time"],
        "status": response.status_code,
        "headers": response_headers,
        "body": response_body,
        "ip_address": None,
        "transfer_encoding": response_encoding,
    }
    assert {key: event[key] for key in EVENT_KEYS[2:]} == {
        "session_token": None, "tags": None, "user_id": None, "company_id": None,
        "metadata": None, "direction": "Incoming", "weight": 1, "blocked_by": None,
        "transaction_id": transaction_id,
    }
    request_time = event_timestamp(event["request"]["time"])
    response_time = event_timestamp(event["response"]["time"])
    assert exchange.started - TIME_SLACK <= request_time <= response_time \
        <= exchange.finished + TIME_SLACK


def ship_pids(directory: Path) -> set[int]:
    return {process.pid for process in moesif_processes(directory, "ship")}


def rss_of(processes: list[psutil.Process]) -> dict[int, int]:
    return {process.pid: process.memory_info().rss for process in processes}


@pytest.mark.parametrize("worker_setup", list(WORKER_SETUPS))
def test_every_answered_request_arrives_once_with_its_fields(
        start_server: StartServer, collector: Collector, worker_setup: str) -> None:
    server = start_server(workers=2, extra_args=WORKER_SETUPS[worker_setup])
    exchanges = send_requests(server.url, 1500, threads=8)
    assert_answered_normally(exchanges)
    assert server.stop() == 0

    events_by_id = collector.events_by_request_id()
    assert_exactly_once(exchanges, events_by_id)
    for exchange in exchanges:
        assert_event_matches(exchange, events_by_id[exchange.request_id][0])


def test_worker_sigkilled_under_load(start_server: StartServer, collector: Collector) -> None:
    server = start_server(workers=2)
    load = Load(server.url, limit=3000).start()
    kills = 0
    for round_number in range(1, 3):
        load.wait_answered(400 * round_number)
        victim = server.workers()[0]
        victim.kill()
        kills += 1
        wait_until(lambda victim=victim: len(server.workers()) == 2
                   and victim.pid not in {worker.pid for worker in server.workers()},
                   60, "gunicorn to replace the killed worker")
    load.wait_answered(load.answered + 300)
    load.stop()
    exchanges = load.finish()

    failed = [exchange for exchange in exchanges if not exchange.answered]
    assert len(failed) <= kills, [exchange.error for exchange in failed]
    assert_answered_normally([exchange for exchange in exchanges if exchange.answered])
    assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))
    assert server.stop() == 0


def test_shipper_sigkilled_under_load_comes_back(start_server: StartServer,
                                                  collector: Collector) -> None:
    server = start_server(workers=2)
    (first_shipper,) = wait_until(lambda: ship_pids(server.directory), 30, "the shipper")
    load = Load(server.url, limit=3000).start()
    load.wait_answered(400)
    os.kill(first_shipper, signal.SIGKILL)
    replacement = wait_until(lambda: ship_pids(server.directory) - {first_shipper}, 30,
                             "a new shipper process")
    assert len(replacement) == 1
    load.wait_answered(load.answered + 400)
    load.stop()
    exchanges = load.finish()

    assert_answered_normally(exchanges)
    assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))
    assert ship_pids(server.directory) == replacement
    assert server.stop() == 0


def test_collector_down_for_a_while(start_server: StartServer, collector: Collector) -> None:
    server = start_server(workers=2)
    before = send_requests(server.url, 200, label="before")
    collector.wait_for(answered_ids(before))
    collector.stop()
    during = send_requests(server.url, 600, label="during")
    time.sleep(3)  # the shipper keeps failing and backing off meanwhile
    collector.restart()
    after = send_requests(server.url, 200, label="after")

    exchanges = before + during + after
    assert_answered_normally(exchanges)
    assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))
    assert server.stop() == 0


def test_collector_answering_503_to_every_third_batch(start_server: StartServer,
                                                      collector: Collector) -> None:
    server = start_server(workers=2)
    collector.set_faults({"status": 503, "every": 3})
    exchanges = send_requests(server.url, 1000)
    assert_answered_normally(exchanges)
    collector.wait_for(answered_ids(exchanges))
    assert collector.stats()["rejected"].get("503", 0) > 0, "no fault was injected"
    assert server.stop() == 0
    assert_exactly_once(exchanges, collector.events_by_request_id())


def test_full_ring_drops_are_counted_and_workers_do_not_grow(
        start_server: StartServer, collector: Collector) -> None:
    queue_size = 50  # and no spool: the ring alone, which fills (test_pressure has the spool)
    server = start_server(workers=2, options={"EVENT_QUEUE_SIZE": queue_size,
                                              "SPOOL_BYTES": 0})
    warm_up = send_requests(server.url, 300, label="warm")
    collector.stop()
    filling = send_requests(server.url, 300, label="fill")
    workers = server.workers()
    memory_before = rss_of(workers)
    while_down = send_requests(server.url, 2500, label="down")
    memory_after = rss_of(workers)
    assert {worker.pid for worker in server.workers()} == set(memory_before), \
        "a worker was replaced: the memory comparison would be meaningless"
    growth = {pid: memory_after[pid] - memory_before[pid] for pid in memory_before}
    assert all(grown < RSS_GROWTH_LIMIT for grown in growth.values()), growth

    exchanges = warm_up + filling + while_down
    assert_answered_normally(exchanges)
    text = run_stats(server.directory, as_json=False)
    dropped_in_text = re.search(r"dropped (\d+)", text)
    assert dropped_in_text and int(dropped_in_text.group(1)) > 0, text
    report = ring_report(server.directory)
    assert report["dropped"] > 0
    assert report["appended"] + report["dropped"] == len(exchanges), report
    assert all(lane["records_in_use"] <= queue_size for lane in report["lanes"]), report

    collector.restart()
    wait_until(lambda: len(collector.events_by_request_id()) >= report["appended"], 120,
               "every appended event to arrive")
    assert server.stop() == 0
    events_by_id = collector.events_by_request_id()
    assert len(events_by_id) == report["appended"]
    assert events_by_id.keys() <= {exchange.request_id for exchange in exchanges}


def test_max_requests_recycling_loses_nothing(start_server: StartServer,
                                              collector: Collector) -> None:
    server = start_server(workers=2, extra_args=("--max-requests", "50",
                                                 "--max-requests-jitter", "10"))
    exchanges = send_requests(server.url, 1000)
    assert_answered_normally(exchanges)
    assert server.stop() == 0

    booted = re.findall(r"Booting worker with pid: (\d+)", server.log)
    assert len(set(booted)) >= 2 + 8, f"workers were replaced only {len(booted) - 2} times"
    assert_exactly_once(exchanges, collector.events_by_request_id())


def test_shutdown_drains_a_burst_before_the_master_exits(start_server: StartServer,
                                                         collector: Collector) -> None:
    server = start_server(workers=2)
    collector.set_faults({"delay_s": 1.0})  # the shipper lags: the burst is in the ring
    (ring_path,) = server.directory.glob("moesif_fast-*/*.ring")
    exchanges = send_requests(server.url, 400)
    delivered_at_sigterm = collector.stats()["events"]
    assert server.stop() == 0

    assert delivered_at_sigterm < len(exchanges), "nothing was left to drain at SIGTERM"
    assert_answered_normally(exchanges)
    assert_exactly_once(exchanges, collector.events_by_request_id())
    assert not ring_path.exists(), "the drained ring was not removed"
    assert not Path(shipper_stats_path(str(ring_path))).exists()
    still_running = [" ".join(process.cmdline()) for process in processes_of(server.directory)
                     if process.pid != collector.process.pid]
    assert still_running == []


def test_shipper_exits_when_the_arbiter_is_sigkilled(start_server: StartServer,
                                                     collector: Collector) -> None:
    server = start_server(workers=2)
    assert wait_until(lambda: moesif_processes(server.directory, "supervise"), 30,
                      "the supervisor")
    exchanges = send_requests(server.url, 500)
    server.process.kill()
    server.process.wait()

    wait_until(lambda: not moesif_processes(server.directory, "supervise")
               and not moesif_processes(server.directory, "ship"), 90,
               "the supervisor and the shipper to exit after the arbiter died")
    assert_answered_normally(exchanges)
    assert_at_least_once(exchanges, collector.events_by_request_id())


def test_stats_command_shows_ring_lanes_and_shipper(start_server: StartServer,
                                                    collector: Collector) -> None:
    server = start_server(workers=2)
    exchanges = send_requests(server.url, 250)
    assert_answered_normally(exchanges)
    collector.wait_for(answered_ids(exchanges))
    (shipper_pid,) = ship_pids(server.directory)
    worker_pids = {worker.pid for worker in server.workers()}

    def report_after_delivery() -> dict[str, Any] | None:
        found = ring_report(server.directory)
        shipper = found["shipper"]
        return found if shipper and shipper["delivered"] == len(exchanges) else None

    report = wait_until(report_after_delivery, 30, "the shipper's counters to show delivery")
    assert Path(report["ring"]).parent == server.directory / f"moesif_fast-{os.geteuid()}"
    assert report["appended"] == report["committed"] == len(exchanges)
    assert report["dropped"] == report["records_in_use"] == report["bytes_in_use"] == 0
    assert report["reader_pid"] == shipper_pid
    assert report["shipper"]["pid"] == shipper_pid
    assert report["shipper"]["refused"] == report["shipper"]["undecodable"] == 0
    assert (report["shipper"]["catching_up"], report["shipper"]["catch_ups"]) == (False, 0)
    process_nice = psutil.Process(shipper_pid).nice()  # its main thread's: the arbiter's
    thread_nice = [os.getpriority(os.PRIO_PROCESS, thread.id)
                   for thread in psutil.Process(shipper_pid).threads()]
    assert thread_nice.count(LOW_NICE) == IN_FLIGHT + 1  # the loop's low thread, its senders
    assert thread_nice.count(process_nice) == len(thread_nice) - IN_FLIGHT - 1
    lanes = report["lanes"]
    assert len(lanes) == producers_for_workers(2) + 1
    assert [lane["overflow"] for lane in lanes].count(True) == 1
    assert sum(lane["appended"] for lane in lanes) == len(exchanges)
    writing_lanes = {lane["owner_pid"] for lane in lanes if lane["appended"]}
    assert writing_lanes <= worker_pids and writing_lanes

    text = run_stats(server.directory, as_json=False)
    assert report["ring"] in text
    assert f"shipper     pid {shipper_pid}: delivered {len(exchanges)}" in text
    assert "priority    below the workers' (nice 19, on Linux); 0 catch-ups so far" in text
    assert re.search(rf"appended\s+{len(exchanges)}\s+committed {len(exchanges)}", text), text
    assert re.search(r"spool\s+0 events, \d+ KiB in \d+ segments, oldest never; dropped: "
                     r"full 0, damaged 0; write errors 0", text), text
    assert server.stop() == 0


def worker_class_parameters() -> list[Any]:
    """Every worker class this gunicorn has that Django can run, with the app it serves."""
    from gunicorn.workers import SUPPORTED_WORKERS

    wsgi, asgi = "moesif_fast.demo.wsgi", "moesif_fast.demo.asgi"
    classes = [("sync", wsgi), ("gthread", wsgi), ("gevent", wsgi), ("eventlet", wsgi),
               ("asgi", asgi), ("uvicorn.workers.UvicornWorker", asgi)]
    return [pytest.param(name, app, id=name.rpartition(".")[2], marks=pytest.mark.skipif(
        "." not in name and name not in SUPPORTED_WORKERS,
        reason=f"gunicorn {gunicorn.__version__} has no {name} worker class"))
        for name, app in classes]


@pytest.mark.parametrize(("worker_class", "app"), worker_class_parameters())
def test_every_worker_class_boots_queries_the_database_and_captures(
        start_server: StartServer, collector: Collector, worker_class: str, app: str) -> None:
    """The hooks import no Django in the arbiter, so a worker class that monkey-patches after
    the fork (gevent) gets an untouched Django: its database connections work. ASGI workers
    (gunicorn's own, uvicorn's) run the middleware's async path. The hooks are given as a pip
    user has them: the installed module as gunicorn's config."""
    server = start_server(workers=2, extra_args=("-k", worker_class), app=app,
                          config="python:moesif_fast.gunicorn")
    with requests.Session() as session:
        answers = [session.get(f"{server.url}/api/database?rid={worker_class}-{number}",
                               timeout=30) for number in range(40)]
    assert [(answer.status_code, answer.json()) for answer in answers] == [
        (200, {"answer": 42})] * 40
    events = collector.wait_for({f"{worker_class}-{number}" for number in range(40)})
    assert all(len(found) == 1 for found in events.values())
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log
