"""Servers as they live in production: settings changed under a running server (HUP, --reload),
and two servers of one project on one host. Real gunicorn with the hooks, real Django, the local
collector; what is checked is what arrives there.

- Masks added to MOESIF_MIDDLEWARE, then `kill -HUP` (or, with `--reload`, the settings file
  rewritten): the next request's header and body field are masked in the delivered event, and
  every event sent before the change arrived unmasked (so the check can fail).
- Two servers of one project at once, with different masks: each event is masked by its own
  server's settings; stopping one takes under 5 s, and the other keeps delivering.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REQUEST_ID_PARAMETER, Collector

from moesif_fast.demo.run import start_gunicorn, stop

SECRET_HEADER = "x-secret-token"
WORKER_SWAP_TIMEOUT = 60.0  # seconds for gunicorn to replace its workers after a change


def write_settings(folder: Path, masks: bool) -> None:
    """`lifecycle_settings.py` in `folder`: the example API's settings, with or without masks
    on SECRET_HEADER and the body field "password"."""
    extra = (f'"REQUEST_HEADER_MASKS": ["{SECRET_HEADER}"], '
             '"REQUEST_BODY_MASKS": ["password"],') if masks else ""
    (folder / "lifecycle_settings.py").write_text(textwrap.dedent(f"""\
        from moesif_fast.demo.settings import *  # noqa: F403

        MOESIF_MIDDLEWARE = {{**MOESIF_MIDDLEWARE, {extra}}}  # noqa: F405
        """))


@pytest.fixture
def project(workspace: Path) -> Path:
    """A project folder with a WSGI module that defaults to lifecycle_settings."""
    (workspace / "lifecycle_wsgi.py").write_text(textwrap.dedent("""\
        import os

        from django.core.wsgi import get_wsgi_application

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lifecycle_settings")
        application = get_wsgi_application()
        """))
    write_settings(workspace, masks=False)
    return workspace


@pytest.fixture
def server(project: Path, collector: Collector, request: pytest.FixtureRequest
           ) -> Iterator[tuple[subprocess.Popen[str], str]]:
    extra = list(getattr(request, "param", ()))
    process, url = start_gunicorn(str(project), collector.url, workers=2, app="lifecycle_wsgi",
                                  extra_args=["--pythonpath", str(project), *extra])
    yield process, url
    stop(process)


def post_secret(url: str, label: str, authorization: str = "") -> str:
    """POST a body with a password, with the secret header; returns the request id."""
    request_id = f"{label}-{time.monotonic_ns()}"
    headers = {SECRET_HEADER: f"secret-{request_id}", "Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    answer = requests.post(f"{url}/api/echo?{REQUEST_ID_PARAMETER}={request_id}",
                           data=json.dumps({"password": "hunter2", "item": label}),
                           headers=headers, timeout=30)
    assert answer.status_code == 201
    return request_id


def worker_pids(arbiter_pid: int) -> set[int]:
    import psutil

    arbiter = psutil.Process(arbiter_pid)
    pids = set()
    for child in arbiter.children():
        try:
            if child.cmdline() == arbiter.cmdline():
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def wait_for_new_workers(arbiter_pid: int, old: set[int], count: int = 2) -> None:
    """Until the arbiter's workers are `count` processes, none of them in `old`."""
    give_up_at = time.monotonic() + WORKER_SWAP_TIMEOUT
    while time.monotonic() < give_up_at:
        current = worker_pids(arbiter_pid)
        if len(current) == count and not current & old:
            return
        time.sleep(0.2)
    pytest.fail(f"gunicorn did not replace its workers {old}: now {worker_pids(arbiter_pid)}")


def lowercase_headers(event: dict[str, Any]) -> dict[str, str]:
    """The request headers by lowercase name (without masks, names keep their case)."""
    return {name.lower(): value for name, value in event["request"]["headers"].items()}


def assert_unmasked(event: dict[str, Any]) -> None:
    assert lowercase_headers(event)[SECRET_HEADER].startswith("secret-")
    assert event["request"]["body"]["password"] == "hunter2"


def assert_masked(event: dict[str, Any]) -> None:
    assert SECRET_HEADER not in lowercase_headers(event)
    assert "password" not in event["request"]["body"]
    assert event["request"]["body"]["item"]  # the rest of the body is there


def change_settings_and_check(project: Path, collector: Collector, arbiter_pid: int, url: str,
                              apply_change: Any) -> None:
    before = {post_secret(url, "before") for _ in range(5)}
    for events in collector.wait_for(before).values():
        assert len(events) == 1
        assert_unmasked(events[0])
    old_workers = worker_pids(arbiter_pid)
    write_settings(project, masks=True)
    apply_change()
    wait_for_new_workers(arbiter_pid, old_workers)
    after = {post_secret(url, "after") for _ in range(20)}
    arrived = collector.wait_for(after)
    for request_id in after:
        assert len(arrived[request_id]) == 1
        assert_masked(arrived[request_id][0])


def test_masks_added_then_hup_mask_the_next_requests(
        project: Path, collector: Collector, server: tuple[subprocess.Popen[str], str]) -> None:
    process, url = server
    change_settings_and_check(project, collector, process.pid, url,
                              lambda: os.kill(process.pid, signal.SIGHUP))
    assert stop(process) == 0
    log = (project / "gunicorn.log").read_text()
    assert "restarting on the settings now on disk" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("server", [("--reload",)], indirect=True)
def test_masks_added_under_reload_mask_the_next_requests(
        project: Path, collector: Collector, server: tuple[subprocess.Popen[str], str]) -> None:
    process, url = server

    def touch() -> None:  # write_settings rewrote it; make sure the mtime moved on
        later = time.time() + 2
        os.utime(project / "lifecycle_settings.py", (later, later))

    change_settings_and_check(project, collector, process.pid, url, touch)
    assert stop(process) == 0


def test_two_servers_of_one_project_each_mask_by_their_own_settings(
        workspace: Path, collector: Collector) -> None:
    """Same settings module and collector, different masks (MOESIF_DEMO_OPTIONS), one state
    folder: own ring and shipper each; stopping one neither slows nor stops the other."""
    shared = {"RING_DIR": str(workspace), "SPOOL_DIR": str(workspace)}
    servers = {}
    for name, masks in (("masking", ["authorization"]), ("plain", None)):
        folder = workspace / name
        folder.mkdir()
        options = dict(shared, **({"REQUEST_HEADER_MASKS": masks} if masks else {}))
        servers[name] = start_gunicorn(str(folder), collector.url, workers=2, options=options)
    try:
        sent = {name: {post_secret(url, name, authorization=f"Bearer {name}")
                       for _ in range(20)} for name, (_, url) in servers.items()}
        arrived = collector.wait_for(sent["masking"] | sent["plain"])
        for request_id in sent["masking"]:
            (event,) = arrived[request_id]
            assert "authorization" not in lowercase_headers(event)
        for request_id in sent["plain"]:
            (event,) = arrived[request_id]
            assert lowercase_headers(event)["authorization"] == "Bearer plain"
        assert len(list(workspace.glob("moesif_fast-*/*.ring"))) == 2

        masking_process, _ = servers.pop("masking")
        started = time.monotonic()
        assert stop(masking_process) == 0
        assert time.monotonic() - started < 5.0
        log = (workspace / "masking" / "gunicorn.log").read_text()
        assert "ERROR" not in log, log

        _, plain_url = servers["plain"]
        later = {post_secret(plain_url, "plain-later") for _ in range(20)}
        for events in collector.wait_for(later).values():
            assert len(events) == 1
    finally:
        for process, _ in servers.values():
            stop(process)
