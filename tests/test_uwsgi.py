"""The shipper run by the uWSGI master (`--attach-daemon2`, docs/uwsgi.md), with real uWSGI.

The example API runs under `uwsgi --master --processes 2` with the command line of
docs/uwsgi.md: the workers write to the deployment's default ring and start no shipper of their
own (MOESIF_FAST_SHIPPER=external); the master's daemon `python -m moesif_fast.uwsgi` drains it.
Each test compares what arrived at the collector with what the clients were answered, request by
request, and checks what a user would look at after a stop: uWSGI's exit code, `moesif_fast
stats`, and that no process is left. uWSGI is installed from the package index
(`pip install uwsgi`); without it the tests are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    Collector,
    Exchange,
    Load,
    answered_ids,
    assert_answered_normally,
    assert_at_least_once,
    assert_exactly_once,
    processes_of,
    ring_report,
    send_requests,
    wait_until,
)

from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.uwsgi import SHIPPER_ENV


def uwsgi_binary() -> str | None:
    """The `uwsgi` next to this Python (a venv's `pip install uwsgi`), else on PATH."""
    beside = Path(sys.executable).parent / "uwsgi"
    return str(beside) if beside.exists() else shutil.which("uwsgi")


UWSGI = uwsgi_binary()
pytestmark = pytest.mark.skipif(UWSGI is None, reason="uWSGI is not installed (pip install "
                                                      "uwsgi builds it with gcc and the Python "
                                                      "headers)")

DEADLINE = 4  # SHUTDOWN_DEADLINE of these tests (seconds; the default is 20)
RELOAD_MERCY = DEADLINE + 10  # how long the master waits for the shipper before SIGKILL
START_TIMEOUT = 60.0
STOP_TIMEOUT = RELOAD_MERCY + 60.0  # generous: the master's own waits are bounded by the above
SHIPPER_START = re.compile(r"moesif_fast shipper (\d+): draining (\S+)")
SHIPPER_KILLED = "daemon did not die in time"


@dataclass
class UwsgiServer:
    """The example API under uWSGI (`start_uwsgi`)."""

    process: subprocess.Popen[str]
    url: str
    directory: Path
    fifo: Path
    touch_file: Path
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def shipper_starts(self) -> list[int]:
        """The pids of the shippers that took the ring, in order."""
        return [int(pid) for pid, _ in SHIPPER_START.findall(self.log)]

    def wait_for_shippers(self, count: int) -> list[int]:
        """The pids of the shippers that took the ring, once there are `count` of them."""
        return wait_until(lambda: len(self.shipper_starts()) >= count and self.shipper_starts(),
                          START_TIMEOUT, f"shipper number {count} to take the ring")

    def send_to_fifo(self, command: str) -> None:
        """A command for the master FIFO: q graceful stop, r graceful reload."""
        with open(self.fifo, "w") as fifo:
            fifo.write(command)

    def stop(self, how: str = "q") -> int:
        """Stop uWSGI (`q`: master FIFO's graceful stop, else a signal's name) and wait for the
        master to exit; its exit code."""
        if how == "q":
            self.send_to_fifo("q")
        else:
            self.process.send_signal({"SIGINT": signal.SIGINT, "SIGQUIT": signal.SIGQUIT,
                                      "SIGTERM": signal.SIGTERM}[how])
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"uWSGI did not stop within {STOP_TIMEOUT:.0f} s:\n{self.log[-3000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_uwsgi(workspace: Path, collector: Collector, *, extra_args: tuple[str, ...] = (),
                label: str = "uwsgi") -> UwsgiServer:
    """uWSGI with the command line of docs/uwsgi.md (2 workers, the daemon), on a free port,
    sending to this test's collector; returns once both workers are up: the shipper may still
    be starting (importing Django), and the workers must not start one of their own meanwhile."""
    assert UWSGI is not None
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DJANGO_SETTINGS_MODULE", "MOESIF_FAST_RING", SHIPPER_ENV)}
    environment.update(
        MOESIF_DEMO_BASE_URI=collector.url, MOESIF_DEMO_APPLICATION_ID=APPLICATION_ID,
        MOESIF_DEMO_OPTIONS=json.dumps({"RING_DIR": str(workspace), "SPOOL_DIR": str(workspace),
                                        "SHUTDOWN_DEADLINE": DEADLINE}))
    port = free_port()
    fifo, touch_file = workspace / "uwsgi.fifo", workspace / "reload.touch"
    touch_file.touch()
    log_path = workspace / f"{label}.log"
    command = [UWSGI, "--master", "--processes", "2", "--http-socket", f"127.0.0.1:{port}",
               "--module", "moesif_fast.demo.wsgi", "--need-app",
               "--env", "DJANGO_SETTINGS_MODULE=moesif_fast.demo.settings",
               "--env", f"{SHIPPER_ENV}=external", "--reload-mercy", str(RELOAD_MERCY),
               "--attach-daemon2", f"cmd=exec {sys.executable} -m moesif_fast.uwsgi,"
                                   "reloadsignal=1",
               "--master-fifo", str(fifo), "--touch-reload", str(touch_file), *extra_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, text=True)
    server = UwsgiServer(process, f"http://127.0.0.1:{port}", workspace, fifo, touch_file,
                         log_path)

    def up() -> bool:
        assert process.poll() is None, f"uWSGI exited:\n{server.log[-3000:]}"
        return "spawned uWSGI worker 2" in server.log

    wait_until(up, START_TIMEOUT, "uWSGI's workers")
    return server


def moesif_processes_left(workspace: Path, collector: Collector) -> list[str]:
    """Command lines of the workspace's processes other than the collector (uWSGI, shippers)."""
    left = []
    for process in processes_of(workspace):
        if process.pid == collector.process.pid:
            continue
        try:
            left.append(" ".join(process.cmdline()))
        except psutil.NoSuchProcess:
            continue
    return left


def assert_events_match(exchanges: list[Exchange], events_by_id: dict[str, list[dict[str, Any]]],
                        exactly_once: bool = True) -> None:
    """Exactly one event (`exactly_once` False: at least one) per answered request, and each
    carries what that client sent and got."""
    if exactly_once:
        assert_exactly_once(exchanges, events_by_id)
    else:
        assert_at_least_once(exchanges, events_by_id)
    for exchange in exchanges:
        for event in events_by_id[exchange.request_id]:
            assert_event_matches(exchange, event)


def assert_event_matches(exchange: Exchange, event: dict[str, Any]) -> None:
    response = exchange.response
    assert response is not None
    transaction_id = response.headers["x-moesif-transaction-id"]
    assert event["request"]["uri"] == exchange.url
    assert event["request"]["verb"] == exchange.method
    assert event["request"]["ip_address"] == "127.0.0.1"
    assert event["request"]["headers"]["X-MOESIF-TRANSACTION-ID"] == transaction_id
    assert event["response"]["status"] == response.status_code
    assert event["response"]["headers"]["x-moesif-transaction-id"] == transaction_id
    assert event["transaction_id"] == transaction_id
    assert event["direction"] == "Incoming"
    if exchange.route == "echo":
        assert event["request"]["body"] == exchange.json_body
        assert event["response"]["body"] == exchange.json_body


def fallback_logs(server: UwsgiServer) -> list[Path]:
    """The logs of shippers that workers started (fallback mode: `<ring>.shipper.log`)."""
    return list(server.directory.glob("moesif_fast-*/*.shipper.log"))


def assert_no_fallback_shippers(server: UwsgiServer) -> None:
    """Every shipper that ran was the master's daemon: the workers started none (a fallback
    shipper logs to `<ring>.shipper.log`, and its start would show in the log as another
    shipper)."""
    assert fallback_logs(server) == []
    spawned = server.log.count("[uwsgi-daemons] spawning") + server.log.count(
        "[uwsgi-daemons] respawning")
    assert len(server.shipper_starts()) == spawned, server.log[-3000:]


def assert_ring_settled(workspace: Path, appended: int) -> None:
    """`moesif_fast stats --json`: every record was committed, none dropped, none left."""
    report = ring_report(workspace)
    assert (report["appended"], report["committed"]) == (appended, appended), report
    assert (report["dropped"], report["records_in_use"], report["bytes_in_use"]) == (0, 0, 0)
    assert report["shipper"]["refused"] == report["shipper"]["undecodable"] == 0


@pytest.mark.parametrize("stop", ["fifo q", "SIGINT", "SIGTERM --die-on-term"])
def test_uwsgi_daemon_delivers_under_load_and_drains_at_stop(
        workspace: Path, collector: Collector, stop: str) -> None:
    extra = ("--die-on-term",) if stop.endswith("--die-on-term") else ()
    server = start_uwsgi(workspace, collector, extra_args=extra)
    load = send_requests(server.url, 600, label="load")  # from the first moment
    assert_answered_normally(load)
    collector.wait_for(answered_ids(load))  # delivered while uWSGI runs
    assert fallback_logs(server) == [], "a worker started a fallback shipper"
    (shipper_pid,) = server.wait_for_shippers(1)
    shipper = psutil.Process(shipper_pid)
    assert shipper.ppid() == server.process.pid, "the shipper is not the master's daemon"
    assert shipper.cmdline()[1:3] == ["-m", "moesif_fast.uwsgi"]
    report = ring_report(workspace)
    assert report["reader_pid"] == shipper_pid
    assert report["shipper"]["pid"] == shipper_pid

    collector.set_faults({"delay_s": 1.0})  # the shipper lags: the burst is still in the ring
    burst = send_requests(server.url, 300, label="burst")
    assert_answered_normally(burst)
    delivered_at_stop = collector.stats()["events"]
    exit_code = server.stop("q" if stop == "fifo q" else stop.split()[0])

    assert delivered_at_stop < len(load) + len(burst), "nothing was left to deliver at the stop"
    assert exit_code == 0, server.log[-3000:]
    assert moesif_processes_left(workspace, collector) == []
    assert not shipper.is_running()
    assert SHIPPER_KILLED not in server.log
    assert "finish deadline passed" not in server.log
    assert_events_match(load + burst, collector.events_by_request_id())
    assert collector.stats()["events"] == len(load) + len(burst)
    assert_ring_settled(workspace, len(load) + len(burst))
    assert_no_fallback_shippers(server)


@pytest.mark.parametrize("reload", ["SIGHUP", "touch-reload"])
def test_uwsgi_reload_under_load_loses_nothing(workspace: Path, collector: Collector,
                                               reload: str) -> None:
    server = start_uwsgi(workspace, collector)
    load = Load(server.url, 100_000, threads=4, label="reload", rate=300).start()
    server.wait_for_shippers(1)
    for reloads in (1, 2):
        load.wait_answered(400 * reloads)
        if reload == "SIGHUP":
            server.process.send_signal(signal.SIGHUP)
        else:
            os.utime(server.touch_file)
        server.wait_for_shippers(reloads + 1)
    load.wait_answered(load.answered + 300)
    load.stop()
    exchanges = load.finish()
    assert server.stop() == 0, server.log[-3000:]

    assert_answered_normally(exchanges)
    # At least once: a batch the ring stage had moved to the spool when its shipper handed over
    # may be sent again by the next one (transaction_id tells the copies apart).
    assert_events_match(exchanges, collector.events_by_request_id(), exactly_once=False)
    assert server.log.count("binary reloading uWSGI") == 2
    assert server.log.count("moesif_fast shipper: handing over") == 2, server.log[-3000:]
    assert "finish deadline passed" not in server.log
    assert SHIPPER_KILLED not in server.log
    assert len(set(server.shipper_starts())) == 3
    assert_ring_settled(workspace, len(exchanges))
    assert_no_fallback_shippers(server)
    assert moesif_processes_left(workspace, collector) == []


def test_undelivered_events_wait_in_the_spool_for_the_next_start(
        workspace: Path, collector: Collector) -> None:
    server = start_uwsgi(workspace, collector)
    before = send_requests(server.url, 100, label="before")
    collector.wait_for(answered_ids(before))
    collector.stop()
    while_down = send_requests(server.url, 300, label="down")
    assert_answered_normally(before + while_down)
    assert server.stop() == 0, server.log[-3000:]

    assert moesif_processes_left(workspace, collector) == []
    assert SHIPPER_KILLED not in server.log, "the shipper overran SHUTDOWN_DEADLINE"
    assert re.search(r"finish deadline passed; (\d+) events stay in the spool", server.log)
    report = ring_report(workspace)
    assert report["records_in_use"] == 0, "left in the ring rather than in the spool"
    assert report["shipper"]["spool"]["records"] == len(while_down), report["shipper"]

    collector.restart()
    again = start_uwsgi(workspace, collector, label="uwsgi-again")
    after = send_requests(again.url, 100, label="after")
    collector.wait_for(answered_ids(while_down + after))
    assert again.stop() == 0, again.log[-3000:]

    assert_answered_normally(after)
    assert_events_match(before + while_down + after, collector.events_by_request_id())
    assert moesif_processes_left(workspace, collector) == []
    final = ring_report(workspace)
    assert final["shipper"]["spool"]["records"] == 0
    assert final["dropped"] == 0
