"""A bad MOESIF_MIDDLEWARE is reported clearly at start, and the site keeps serving.

Two ways a user meets the report: `python -m django check` (Django's system checks) in a
project that lists only the middleware, as the README tells, and the gunicorn log when the
server starts with the repository's hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from conftest import (
    EXPECTED_STATUS,
    Collector,
    Exchange,
    Server,
    answered_ids,
    assert_exactly_once,
    moesif_processes,
    send_requests,
)

from moesif_fast.demo.views import ITEMS

StartServer = Callable[..., Server]

# name: (MOESIF_MIDDLEWARE entries, check id, the key the message must name)
BAD_SETTINGS: dict[str, tuple[dict[str, object], str, str]] = {
    "missing_application_id": ({"APPLICATION_ID": None}, "moesif_fast.E003", "APPLICATION_ID"),
    "ftp_base_uri": ({"BASE_URI": "ftp://x"}, "moesif_fast.E004", "BASE_URI"),
    "base_uri_not_a_url": ({"BASE_URI": "not a url"}, "moesif_fast.E004", "BASE_URI"),
    "batch_size_as_text": ({"BATCH_SIZE": "10"}, "moesif_fast.E002", "BATCH_SIZE"),
    "log_body_as_text": ({"LOG_BODY": "yes"}, "moesif_fast.E002", "LOG_BODY"),
}
UNKNOWN_KEY = "BATCH_SIZ"

SETTINGS_TEMPLATE = '''\
SECRET_KEY = "settings-check-test"
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "moesif_fast.demo.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "moesif_fast"]
DATABASES = {{}}
MIDDLEWARE = ["moesif_fast.middleware.MoesifMiddleware"]
MOESIF_MIDDLEWARE = {moesif_middleware!r}
'''


def django_check(directory: Path, moesif_middleware: dict[str, object]
                 ) -> subprocess.CompletedProcess[str]:
    """`python -m django check` in a project whose settings module sets `moesif_middleware`
    and lists the moesif_fast app, as the README says to for `manage.py check` (Django's
    check command never imports middleware)."""
    (directory / "project_settings.py").write_text(
        SETTINGS_TEMPLATE.format(moesif_middleware=moesif_middleware))
    environment = dict(os.environ, DJANGO_SETTINGS_MODULE="project_settings",
                       PYTHONPATH=os.pathsep.join([str(directory), *sys.path]))
    completed = subprocess.run([sys.executable, "-m", "django", "check"], env=environment,
                               capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
    if "System check identified" not in completed.stdout + completed.stderr:
        pytest.fail(f"django check did not run:\n{completed.stdout}{completed.stderr}")
    return completed


def valid_settings(**changes: object) -> dict[str, object]:
    return {"APPLICATION_ID": "app-id", "BASE_URI": "http://127.0.0.1:9", **changes}


def assert_served_without_capture(exchanges: list[Exchange]) -> None:
    """Every request got its normal status and body, and no transaction header."""
    for exchange in exchanges:
        response = exchange.response
        assert response is not None, exchange.error
        assert response.status_code == EXPECTED_STATUS[exchange.route]
        assert "x-moesif-transaction-id" not in response.headers
        if exchange.route == "items":
            query = dict(parse_qsl(urlsplit(exchange.url).query))
            assert response.json() == {"items": ITEMS, "query": query}
        elif exchange.route == "echo":
            assert response.json() == exchange.json_body
        elif exchange.route == "text":
            assert response.text == "hello from moesif_fast"
        elif exchange.route == "stream":
            assert response.text == "".join(f"chunk {number}\n" for number in range(5))
        else:
            assert response.json() == {"status": 404}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_django_check_reports_a_bad_setting(tmp_path: Path, case: str) -> None:
    changes, check_id, key = BAD_SETTINGS[case]
    completed = django_check(tmp_path, valid_settings(**changes))
    output = completed.stdout + completed.stderr
    assert check_id in output, output
    assert key in output
    assert completed.returncode == 1


def test_django_check_warns_about_an_unknown_key(tmp_path: Path) -> None:
    completed = django_check(tmp_path, valid_settings(**{UNKNOWN_KEY: 10}))
    output = completed.stdout + completed.stderr
    assert "moesif_fast.W001" in output, output
    assert UNKNOWN_KEY in output
    assert completed.returncode == 0


def test_django_check_is_quiet_about_good_settings(tmp_path: Path) -> None:
    completed = django_check(tmp_path, valid_settings())
    assert completed.returncode == 0
    assert "moesif_fast" not in completed.stdout + completed.stderr


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_gunicorn_logs_a_bad_setting_and_serves_uncaptured(
        start_server: StartServer, collector: Collector, case: str) -> None:
    changes, check_id, key = BAD_SETTINGS[case]
    server = start_server(workers=2, options=changes)
    log_at_start = server.log
    exchanges = send_requests(server.url, 50, threads=4)
    assert_served_without_capture(exchanges)

    problem_lines = [line for line in log_at_start.splitlines() if check_id in line]
    assert problem_lines, log_at_start
    assert any(f"'{key}'" in line for line in problem_lines), problem_lines
    assert not list(server.directory.glob("moesif_fast-*/*.ring"))
    assert not moesif_processes(server.directory, "supervise")
    assert not moesif_processes(server.directory, "ship")
    assert server.stop() == 0
    assert collector.stats()["requests"] == 0


def test_gunicorn_warns_about_an_unknown_key_and_still_captures(
        start_server: StartServer, collector: Collector) -> None:
    server = start_server(workers=2, options={UNKNOWN_KEY: 10})
    warnings = [line for line in server.log.splitlines() if "moesif_fast.W001" in line]
    assert any(f"'{UNKNOWN_KEY}'" in line for line in warnings), server.log
    exchanges = send_requests(server.url, 50, threads=4)
    collector.wait_for(answered_ids(exchanges))
    assert server.stop() == 0
    assert_exactly_once(exchanges, collector.events_by_request_id())
