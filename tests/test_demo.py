"""`python -m moesif_fast demo`, the README's first command, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import requests
from conftest import DELIVERY_TIMEOUT, moesif_processes, wait_until

from moesif_fast.collector import read_stats
from moesif_fast.demo.run import start_collector, start_gunicorn, stop
from moesif_fast.settings import MoesifOptions


def test_demo_delivers_every_request_and_cleans_up() -> None:
    ring_dir = MoesifOptions().ring_dir
    before = set(os.listdir(ring_dir))
    finished = subprocess.run(
        [sys.executable, "-m", "moesif_fast", "demo", "--requests", "300"],
        capture_output=True, text=True, timeout=120,
        env={key: value for key, value in os.environ.items()
             if key not in ("DJANGO_SETTINGS_MODULE", "MOESIF_FAST_RING")})
    assert finished.returncode == 0, finished.stdout + finished.stderr
    counts = dict(re.findall(r"^  (requests sent|requests answered|events captured|"
                             r"events delivered|events dropped|gunicorn exit code) +(\d+)$",
                             finished.stdout, re.MULTILINE))
    assert counts == {"requests sent": "300", "requests answered": "300",
                      "events captured": "300", "events delivered": "300",
                      "events dropped": "0", "gunicorn exit code": "0"}
    assert finished.stdout.rstrip().endswith(
        "every answered request arrived at the collector exactly once")
    left = {name for name in set(os.listdir(ring_dir)) - before
            if name.startswith("moesif-fast-demo-")}
    assert left == set()  # the demo's ring directory is gone


def test_the_application_id_is_on_no_command_line(workspace: Path) -> None:
    """The demo's processes (collector, gunicorn, its workers, supervisor, shipper) get the
    application id from their environment: a command line is visible to every user in `ps`."""
    application_id = f"secret-{uuid.uuid4().hex}"
    collector, collector_url = start_collector(str(workspace), application_id)
    try:
        server, server_url = start_gunicorn(str(workspace), collector_url, workers=1,
                                            application_id=application_id)
        try:
            for _ in range(5):
                assert requests.get(server_url + "/api/items?page=1", timeout=30).ok
            # Delivered: the shipper runs, and the collector checks the id the shipper sends.
            wait_until(lambda: read_stats(workspace / "collector.sqlite3")["events"] == 5,
                       DELIVERY_TIMEOUT, "the events at the collector")
            assert moesif_processes(workspace, "ship")
            wrong_id = requests.post(collector_url + "/v1/events/batch", json=[], timeout=30,
                                     headers={"X-Moesif-Application-Id": "another-id"})
            command_lines = [" ".join(process.info["cmdline"] or ())
                             for process in psutil.process_iter(["cmdline"])]
        finally:
            assert stop(server) == 0
    finally:
        assert stop(collector) == 0

    assert wrong_id.status_code == 401
    assert [line for line in command_lines if application_id in line] == []
