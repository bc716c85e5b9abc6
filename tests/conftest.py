"""Shared machinery of the end-to-end tests: real processes in a tmp directory of their own.

Each test gets a `workspace` directory that holds the ring, the collector's SQLite file and the
logs. Every process a test starts (collector, gunicorn, its workers, the supervisor and
shipper, fallback and sidecar shippers) names that directory in its command line or its
environment, which is how the workspace's finalizer finds and kills all of them, whatever the
test did. `Load` drives a server with several client threads and keeps what each request got,
so a test can compare the events at the collector with the answers the clients saw.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
import requests

from moesif_fast import ringfile
from moesif_fast.collector import read_events, read_stats
from moesif_fast.demo.run import start_collector, start_gunicorn, stop
from moesif_fast.ringbuffer import Geometry, Reader, RingFile

Result = TypeVar("Result")

REQUEST_ID_PARAMETER = "rid"  # the query parameter that names each test request
ROUTES = ("items", "echo", "text", "stream", "not_found")
EXPECTED_STATUS = {"items": 200, "echo": 201, "text": 200, "stream": 200, "not_found": 404}
DELIVERY_TIMEOUT = 120.0  # generous: the shipper's retry backoff grows up to 30 s
CLIENT_TIMEOUT = 30.0


# --- waiting ---------------------------------------------------------------------------------


def wait_until(condition: Callable[[], Result], timeout: float, what: str,
               interval: float = 0.1) -> Result:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    give_up_at = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= give_up_at:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- processes -------------------------------------------------------------------------------


def processes_of(directory: Path) -> list[psutil.Process]:
    """Live processes whose command line or environment names `directory`: everything a test
    in that workspace started, directly or not (their environment carries RING_DIR)."""
    needle = str(directory)
    found = []
    for process in psutil.process_iter(["cmdline", "environ", "status"]):
        if process.pid == os.getpid() or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        command_line = " ".join(process.info["cmdline"] or ())
        environment = process.info["environ"] or {}
        if needle in command_line or any(needle in value for value in environment.values()):
            found.append(process)
    return found


def moesif_processes(directory: Path, command: str) -> list[psutil.Process]:
    """This workspace's `python -m moesif_fast <command>` processes (`ship`, `supervise`)."""
    found = []
    for process in processes_of(directory):
        try:
            arguments = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if arguments[1:4] == ["-m", "moesif_fast", command]:
            found.append(process)
    return found


def kill_processes_of(directory: Path) -> None:
    """SIGKILL every process of the workspace, then reap the ones that are our children."""
    for _ in range(3):  # a dying gunicorn or supervisor may still spawn a child meanwhile
        victims = processes_of(directory)
        if not victims:
            return
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(victims, timeout=10)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A directory of this test's own for the ring, the collector database and the logs; every
    process that names it is killed when the test ends, passed or not."""
    directory = tmp_path / f"mf-{uuid.uuid4().hex[:12]}"
    directory.mkdir(mode=0o700)  # a ring may live only in a private folder
    yield directory
    kill_processes_of(directory)


# --- the collector ---------------------------------------------------------------------------


class Collector:
    """`python -m moesif_fast collector` in a subprocess, storing into the workspace."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.db_path = directory / "collector.sqlite3"
        self.process, self.url = start_collector(str(directory))
        self.port = urlsplit(self.url).port

    def stop(self) -> None:
        assert stop(self.process) == 0, "the collector did not stop cleanly"

    def restart(self) -> None:
        """Start it again on the same port and database."""
        self.process, url = start_collector(str(self.directory), port=self.port or 0)
        assert url == self.url

    def set_faults(self, faults: dict[str, Any]) -> None:
        reply = requests.post(f"{self.url}/_collector/faults", json=faults, timeout=10)
        assert reply.status_code == 204, reply.text

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.db_path)

    def stats(self) -> dict[str, Any]:
        return read_stats(self.db_path)

    def events_by_request_id(self) -> dict[str, list[dict[str, Any]]]:
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in self.events():
            grouped[request_id_of(event)].append(event)
        return grouped

    def wait_for(self, request_ids: set[str], timeout: float = DELIVERY_TIMEOUT
                 ) -> dict[str, list[dict[str, Any]]]:
        """The stored events grouped by request id, once every id in `request_ids` is there."""
        latest: dict[str, list[dict[str, Any]]] = {}

        def all_arrived() -> bool:
            nonlocal latest
            latest = self.events_by_request_id()
            return request_ids <= latest.keys()

        give_up_at = time.monotonic() + timeout
        while not all_arrived():
            if time.monotonic() >= give_up_at:
                missing = sorted(request_ids - latest.keys())
                pytest.fail(f"{len(missing)} of {len(request_ids)} events did not arrive within "
                            f"{timeout:.0f} s, e.g. {missing[:10]}")
            time.sleep(0.2)
        return latest


@pytest.fixture
def collector(workspace: Path) -> Collector:
    return Collector(workspace)


def request_id_of(event: dict[str, Any]) -> str:
    query = parse_qs(urlsplit(event["request"]["uri"]).query)
    return query.get(REQUEST_ID_PARAMETER, [""])[0]


# --- gunicorn --------------------------------------------------------------------------------


@dataclass
class Server:
    """The example API under gunicorn, started by `start_gunicorn`."""

    process: subprocess.Popen[str]
    url: str
    directory: Path

    @property
    def log(self) -> str:
        return (self.directory / "gunicorn.log").read_text()

    def workers(self) -> list[psutil.Process]:
        """The arbiter's worker processes (its children running gunicorn's own command)."""
        arbiter = psutil.Process(self.process.pid)
        arbiter_command = arbiter.cmdline()
        workers = []
        for child in arbiter.children():
            try:
                if child.cmdline() == arbiter_command and child.status() != psutil.STATUS_ZOMBIE:
                    workers.append(child)
            except psutil.NoSuchProcess:
                continue
        return workers

    def stop(self) -> int:
        """SIGTERM, wait for the arbiter to exit (its on_exit hook drains the ring)."""
        return stop(self.process, timeout=120)


@pytest.fixture
def start_server(workspace: Path, collector: Collector) -> Callable[..., Server]:
    """Starts the example API under gunicorn, sending to this test's collector."""

    def start(*, workers: int = 2, options: dict[str, object] | None = None,
              extra_args: tuple[str, ...] = (), config: str | None = None,
              app: str = "moesif_fast.demo.wsgi") -> Server:
        process, url = start_gunicorn(str(workspace), collector.url, workers=workers,
                                      options=options, extra_args=list(extra_args),
                                      config=config, app=app)
        return Server(process, url, workspace)

    return start


# --- the ring, from the command line ---------------------------------------------------------


def run_stats(directory: Path, *, as_json: bool) -> str:
    """The output of `python -m moesif_fast stats --dir <directory> [--json]`."""
    command = [sys.executable, "-m", "moesif_fast", "stats", "--dir", str(directory)]
    completed = subprocess.run(command + (["--json"] if as_json else []), capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def ring_report(directory: Path) -> dict[str, Any]:
    """The one ring of the workspace, as `stats --json` reports it."""
    reports = json.loads(run_stats(directory, as_json=True))
    assert len(reports) == 1, reports
    return reports[0]


# --- client traffic --------------------------------------------------------------------------


@dataclass
class Exchange:
    """One client request and what came back (`response` None: not answered)."""

    request_id: str
    route: str
    method: str
    url: str
    json_body: dict[str, Any] | None
    headers: dict[str, str]
    started: float = 0.0  # wall clock (time.time) before sending
    finished: float = 0.0  # wall clock after the answer or the failure
    response: requests.Response | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.response is not None


def make_exchange(base_url: str, label: str, number: int) -> Exchange:
    """Request `number` of a run: the routes in turn, each carrying a unique `rid`."""
    request_id = f"{label}-{number}"
    route = ROUTES[number % len(ROUTES)]
    query = f"{REQUEST_ID_PARAMETER}={request_id}"
    if route == "items":
        return Exchange(request_id, route, "GET", f"{base_url}/api/items?i={number}&{query}",
                        None, {})
    if route == "echo":
        body = {"id": request_id, "number": number, "tags": ["a", "b"], "nested": {"ok": True}}
        return Exchange(request_id, route, "POST", f"{base_url}/api/echo?{query}", body,
                        {"X-Test-Id": request_id})
    path = {"text": "/api/text", "stream": "/api/stream", "not_found": "/api/status/404"}[route]
    return Exchange(request_id, route, "GET", f"{base_url}{path}?{query}", None, {})


class Load:
    """Client threads sending the routes in turn to `base_url`, until `limit` requests were
    sent or `stop()` is called; as fast as they can, or paced at `rate` requests per second.
    Each thread has its own session and no retries, so a request that fails is counted as not
    answered rather than silently sent twice."""

    def __init__(self, base_url: str, limit: int, *, threads: int = 8, label: str = "r",
                 rate: float | None = None) -> None:
        self.base_url = base_url
        self.limit = limit
        self.label = label
        self.interval = 1.0 / rate if rate else 0.0  # paced: request n is sent at n × interval
        self._started_at = 0.0
        self.exchanges: list[Exchange] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._answered = 0
        self._threads = [threading.Thread(target=self._send_until_done, daemon=True)
                         for _ in range(threads)]

    def start(self) -> Load:
        self._started_at = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    @property
    def answered(self) -> int:
        return self._answered

    def wait_answered(self, count: int, timeout: float = 120.0) -> None:
        wait_until(lambda: self._answered >= count or not self.running, timeout,
                   f"{count} answered requests")
        assert self._answered >= count, f"the load ended after {self._answered} answers"

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        self._stopping.set()

    def finish(self, timeout: float = 300.0) -> list[Exchange]:
        """Wait for every thread (after `limit` requests or `stop()`); all the exchanges."""
        give_up_at = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, give_up_at - time.monotonic()))
        assert not self.running, "the client threads did not finish"
        return sorted(self.exchanges, key=lambda exchange: exchange.started)

    def _send_until_done(self) -> None:
        session = requests.Session()
        while not self._stopping.is_set():
            with self._lock:
                number = next(self._numbers)
            if number >= self.limit:
                break
            if self.interval:
                delay = self._started_at + number * self.interval - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    break
            exchange = make_exchange(self.base_url, self.label, number)
            exchange.started = time.time()
            try:
                exchange.response = session.request(
                    exchange.method, exchange.url, json=exchange.json_body,
                    headers=exchange.headers, timeout=CLIENT_TIMEOUT)
            except requests.RequestException as error:
                exchange.error = repr(error)
                session = requests.Session()  # a broken connection must not be reused
            exchange.finished = time.time()
            with self._lock:
                self.exchanges.append(exchange)
                self._answered += exchange.answered
        session.close()


def send_requests(base_url: str, count: int, *, threads: int = 8, label: str = "r"
                  ) -> list[Exchange]:
    """Send `count` requests from `threads` client threads and wait for all of them."""
    return Load(base_url, count, threads=threads, label=label).start().finish()


def assert_answered_normally(exchanges: list[Exchange], sampled: bool = False) -> None:
    """Every request was answered with its route's status and body, and the transaction
    header (`sampled`: except requests the config sampled out, which get none)."""
    failed = [exchange for exchange in exchanges if not exchange.answered]
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[0].error}"
    for exchange in exchanges:
        response = exchange.response
        assert response is not None
        assert response.status_code == EXPECTED_STATUS[exchange.route], exchange.url
        assert sampled or response.headers.get("x-moesif-transaction-id"), exchange.url
        if exchange.route == "echo":
            assert response.json() == exchange.json_body


def answered_ids(exchanges: list[Exchange]) -> set[str]:
    return {exchange.request_id for exchange in exchanges if exchange.answered}


def assert_exactly_once(exchanges: list[Exchange],
                        events_by_id: dict[str, list[dict[str, Any]]]) -> None:
    """Every answered request has exactly one event, and no event is for anything else."""
    expected = answered_ids(exchanges)
    missing = sorted(expected - events_by_id.keys())
    assert not missing, f"{len(missing)} answered requests have no event, e.g. {missing[:10]}"
    duplicated = sorted(request_id for request_id in expected
                        if len(events_by_id[request_id]) > 1)
    assert not duplicated, f"{len(duplicated)} requests have several events: {duplicated[:10]}"
    unexpected = sorted(events_by_id.keys() - expected)
    assert not unexpected, f"events for requests never answered: {unexpected[:10]}"


def assert_at_least_once(exchanges: list[Exchange],
                         events_by_id: dict[str, list[dict[str, Any]]]) -> None:
    """Every answered request has an event (duplicates allowed: a re-sent batch)."""
    missing = sorted(answered_ids(exchanges) - events_by_id.keys())
    assert not missing, f"{len(missing)} answered requests have no event, e.g. {missing[:10]}"
    sent = {exchange.request_id for exchange in exchanges}
    assert events_by_id.keys() <= sent, "events for requests nobody sent"


@pytest.fixture
def ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Reader]:
    """A fresh ring this process's captures append to (as under the gunicorn hooks, through
    MOESIF_FAST_RING), and its reader."""
    ring_file = RingFile.create(str(tmp_path / "test.ring"), Geometry.for_size(4 << 20, 2, 1000))
    monkeypatch.setenv(ringfile.RING_ENV, ring_file.path)
    reader = Reader(ring_file)
    yield reader
    reader.close()


# --- a file system that fills up ------------------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)
    if os.path.ismount(mount_point):
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
