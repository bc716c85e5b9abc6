"""Without the gunicorn hooks: the middleware's fallback shipper, and a sidecar shipper.

gunicorn runs here with a config file of its own that has none of moesif_fast's hooks, so
MOESIF_FAST_RING is never set and every worker opens the deployment's ring itself (sink.py);
the example app's wsgi.py sets DJANGO_SETTINGS_MODULE, which the fallback needs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil
import pytest
from conftest import (
    Collector,
    Server,
    answered_ids,
    assert_answered_normally,
    assert_at_least_once,
    moesif_processes,
    ring_report,
    send_requests,
    wait_until,
)

from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.shipper.run import CHECK_INTERVAL
from moesif_fast.sink import SHIPPER_CHECK_INTERVAL, SHIPPER_IDLE_EXIT

StartServer = Callable[..., Server]

DEMO_SETTINGS = "moesif_fast.demo.settings"
SIDECAR_IDLE_EXIT = 3.0
CLIENT_SCRIPT = """\
import sys

import django

django.setup()
from django.test import Client

client = Client()
for number in range(int(sys.argv[1])):
    response = client.get(f"/api/items?rid=client-{number}")
    assert response.status_code == 200, response.status_code
    print(response.headers["x-moesif-transaction-id"])
"""


@pytest.fixture
def no_hooks_config(workspace: Path) -> str:
    path = workspace / "gunicorn_conf_without_hooks.py"
    path.write_text('"""gunicorn settings with none of moesif_fast\'s hooks."""\n')
    return str(path)


def demo_environment(directory: Path, collector: Collector) -> dict[str, str]:
    """The environment `start_gunicorn` gives the example app, for other processes of the same
    deployment (same settings, collector and ring directory, hence the same ring)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DJANGO_SETTINGS_MODULE", "MOESIF_FAST_RING")}
    environment.update(MOESIF_DEMO_BASE_URI=collector.url,
                       MOESIF_DEMO_APPLICATION_ID=APPLICATION_ID,
                       MOESIF_DEMO_OPTIONS=json.dumps({"RING_DIR": str(directory)}))
    return environment


def shipper_starts_logged(log: str) -> int:
    """How many shipper processes logged their start (a shipper started by a worker inherits
    the worker's stderr: the gunicorn log)."""
    return log.count("moesif_fast shipper")


def test_hookless_gunicorn_workers_start_one_detached_shipper(
        start_server: StartServer, collector: Collector, no_hooks_config: str) -> None:
    server = start_server(workers=2, config=no_hooks_config)
    exchanges = send_requests(server.url, 300)
    assert_answered_normally(exchanges)
    assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))

    def single_shipper() -> list[psutil.Process] | None:
        found = moesif_processes(server.directory, "ship")  # racing workers' extras exit
        return found if len(found) == 1 else None

    (shipper,) = wait_until(single_shipper, 30, "a single shipper")
    arguments = shipper.cmdline()
    assert arguments[arguments.index("--idle-exit") + 1] == str(SHIPPER_IDLE_EXIT)
    assert shipper.ppid() in {worker.pid for worker in server.workers()}
    assert os.getsid(shipper.pid) == shipper.pid, "the shipper is not in a session of its own"

    burst = send_requests(server.url, 200, label="burst")
    assert server.stop() == 0
    assert shipper.is_running(), "the shipper did not outlive the workers"
    assert_answered_normally(burst)
    assert_at_least_once(exchanges + burst, collector.wait_for(answered_ids(burst)))
    assert moesif_processes(server.directory, "ship") == [shipper]
    # It would now exit after SHIPPER_IDLE_EXIT (60 s) with no producer: too slow to wait for
    # here, and not configurable; the same idle exit is checked with a sidecar below.


def run_client_script(workspace: Path, collector: Collector, requests_count: int,
                      output: int | IO[str]) -> subprocess.Popen[str]:
    """Start CLIENT_SCRIPT (Django's test Client, no server, no hooks) writing to `output`."""
    environment = dict(demo_environment(workspace, collector),
                       DJANGO_SETTINGS_MODULE=DEMO_SETTINGS)
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(requests_count)],
                            env=environment, stdout=output, stderr=output, text=True,
                            stdin=subprocess.DEVNULL)


def test_django_test_client_in_a_script_delivers_through_the_fallback(
        workspace: Path, collector: Collector) -> None:
    output_path = workspace / "client_script.log"
    with open(output_path, "w") as output:
        script = run_client_script(workspace, collector, 40, output)
        assert script.wait(timeout=120) == 0, output_path.read_text()
    transaction_ids = [line for line in output_path.read_text().split()
                       if len(line) == 36 and line.count("-") == 4]
    assert len(transaction_ids) == 40, output_path.read_text()

    expected = {f"client-{number}" for number in range(40)}
    events_by_id = collector.wait_for(expected)
    assert events_by_id.keys() == expected
    for number, transaction_id in enumerate(transaction_ids):
        event = events_by_id[f"client-{number}"][0]
        assert event["request"]["uri"] == f"http://testserver/api/items?rid=client-{number}"
        assert event["response"]["status"] == 200
        assert event["response"]["headers"]["x-moesif-transaction-id"] == transaction_id
        assert event["request"]["headers"]["X-MOESIF-TRANSACTION-ID"] == transaction_id
    (shipper,) = moesif_processes(workspace, "ship")
    assert "--idle-exit" in shipper.cmdline()


def test_fallback_shipper_does_not_hold_the_callers_output_pipes(
        workspace: Path, collector: Collector) -> None:
    script = run_client_script(workspace, collector, 5, subprocess.PIPE)
    assert script.stdout is not None and script.stderr is not None
    caller_pipes = {f"pipe:[{os.fstat(stream.fileno()).st_ino}]"
                    for stream in (script.stdout, script.stderr)}
    (shipper,) = wait_until(lambda: moesif_processes(workspace, "ship"), 60,
                            "the fallback shipper")
    shipper_outputs = {os.readlink(f"/proc/{shipper.pid}/fd/{fd}") for fd in (1, 2)}
    script.kill()  # its output would only reach EOF once the shipper exits
    script.wait()
    assert not shipper_outputs & caller_pipes


def test_sidecar_shipper_serves_hookless_workers_and_exits_when_idle(
        start_server: StartServer, collector: Collector, no_hooks_config: str,
        workspace: Path) -> None:
    with open(workspace / "sidecar.log", "w") as log:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "moesif_fast", "ship", "--settings", DEMO_SETTINGS,
             "--idle-exit", str(SIDECAR_IDLE_EXIT)],
            env=demo_environment(workspace, collector), stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, text=True)
    wait_until(lambda: list(workspace.glob("moesif_fast-*/*.ring"))
               and ring_report(workspace)["reader_pid"] == sidecar.pid, 30,
               "the sidecar to attach to the ring")

    server = start_server(workers=2, config=no_hooks_config)
    first = send_requests(server.url, 200, label="first")
    time.sleep(SHIPPER_CHECK_INTERVAL + 0.5)  # every worker looks at the heartbeat again
    second = send_requests(server.url, 200, label="second")
    exchanges = first + second
    assert_answered_normally(exchanges)
    assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))
    assert [process.pid for process in moesif_processes(workspace, "ship")] == [sidecar.pid]
    assert shipper_starts_logged(server.log) == 0, server.log

    time.sleep(SIDECAR_IDLE_EXIT + 2 * CHECK_INTERVAL)  # idle, but the workers are alive
    assert sidecar.poll() is None, "the sidecar left while producers were alive"
    assert server.stop() == 0
    assert sidecar.wait(timeout=60) == 0
    assert_at_least_once(exchanges, collector.events_by_request_id())


def files_of_ours(workspace: Path) -> list[Path]:
    """What moesif_fast keeps in the workspace (its RING_DIR and SPOOL_DIR): state folders and
    everything in them."""
    return sorted(path for folder in workspace.glob("moesif_fast-*")
                  for path in [folder, *folder.rglob("*")])


def test_uvicorn_stopped_leaves_no_process_and_no_file_after_the_idle_time(
        workspace: Path, collector: Collector) -> None:
    """uvicorn with 2 worker processes (no hooks: the fallback). Once it is stopped, the
    fallback shipper delivers, waits SHIPPER_IDLE_EXIT seconds with no producer, and removes
    the ring, its companion files, the spool and the state folders."""
    pytest.importorskip("uvicorn")
    environment = demo_environment(workspace, collector)
    environment["MOESIF_DEMO_OPTIONS"] = json.dumps({"RING_DIR": str(workspace),
                                                     "SPOOL_DIR": str(workspace)})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(workspace / "uvicorn.log", "w") as log:
        uvicorn = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "moesif_fast.demo.asgi:application",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            env=environment, stdout=log, stderr=log, stdin=subprocess.DEVNULL, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: "Application startup complete" in (workspace / "uvicorn.log")
                   .read_text(), 60, "uvicorn to start")
        exchanges = send_requests(url, 200)
        assert_answered_normally(exchanges)
        assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))
        (shipper,) = wait_until(  # racing workers' extra shippers exit
            lambda: (found := moesif_processes(workspace, "ship")) and len(found) == 1
            and found, 30, "a single fallback shipper")
        assert files_of_ours(workspace)
    finally:
        uvicorn.send_signal(signal.SIGINT)
        assert uvicorn.wait(timeout=60) == 0
    shipper.wait(timeout=SHIPPER_IDLE_EXIT + 30)
    assert moesif_processes(workspace, "ship") == []
    assert files_of_ours(workspace) == []


def test_a_fallback_shipper_whose_collector_is_gone_spools_and_exits(
        start_server: StartServer, collector: Collector, no_hooks_config: str,
        workspace: Path) -> None:
    """The collector dies with events in the ring: once no producer is alive, the idle
    shipper tries until SHUTDOWN_DEADLINE, moves what is left to the spool, removes the ring
    and exits; the next shipper delivers the spool."""
    environment = demo_environment(workspace, collector)
    options = {"RING_DIR": str(workspace), "SPOOL_DIR": str(workspace),
               "SHUTDOWN_DEADLINE": 2}
    environment["MOESIF_DEMO_OPTIONS"] = json.dumps(options)
    sidecar_command = [sys.executable, "-m", "moesif_fast", "ship", "--settings",
                       DEMO_SETTINGS, "--idle-exit", str(SIDECAR_IDLE_EXIT)]
    with open(workspace / "sidecar.log", "w") as log:
        sidecar = subprocess.Popen(sidecar_command, env=environment, stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, text=True)
    wait_until(lambda: list(workspace.glob("moesif_fast-*/*.ring"))
               and ring_report(workspace)["reader_pid"] == sidecar.pid, 30,
               "the sidecar to attach to the ring")
    server = start_server(workers=2, config=no_hooks_config, options=options)
    collector.stop()
    exchanges = send_requests(server.url, 100)
    assert_answered_normally(exchanges)
    assert server.stop() == 0
    assert sidecar.wait(timeout=SIDECAR_IDLE_EXIT + 60) == 1  # events left undelivered
    assert not list(workspace.glob("moesif_fast-*/*.ring"))
    (spool,) = workspace.glob("moesif_fast-*/*.spool")
    assert any(path.stat().st_size for path in spool.iterdir())

    collector.restart()
    with open(workspace / "sidecar.log", "a") as log:
        again = subprocess.Popen(sidecar_command, env=environment, stdout=log, stderr=log,
                                 stdin=subprocess.DEVNULL, text=True)
    assert_at_least_once(exchanges, collector.wait_for(answered_ids(exchanges)))
    assert again.wait(timeout=SIDECAR_IDLE_EXIT + 60) == 0
    assert files_of_ours(workspace) == []
