"""Outgoing capture's cost to the caller: `session.get` with and without capture, side by side.

Two pairs in one run. Capture appends to a real ring, drained between rounds outside the
timed region (the side without capture runs the same drain):

- against a loopback HTTP service in another process (keep-alive, 1 KB JSON answers): the
  realistic figure, but a loopback round trip varies by more than capture costs, so read it
  with the next pair;
- through an in-process transport adapter that answers the same 1 KB JSON without a socket:
  only requests' own work is left around capture, so the difference is sharper.

The cost capture adds to a call is its median minus the median without capture, per pair.

    python -m pytest benchmarks/bench_outgoing.py --benchmark-only
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from multiprocessing.connection import Connection
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

from moesif_fast import outgoing, settings  # noqa: E402
from moesif_fast.ringbuffer import Reader  # noqa: E402

LOOPBACK_ROUNDS = 5_000
IN_PROCESS_ROUNDS = 20_000
ANSWER = json.dumps({"ok": True, "items": [{"id": n, "label": f"label {n}"}
                                           for n in range(35)]})[:1000].encode()
ANSWER = ANSWER[:ANSWER.rindex(b"}, {")] + b"}]}"  # valid JSON, under 1 KB
ANSWER_HEADERS = {"Content-Type": "application/json", "Content-Length": str(len(ANSWER)),
                  "X-Service": "bench"}
REQUEST_HEADERS = {"Accept": "application/json", "Authorization": "Bearer abc.def.ghi",
                   "X-Request-Id": "r-1"}
OPTIONS = settings.load({"APPLICATION_ID": "app-id", "BASE_URI": "http://127.0.0.1:9",
                         "CAPTURE_OUTGOING_REQUESTS": True})
IN_PROCESS_URL = "http://in-process.invalid/items?page=1"


class ServiceHandler(BaseHTTPRequestHandler):
    """Answers every GET with ANSWER, keeping the connection open."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body leave in one write (flushed after each request)

    def do_GET(self) -> None:
        self.send_response(200)
        for name, value in ANSWER_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class InProcessAdapter(BaseAdapter):
    """A requests transport adapter that answers ANSWER without a socket."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = 200
        response.reason = "OK"
        response.headers = CaseInsensitiveDict(ANSWER_HEADERS)
        response.raw = io.BytesIO(ANSWER)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def serve(port_sender: Connection) -> None:
    server = HTTPServer(("127.0.0.1", 0), ServiceHandler)
    port_sender.send(server.server_address[1])
    server.serve_forever()


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    """The loopback service, in a process of its own, as an external service would be: in
    this process its thread would compete with the caller for the GIL."""
    context = multiprocessing.get_context("fork")
    port_receiver, port_sender = context.Pipe(duplex=False)
    process = context.Process(target=serve, args=(port_sender,), daemon=True)
    process.start()
    yield f"http://127.0.0.1:{port_receiver.recv()}/items?page=1"
    process.terminate()
    process.join()


@pytest.fixture
def capture() -> Iterator[None]:
    outgoing.enable(OPTIONS)
    yield
    outgoing.disable()


def drained(reader: Reader) -> Callable[[], None]:
    def setup() -> None:
        while len(batch := reader.read(10_000, 1 << 30)):
            reader.commit(batch)
    return setup


def loopback_session() -> requests.Session:
    session = requests.Session()
    session.headers.update(REQUEST_HEADERS)
    return session


def in_process_session() -> requests.Session:
    """Without trust_env: requests then skips reading proxy settings from the environment on
    every call, the largest and noisiest part of its own work, which capture does not touch."""
    session = loopback_session()
    session.trust_env = False
    session.mount("http://in-process.invalid/", InProcessAdapter())
    return session


def run(benchmark, session: requests.Session, url: str, reader: Reader, rounds: int) -> None:
    response = benchmark.pedantic(session.get, args=(url,), setup=drained(reader),
                                  rounds=rounds, warmup_rounds=100)
    assert response.status_code == 200 and response.content == ANSWER


def test_loopback_without_capture(benchmark, service_url: str, ring_reader: Reader) -> None:
    run(benchmark, loopback_session(), service_url, ring_reader, LOOPBACK_ROUNDS)


def test_loopback_with_capture(benchmark, service_url: str, ring_reader: Reader,
                               capture: None) -> None:
    run(benchmark, loopback_session(), service_url, ring_reader, LOOPBACK_ROUNDS)
    assert outgoing.capture_errors() == 0 and ring_reader.ring.stats().dropped == 0


def test_in_process_without_capture(benchmark, ring_reader: Reader) -> None:
    run(benchmark, in_process_session(), IN_PROCESS_URL, ring_reader, IN_PROCESS_ROUNDS)


def test_in_process_with_capture(benchmark, ring_reader: Reader, capture: None) -> None:
    run(benchmark, in_process_session(), IN_PROCESS_URL, ring_reader, IN_PROCESS_ROUNDS)
    assert outgoing.capture_errors() == 0 and ring_reader.ring.stats().dropped == 0
