"""`python -m moesif_fast demo`: the whole path on this machine, with nothing configured.

Starts the local collector and the example API under gunicorn (workers, the hooks of
`-c python:moesif_fast.gunicorn`, ring, shipper), sends traffic while showing progress, stops
gunicorn with SIGTERM and prints requests sent, events captured, delivered and dropped. The
process helpers here are also what the end-to-end tests use to run real servers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..collector import APPLICATION_ID_VARIABLE
from ..settings import MoesifOptions
from ..stats import collect, find_rings

APPLICATION_ID = "demo-application-id"
HOOKS_CONFIG = "python:moesif_fast.gunicorn"  # the installed hooks, as a pip user gives them
START_TIMEOUT = 30.0


def start_collector(directory: str, application_id: str = APPLICATION_ID, port: int = 0
                    ) -> tuple[subprocess.Popen[str], str]:
    """Start `python -m moesif_fast collector` on loopback (port 0: a free one) storing into
    `directory`/collector.sqlite3; returns the process and its URL. The application id goes
    through the environment, as for gunicorn: a command line is visible to every user."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moesif_fast", "collector", "--port", str(port), "--quiet",
         "--db", os.path.join(directory, "collector.sqlite3")],
        env={**os.environ, APPLICATION_ID_VARIABLE: application_id},
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line = process.stdout.readline() if process.stdout else ""
    found = re.search(r"(http://\S+)", line)
    if not found:
        process.kill()
        raise RuntimeError(f"the collector did not start: {line!r}")
    return process, found.group(1)


def start_gunicorn(directory: str, collector_url: str, *, workers: int = 2,
                   options: dict[str, object] | None = None, extra_args: list[str] = (),
                   app: str = "moesif_fast.demo.wsgi", config: str | None = None,
                   application_id: str = APPLICATION_ID) -> tuple[subprocess.Popen[str], str]:
    """Start gunicorn on a free loopback port with the example API; returns it and its URL.
    DJANGO_SETTINGS_MODULE is left unset: the hooks must find it through wsgi.py."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DJANGO_SETTINGS_MODULE", "MOESIF_FAST_RING")}
    environment.update(
        MOESIF_DEMO_BASE_URI=collector_url, MOESIF_DEMO_APPLICATION_ID=application_id,
        MOESIF_DEMO_OPTIONS=json.dumps({"RING_DIR": directory, "SPOOL_DIR": directory,
                                        **(options or {})}))
    log_path = os.path.join(directory, "gunicorn.log")
    command = [sys.executable, "-m", "gunicorn", "-c", config or HOOKS_CONFIG,
               "-w", str(workers), "-b", "127.0.0.1:0", "--no-control-socket",
               *extra_args, app]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"Listening at: (http://\S+)", Path(log_path).read_text())
        if found and "Booting worker" in Path(log_path).read_text():
            return process, found.group(1)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"gunicorn did not start:\n{Path(log_path).read_text()}")


def collector_stats(collector_url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{collector_url}/_collector/stats", timeout=5) as response:
        return json.load(response)


def stop(process: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """SIGTERM, then wait (SIGKILL after `timeout`)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_demo(total_requests: int, workers: int) -> int:
    import requests

    ring_dir = MoesifOptions().ring_dir  # the ring where it lives by default (tmpfs)
    with tempfile.TemporaryDirectory(prefix="moesif-fast-demo-") as directory, \
            tempfile.TemporaryDirectory(prefix="moesif-fast-demo-", dir=ring_dir) as rings_in:
        collector, collector_url = start_collector(directory)
        server, server_url = start_gunicorn(directory, collector_url, workers=workers,
                                            options={"RING_DIR": rings_in})
        print(f"collector  {collector_url}   (what would be sent to Moesif is stored there)")
        print(f"example API {server_url} under gunicorn, {workers} workers, "
              f"hooks from -c {HOOKS_CONFIG}")
        session = requests.Session()
        payload = {"user": "demo", "note": "x" * 900}
        routes = [("GET", "/api/items?page=1", None), ("POST", "/api/echo", payload),
                  ("GET", "/api/text", None), ("GET", "/api/status/404", None)]

        def send(number: int) -> int:
            method, route, body = routes[number % len(routes)]
            return session.request(method, server_url + route, json=body, timeout=10).status_code

        answered = 0
        started = time.monotonic()
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for answered, _ in enumerate(pool.map(send, range(total_requests)), start=1):
                    if answered % 100 == 0 or answered == total_requests:
                        delivered = collector_stats(collector_url)["events"]
                        print(f"\r  requests answered {answered:>6}/{total_requests}   "
                              f"events delivered {delivered:>6}", end="", flush=True)
            elapsed = time.monotonic() - started
            print(f"\n  {answered / elapsed:.0f} requests/s from one client; stopping gunicorn "
                  "(SIGTERM) ...")
            rings = find_rings(rings_in)
            captured = collect(rings[0]) if rings else {"appended": 0, "dropped": 0}
        finally:
            exit_code = stop(server)
        delivered = collector_stats(collector_url)["events"]
        stop(collector)
        print(f"  requests sent      {total_requests}\n"
              f"  requests answered  {answered}\n"
              f"  events captured    {captured['appended']}\n"
              f"  events delivered   {delivered}\n"
              f"  events dropped     {captured['dropped']}\n"
              f"  gunicorn exit code {exit_code}")
        complete = delivered == answered == total_requests and exit_code == 0
        print("every answered request arrived at the collector exactly once" if complete
              else "SOME EVENTS ARE MISSING")
        return 0 if complete else 1
