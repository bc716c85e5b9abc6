"""Acceptance: moesifdjango-compatible capture, checked end to end at a local collector.

Every test sends real requests through Django (the test `Client`, or `AsyncClient` for ASGI)
with moesif_fast's middleware in MIDDLEWARE, then delivers what the middleware appended to a
fresh ring with a real `Shipper` to a real `LocalCollector`, and asserts the events the
collector stored, field by field, against the reference's rules (docs: moesif-protocol.md
§1.4 event shape, §2 capture rules, §3 options, §7 weak points W1, W2, W9, W12, W13, W22).

Why the pipeline runs in this process: the middleware attaches to the ring named by
MOESIF_FAST_RING as under the gunicorn hooks; a Shipper given the same options (masks and
MASK_EVENT_MODEL run there) drains it. The middleware's producer keeps a lane of the ring while
this process lives, and a shipper told to finish waits for live producers, so `deliver` first
releases this process's producer, as a worker exiting would.

The views and the stand-in authentication middleware are in `compat_app.py`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import decimal
import gzip
import ipaddress
import json
import logging
import marshal
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

import compat_app  # noqa: E402
from django.http import HttpResponseBase  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.test.client import FakePayload  # noqa: E402
from django.utils.asyncio import async_unsafe  # noqa: E402
from event_shape import EVENT_KEYS, EVENT_TIME, REQUEST_KEYS, RESPONSE_KEYS  # noqa: E402

from moesif_fast import ringfile, sink  # noqa: E402
from moesif_fast import settings as moesif_settings  # noqa: E402
from moesif_fast.collector import LocalCollector, read_event_bodies  # noqa: E402
from moesif_fast.middleware import MoesifMiddleware  # noqa: E402
from moesif_fast.ringbuffer import Geometry, RingFile  # noqa: E402
from moesif_fast.shipper.loop import Shipper, ShipperCounters  # noqa: E402
from moesif_fast.shipper.transport import CollectorTransport  # noqa: E402

APPLICATION_ID = "compat-application-id"
NEW_STYLE = "moesif_fast.middleware.MoesifMiddleware"
PRE19 = "moesif_fast.middleware_pre19.MoesifMiddlewarePre19"
SESSIONS = "django.contrib.sessions.middleware.SessionMiddleware"
AUTHENTICATION = "django.contrib.auth.middleware.AuthenticationMiddleware"
LOGIN = "compat_app.LoginFromHeaderMiddleware"
OUTER_HEADER = "compat_app.OuterHeaderMiddleware"
ANNOTATE_META = "compat_app.AnnotateMetaMiddleware"
SESSION_SETTINGS = {"SESSION_ENGINE": "django.contrib.sessions.backends.cache"}
DEFAULT_RING = Geometry.for_size(4 << 20, 2, 10_000)
TRANSACTION_HEADER = "x-moesif-transaction-id"
EVENT_TRANSACTION_KEY = "X-MOESIF-TRANSACTION-ID"
CLIENT_ADDRESS = "127.0.0.1"  # the test client's REMOTE_ADDR

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"


# --- the pipeline: Django → ring → Shipper → LocalCollector ----------------------------------


@dataclass
class Delivery:
    events: list[dict[str, Any]]  # the events the collector stored, in arrival order
    counters: ShipperCounters


class Pipeline:
    """One test's Moesif installation: its collector, its ring, the options (shared by the
    middleware and the shipper) and the Django settings its requests run under."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch,
                 geometry: Geometry = DEFAULT_RING) -> None:
        self.collector = LocalCollector(directory / "collector.sqlite3",
                                        application_id=APPLICATION_ID)
        self.collector.start()
        self.ring = RingFile.create(str(directory / "events.ring"), geometry)
        monkeypatch.setenv(ringfile.RING_ENV, self.ring.path)
        self.options: dict[str, Any] = {"APPLICATION_ID": APPLICATION_ID,
                                        "BASE_URI": self.collector.url}
        self.middleware: list[str] = [NEW_STYLE]
        self.django_settings: dict[str, Any] = {}
        self._events_seen = 0

    def configure(self, options: dict[str, Any] | None = None,
                  middleware: list[str] | None = None, **django_settings: Any) -> None:
        """Set MOESIF_MIDDLEWARE options (added to the application id and collector URL), the
        MIDDLEWARE list and other Django settings for the requests that follow."""
        self.options.update(options or {})
        if middleware is not None:
            self.middleware = middleware
        self.django_settings.update(django_settings)

    @contextmanager
    def django(self, middleware: list[str] | None = None) -> Iterator[None]:
        """Django settings as configured; active while a request is sent, because Django
        builds a client's middleware chain at its first request."""
        with override_settings(MOESIF_MIDDLEWARE=self.options, ROOT_URLCONF="compat_app",
                               MIDDLEWARE=self.middleware if middleware is None else middleware,
                               **self.django_settings):
            yield

    def send(self, method: str, *arguments: Any, middleware: list[str] | None = None,
             **request: Any) -> HttpResponseBase:
        """One request through a new test client (so a newly built middleware chain):
        `Client().<method>(*arguments, **request)`."""
        with self.django(middleware):
            return getattr(Client(raise_request_exception=False), method)(*arguments, **request)

    def send_async(self, method: str, path: str, *, middleware: list[str] | None = None,
                   **request: Any) -> HttpResponseBase:
        """The same through the ASGI handler (AsyncClient)."""
        async def call() -> HttpResponseBase:
            with self.django(middleware):
                client = AsyncClient(raise_request_exception=False)
                return await getattr(client, method)(path, **request)

        return asyncio.run(call())

    def send_environ(self, middleware: list[str] | None = None,
                     **environ: Any) -> HttpResponseBase:
        """A WSGI request built from exactly these environ keys (and the client's defaults):
        for requests the test client's helpers cannot make, such as a body without a
        Content-Type header."""
        with self.django(middleware):
            return Client(raise_request_exception=False).request(**environ)

    def deliver(self) -> Delivery:
        """Ship everything captured so far and return the events that arrived since the last
        delivery. Fails the test if the shipper could not deliver everything it read."""
        producer = sink._producers.pop(self.ring.path, None)
        if producer is not None:
            producer.close()  # as a worker exiting would: the shipper waits for live producers
        options = moesif_settings.load(self.options)
        transport = CollectorTransport(options.base_uri, options.APPLICATION_ID or "",
                                       user_agent="test", max_backoff=0.2)
        shipper = Shipper(self.ring, options, transport)
        try:
            finished = shipper.run(lambda: True, finish_deadline=30)
        finally:
            shipper.reader.close()
            transport.close()
        assert finished, shipper.counters
        texts = read_event_bodies(self.collector.db_path, since_id=self._events_seen)
        self._events_seen += len(texts)
        return Delivery([strict_json(text) for text in texts], shipper.counters)

    def deliver_one(self) -> dict[str, Any]:
        events = self.deliver().events
        assert len(events) == 1, events
        [event] = events
        assert_event_shape(event)
        return event

    def close(self) -> None:
        self.collector.stop()


@pytest.fixture
def make_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[Callable[..., Pipeline]]:
    """Pipelines of this test, each in a directory of its own (a fresh ring path: the sink
    keeps one producer per ring path per process)."""
    made: list[Pipeline] = []

    def make(geometry: Geometry = DEFAULT_RING) -> Pipeline:
        directory = tmp_path / f"pipeline-{len(made)}"
        directory.mkdir(mode=0o700)
        made.append(Pipeline(directory, monkeypatch, geometry))
        return made[-1]

    yield make
    for pipeline in made:
        pipeline.close()


@pytest.fixture
def pipeline(make_pipeline: Callable[..., Pipeline]) -> Pipeline:
    return make_pipeline()


# --- helpers -----------------------------------------------------------------------------------


def strict_json(text: str) -> Any:
    """Parse JSON as the Moesif API does: NaN and Infinity are not JSON."""
    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


def is_string_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items())


def assert_body_shape(body: Any, transfer_encoding: Any) -> None:
    if transfer_encoding is None:
        assert body is None
    elif transfer_encoding == "base64":
        assert isinstance(body, str)
        base64.b64decode(body, validate=True)
    else:
        assert transfer_encoding == "json"
        assert isinstance(body, dict | list)


def assert_event_shape(event: dict[str, Any]) -> None:
    """The §1.4 shape: every key, in wire order, with its type."""
    assert list(event) == EVENT_KEYS
    request, response = event["request"], event["response"]
    assert list(request) == REQUEST_KEYS
    assert list(response) == RESPONSE_KEYS
    for side in (request, response):
        assert EVENT_TIME.fullmatch(side["time"]), side["time"]
        assert is_string_map(side["headers"]), side["headers"]
        assert_body_shape(side["body"], side["transfer_encoding"])
    assert request["time"] <= response["time"]
    assert re.fullmatch(r"https?://[^/]+/.*", request["uri"]), request["uri"]
    assert isinstance(request["verb"], str) and request["verb"] == request["verb"].upper()
    assert request["api_version"] is None or isinstance(request["api_version"], str)
    if request["ip_address"] is not None:
        ipaddress.ip_address(request["ip_address"])
    assert type(response["status"]) is int
    assert response["ip_address"] is None
    assert event["tags"] is None
    assert event["direction"] == "Incoming"
    assert type(event["weight"]) is int and event["weight"] >= 1
    assert event["blocked_by"] is None
    assert isinstance(event["transaction_id"], str) and event["transaction_id"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jwt(payload: dict[str, Any]) -> str:
    """A JWT-shaped token whose payload is URL-safe base64 without padding, as real ones are."""
    segment = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{segment}.c2lnbmF0dXJl"


def url_safe_jwt(subject: str) -> str:
    """A JWT whose payload segment holds both URL-safe characters, '-' and '_' (which the
    reference's standard-alphabet decoding drops, W12)."""
    for padding in range(200):
        token = jwt({"sub": subject, "name": "é~" * padding, "scope": "?>?>"})
        segment = token.split(".")[1]
        if "-" in segment and "_" in segment:
            return token
    raise AssertionError("no URL-safe payload found")


def response_body(response: HttpResponseBase) -> bytes:
    if response.streaming:
        return b"".join(response.streaming_content)
    return response.content


def answer(response: HttpResponseBase) -> tuple[int, list[tuple[str, str]], bytes, list[str]]:
    """What the client got: status, headers (but the transaction id), content and cookies."""
    headers = sorted((name.lower(), value) for name, value in response.items()
                     if name.lower() != TRANSACTION_HEADER)
    cookies = sorted(morsel.OutputString() for morsel in response.cookies.values())
    return response.status_code, headers, response_body(response), cookies


def by_query(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Events keyed by their URI's query string (tests name each request with one)."""
    return {event["request"]["uri"].partition("?")[2]: event for event in events}


def header(headers: dict[str, str], name: str) -> str | None:
    """A header's value whatever the key case (masks lowercase keys)."""
    matches = [value for key, value in headers.items() if key.lower() == name.lower()]
    assert len(matches) <= 1, headers
    return matches[0] if matches else None


# --- §1.4 event shape, §2.1 order, §2.5 URI and verb, time formats -----------------------------


def test_default_options_deliver_the_reference_event_field_by_field(pipeline: Pipeline) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    body = b'{"a": 1, "inner": [{"b": 2}]}'
    response = pipeline.send(
        "post", "/echo?x=1&y=2", data=body, content_type="application/json",
        headers={"X-Api-Key": "key-1", "Authorization": f"Bearer {jwt({'sub': 'jwt-user-7'})}",
                 "X-Forwarded-For": "unknown, 203.0.113.9:8080, 10.0.0.1"})
    after = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert response.status_code == 200
    assert response.content == body
    transaction_id = response[TRANSACTION_HEADER]
    assert uuid.UUID(transaction_id).version == 4

    event = pipeline.deliver_one()
    request, answered = event["request"], event["response"]
    assert request["uri"] == "http://testserver/echo?x=1&y=2"
    assert request["verb"] == "POST"
    assert request["headers"] == {
        "COOKIE": "", "CONTENT-LENGTH": str(len(body)), "CONTENT-TYPE": "application/json",
        "X-API-KEY": "key-1", "AUTHORIZATION": f"Bearer {jwt({'sub': 'jwt-user-7'})}",
        "X-FORWARDED-FOR": "unknown, 203.0.113.9:8080, 10.0.0.1",
        EVENT_TRANSACTION_KEY: transaction_id}
    assert request["api_version"] is None
    assert request["ip_address"] == "203.0.113.9"
    assert (request["body"], request["transfer_encoding"]) == ({"a": 1, "inner": [{"b": 2}]},
                                                               "json")
    assert answered["status"] == 200
    assert answered["headers"] == {"Content-Type": "application/json",
                                   TRANSACTION_HEADER: transaction_id}
    assert (answered["body"], answered["transfer_encoding"]) == ({"a": 1, "inner": [{"b": 2}]},
                                                                 "json")
    assert (event["session_token"], event["user_id"], event["company_id"],
            event["metadata"]) == (None, "jwt-user-7", None, None)
    assert (event["weight"], event["blocked_by"]) == (1, None)
    assert event["transaction_id"] == transaction_id
    for side in (request, answered):
        moment = datetime.datetime.strptime(side["time"], TIME_FORMAT)
        assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= moment <= after


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete", "options", "head"])
def test_verb_is_the_request_method(pipeline: Pipeline, method: str) -> None:
    response = pipeline.send(method, "/json-object")
    assert response.status_code == 200
    assert pipeline.deliver_one()["request"]["verb"] == method.upper()


@pytest.mark.parametrize(("request_kwargs", "django_settings", "uri"), [
    pytest.param({}, {}, "http://testserver/echo?q=a%20b&x=%E2%9C%93", id="query-kept-escaped"),
    pytest.param({"secure": True}, {}, "https://testserver/echo?q=a%20b&x=%E2%9C%93",
                 id="https"),
    pytest.param({"headers": {"X-Forwarded-Proto": "https", "Host": "api.example.com"}},
                 {"SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https")},
                 "https://api.example.com/echo?q=a%20b&x=%E2%9C%93", id="secure-proxy-ssl-header"),
    pytest.param({"headers": {"X-Forwarded-Proto": "https"}}, {},
                 "http://testserver/echo?q=a%20b&x=%E2%9C%93", id="proxy-header-not-trusted"),
    pytest.param({"headers": {"X-Forwarded-Host": "api.example.com"}},
                 {"USE_X_FORWARDED_HOST": True},
                 "http://api.example.com/echo?q=a%20b&x=%E2%9C%93", id="x-forwarded-host"),
    pytest.param({"HTTP_HOST": "localhost:8000"}, {},
                 "http://localhost:8000/echo?q=a%20b&x=%E2%9C%93", id="host-with-port"),
])
def test_uri_is_scheme_host_and_full_path(pipeline: Pipeline, request_kwargs: dict[str, Any],
                                          django_settings: dict[str, Any], uri: str) -> None:
    pipeline.configure(**django_settings)
    response = pipeline.send("get", "/echo?q=a%20b&x=%E2%9C%93", **request_kwargs)
    assert response.status_code == 200
    assert pipeline.deliver_one()["request"]["uri"] == uri


@pytest.mark.parametrize(("path", "status"), [("/echo", 200), ("/host", 400)])
def test_a_host_not_in_allowed_hosts_never_raises_from_the_middleware(
        pipeline: Pipeline, path: str, status: int) -> None:
    """The reference's get_host() raised DisallowedHost out of the middleware (W22). The
    application's own answer stays whatever Django gives: 200 for a view that does not look at
    the host, 400 for one that does."""
    captured = pipeline.send("get", path, HTTP_HOST="evil.example")
    plain = pipeline.send("get", path, HTTP_HOST="evil.example", middleware=[])
    assert captured.status_code == plain.status_code == status
    assert answer(captured) == answer(plain)
    event = pipeline.deliver_one()
    assert event["request"]["uri"] == f"http://evil.example{path}"
    assert event["response"]["status"] == status


@pytest.mark.parametrize(("path", "status"), [
    ("/status/201", 201), ("/status/302", 302), ("/status/404", 404), ("/status/503", 503),
    ("/crash", 500), ("/no-such-route", 404)])
def test_status_is_what_the_client_got(pipeline: Pipeline, path: str, status: int) -> None:
    response = pipeline.send("get", path)
    assert response.status_code == status
    event = pipeline.deliver_one()
    assert event["response"]["status"] == status
    assert event["response"]["headers"][TRANSACTION_HEADER] == response[TRANSACTION_HEADER]


# --- §2.2 bodies -------------------------------------------------------------------------------

GZIPPED_REQUEST = gzip.compress(b'{"zipped": "request"}')


@pytest.mark.parametrize(("body", "content_type", "headers", "expected", "encoding"), [
    pytest.param(b'{"a": 1, "b": {"c": [1, 2]}}', "application/json", {},
                 {"a": 1, "b": {"c": [1, 2]}}, "json", id="json-object"),
    pytest.param(b'[1, {"b": 2}, "three"]', "application/json", {}, [1, {"b": 2}, "three"],
                 "json", id="json-array"),
    pytest.param('{"name": "Zoë ✓"}'.encode(), "application/json", {}, {"name": "Zoë ✓"},
                 "json", id="json-utf8"),
    pytest.param(b'{"a": 1}', "text/plain", {}, {"a": 1}, "json",
                 id="json-detected-by-content-not-type"),
    pytest.param(b' {"a": 1}', "application/json", {}, b64(b' {"a": 1}'), "base64",
                 id="json-after-whitespace-is-base64"),
    pytest.param(b'{"a": 1', "application/json", {}, b64(b'{"a": 1'), "base64",
                 id="broken-json-is-base64"),
    pytest.param(b'{"a": NaN}', "application/json", {}, b64(b'{"a": NaN}'), "base64",
                 id="nan-is-not-json"),
    pytest.param(b"plain text", "text/plain", {}, b64(b"plain text"), "base64", id="text"),
    pytest.param(bytes(range(256)), "application/octet-stream", {}, b64(bytes(range(256))),
                 "base64", id="binary"),
    pytest.param(b"a=1&b=2", "application/x-www-form-urlencoded", {}, b64(b"a=1&b=2"),
                 "base64", id="form"),
    pytest.param(GZIPPED_REQUEST, "application/json", {"Content-Encoding": "gzip"},
                 b64(b'{"zipped": "request"}'), "base64", id="gzip-decompressed"),
    pytest.param(GZIPPED_REQUEST, "application/json", {"Content-Encoding": "GZIP"},
                 b64(b'{"zipped": "request"}'), "base64", id="gzip-case-insensitive"),
    pytest.param(b"not gzip at all", "text/plain", {"Content-Encoding": "gzip"},
                 b64(b"not gzip at all"), "base64", id="bad-gzip-is-raw-base64"),
    pytest.param(b"", "application/json", {}, None, None, id="empty"),
])
def test_request_body_rules(pipeline: Pipeline, body: bytes, content_type: str,
                            headers: dict[str, str], expected: Any, encoding: str | None) -> None:
    response = pipeline.send("post", "/echo", data=body, content_type=content_type,
                             headers=headers)
    assert response.status_code == 200 and response.content == body  # the view read it all
    request = pipeline.deliver_one()["request"]
    assert (request["body"], request["transfer_encoding"]) == (expected, encoding)


def test_multipart_form_is_captured_whole_as_base64(pipeline: Pipeline) -> None:
    response = pipeline.send("post", "/describe", data={"field": "value"})
    assert response.status_code == 200
    request = pipeline.deliver_one()["request"]
    assert request["transfer_encoding"] == "base64"
    raw = base64.b64decode(request["body"])
    assert b'name="field"' in raw and b"value" in raw
    assert len(raw) == response.json()["body_length"]


@pytest.mark.parametrize(("path", "expected", "encoding"), [
    ("/json-object", compat_app.JSON_OBJECT, "json"),
    ("/json-array", compat_app.JSON_ARRAY, "json"),
    ("/text", b64(compat_app.TEXT.encode()), "base64"),
    ("/json-after-whitespace", b64(b' {"a": 1}'), "base64"),
    ("/binary", b64(compat_app.BINARY), "base64"),
    ("/gzipped", b64(compat_app.GZIPPED_JSON), "base64"),
    ("/empty", None, None),
    ("/stream", None, None),
    ("/file", None, None),
])
def test_response_body_rules(pipeline: Pipeline, path: str, expected: Any,
                             encoding: str | None) -> None:
    response = pipeline.send("get", path)
    plain = pipeline.send("get", path, middleware=[])
    assert answer(response) == answer(plain)  # streams and files reach the client whole
    event = pipeline.deliver_one()
    assert (event["response"]["body"], event["response"]["transfer_encoding"]) == (expected,
                                                                                   encoding)
    assert event["response"]["headers"]["Content-Type"] == response["Content-Type"]


def test_streaming_and_file_responses_reach_the_client_intact(pipeline: Pipeline) -> None:
    streamed = pipeline.send("get", "/stream")
    served = pipeline.send("get", "/file")
    assert response_body(streamed) == b"".join(compat_app.STREAM_CHUNKS)
    assert response_body(served) == compat_app.FILE_PATH.read_bytes()
    events = pipeline.deliver().events
    assert [event["response"]["body"] for event in events] == [None, None]
    assert [event["response"]["status"] for event in events] == [200, 200]


def test_head_response_has_no_captured_body(pipeline: Pipeline) -> None:
    """No body goes out for HEAD, so none is reported (the reference captured it, W22)."""
    response = pipeline.send("head", "/json-object")
    assert response.status_code == 200 and response.content == b""
    event = pipeline.deliver_one()
    assert (event["response"]["body"], event["response"]["transfer_encoding"]) == (None, None)


@pytest.mark.parametrize(("max_body_size", "size", "captured"), [
    pytest.param(None, 100_000, True, id="default-limit-kept"),
    pytest.param(None, 100_001, False, id="default-limit-exceeded"),
    pytest.param(1_000, 1_000, True, id="custom-limit-kept"),
    pytest.param(1_000, 1_001, False, id="custom-limit-exceeded"),
])
def test_bodies_over_max_body_size_are_replaced_by_a_marker(
        pipeline: Pipeline, max_body_size: int | None, size: int, captured: bool) -> None:
    if max_body_size is not None:
        pipeline.configure({"MAX_BODY_SIZE": max_body_size})
    upload = pipeline.send("post", "/upload", data=b"u" * size,
                           content_type="application/octet-stream")
    download = pipeline.send("get", f"/large?size={size}")
    assert upload.content == str(size).encode()  # the view read the whole upload itself
    assert download.content == b"L" * size
    request_event, response_event = pipeline.deliver().events
    sides = (request_event["request"], response_event["response"])
    for side, content in zip(sides, (b"u" * size, b"L" * size), strict=True):
        if captured:
            assert (side["body"], side["transfer_encoding"]) == (b64(content), "base64")
        else:
            assert side["transfer_encoding"] == "json"
            assert list(side["body"]) == ["msg"]
            assert str(size) in side["body"]["msg"] and "MAX_BODY_SIZE" in side["body"]["msg"]


def test_gzip_body_inflating_past_max_body_size_is_replaced_by_a_marker(
        pipeline: Pipeline) -> None:
    pipeline.configure({"MAX_BODY_SIZE": 1_000})
    bomb = gzip.compress(b"0" * 50_000)
    assert len(bomb) < 1_000
    response = pipeline.send("post", "/echo", data=bomb, content_type="application/json",
                             headers={"Content-Encoding": "gzip"})
    assert response.content == bomb
    request = pipeline.deliver_one()["request"]
    assert request["transfer_encoding"] == "json"
    assert "MAX_BODY_SIZE" in request["body"]["msg"]


# --- §2.2 body masks, §2.9 LOG_BODY ----------------------------------------------------------

MASKED_REQUEST = (b'[{"password": "p", "Password": "kept", "keep": 1},'
                  b' {"inner": {"password": "q", "list": [{"password": "r", "x": 2}]}}]')


@pytest.mark.parametrize(("masks", "expected"), [
    pytest.param(None, json.loads(MASKED_REQUEST), id="default-none"),
    pytest.param([], json.loads(MASKED_REQUEST), id="empty-list"),
    pytest.param(["password"], [{"Password": "kept", "keep": 1},
                                {"inner": {"list": [{"x": 2}]}}], id="recursive-case-sensitive"),
    pytest.param(["password", "inner"], [{"Password": "kept", "keep": 1}, {}], id="two-keys"),
])
def test_request_body_masks(pipeline: Pipeline, masks: list[str] | None, expected: Any) -> None:
    pipeline.configure({"REQUEST_BODY_MASKS": masks})
    response = pipeline.send("post", "/echo", data=MASKED_REQUEST,
                             content_type="application/json")
    assert response.content == MASKED_REQUEST  # the application sees the unmasked body
    event = pipeline.deliver_one()
    assert event["request"]["body"] == expected
    assert event["response"]["body"] == json.loads(MASKED_REQUEST)  # only the request masked


@pytest.mark.parametrize(("masks", "expected"), [
    pytest.param(None, compat_app.JSON_OBJECT, id="default-none"),
    pytest.param(["password", "secret"], {"ok": True, "nested": {"keep": 2}}, id="masked"),
    pytest.param(["PASSWORD"], compat_app.JSON_OBJECT, id="case-sensitive"),
])
def test_response_body_masks(pipeline: Pipeline, masks: list[str] | None, expected: Any) -> None:
    pipeline.configure({"RESPONSE_BODY_MASKS": masks})
    response = pipeline.send("get", "/json-object")
    assert response.json() == compat_app.JSON_OBJECT
    assert pipeline.deliver_one()["response"]["body"] == expected


def test_body_masks_never_touch_base64_bodies(pipeline: Pipeline) -> None:
    pipeline.configure({"REQUEST_BODY_MASKS": ["password"], "RESPONSE_BODY_MASKS": ["password"]})
    pipeline.send("post", "/echo", data=b"password=hunter2", content_type="text/plain")
    event = pipeline.deliver_one()
    assert event["request"]["body"] == event["response"]["body"] == b64(b"password=hunter2")


@pytest.mark.parametrize("middleware", [NEW_STYLE, PRE19])
def test_log_body_false_sends_no_bodies_and_the_view_still_reads_them(
        pipeline: Pipeline, middleware: str) -> None:
    pipeline.configure({"LOG_BODY": False}, middleware=[middleware])
    response = pipeline.send("post", "/echo", data=b'{"a": 1}', content_type="application/json")
    assert response.content == b'{"a": 1}'
    event = pipeline.deliver_one()
    for side in (event["request"], event["response"]):
        assert (side["body"], side["transfer_encoding"]) == (None, None)
    assert event["request"]["headers"]["CONTENT-LENGTH"] == "8"


# --- §2.3 headers and masks, key case ---------------------------------------------------------


def test_header_names_without_masks_keep_the_reference_case(pipeline: Pipeline) -> None:
    response = pipeline.send("get", "/cookie", headers={"x-lower-case": "1", "X-Mixed_Case": "2"})
    event = pipeline.deliver_one()
    assert event["request"]["headers"] == {
        "COOKIE": "", "X-LOWER-CASE": "1", "X-MIXED-CASE": "2",
        EVENT_TRANSACTION_KEY: response[TRANSACTION_HEADER]}
    assert event["response"]["headers"] == {
        "Content-Type": "text/plain", "X-Custom": "custom-value",
        "X-Secret-Header": "response-secret", TRANSACTION_HEADER: response[TRANSACTION_HEADER]}


@pytest.mark.parametrize(("request_masks", "response_masks", "request_headers",
                          "response_headers"), [
    pytest.param([], None, {"cookie": "", "x-secret": "s", "x-keep": "k"},
                 {"Content-Type": "text/plain", "X-Custom": "custom-value",
                  "X-Secret-Header": "response-secret"}, id="empty-request-list-lowercases"),
    pytest.param(["X-SECRET"], None, {"cookie": "", "x-keep": "k"},
                 {"Content-Type": "text/plain", "X-Custom": "custom-value",
                  "X-Secret-Header": "response-secret"}, id="request-mask-case-insensitive"),
    pytest.param(None, ["x-secret-header"], {"COOKIE": "", "X-SECRET": "s", "X-KEEP": "k"},
                 {"content-type": "text/plain", "x-custom": "custom-value"},
                 id="response-mask"),
    pytest.param(None, [], {"COOKIE": "", "X-SECRET": "s", "X-KEEP": "k"},
                 {"content-type": "text/plain", "x-custom": "custom-value",
                  "x-secret-header": "response-secret"}, id="empty-response-list-lowercases"),
])
def test_header_masks_remove_names_and_lowercase_keys(
        pipeline: Pipeline, request_masks: list[str] | None, response_masks: list[str] | None,
        request_headers: dict[str, str], response_headers: dict[str, str]) -> None:
    pipeline.configure({"REQUEST_HEADER_MASKS": request_masks,
                        "RESPONSE_HEADER_MASKS": response_masks})
    response = pipeline.send("get", "/cookie", headers={"X-Secret": "s", "X-Keep": "k"})
    assert response["X-Secret-Header"] == "response-secret"  # the client still gets it
    transaction_id = response[TRANSACTION_HEADER]
    event = pipeline.deliver_one()
    assert event["request"]["headers"] == {**request_headers,
                                           EVENT_TRANSACTION_KEY: transaction_id}
    assert event["response"]["headers"] == {**response_headers,
                                            TRANSACTION_HEADER: transaction_id}


def test_set_cookie_and_headers_added_outside_moesif_are_not_captured(
        pipeline: Pipeline) -> None:
    pipeline.configure(middleware=[OUTER_HEADER, NEW_STYLE])
    response = pipeline.send("get", "/cookie")
    assert response.cookies["flavour"].value == "oatmeal"
    assert response["X-Added-Outside"] == "outer"
    headers = pipeline.deliver_one()["response"]["headers"]
    assert header(headers, "Set-Cookie") is None
    assert header(headers, "X-Added-Outside") is None


def test_non_string_header_values_from_other_middleware_are_flattened(
        pipeline: Pipeline) -> None:
    pipeline.configure(middleware=[ANNOTATE_META, NEW_STYLE])
    response = pipeline.send("get", "/json-object")
    assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    headers = pipeline.deliver_one()["request"]["headers"]
    assert (headers["X-TENANT-ID"], headers["X-EMPTY"]) == ("42", "")


def test_masked_content_encoding_leaves_a_gzip_body_compressed(pipeline: Pipeline) -> None:
    """Gzip detection reads the masked headers, as in the reference (§2.2)."""
    pipeline.configure({"REQUEST_HEADER_MASKS": ["Content-Encoding"]})
    pipeline.send("post", "/echo", data=GZIPPED_REQUEST, content_type="application/json",
                  headers={"Content-Encoding": "gzip"})
    request = pipeline.deliver_one()["request"]
    assert header(request["headers"], "content-encoding") is None
    assert (request["body"], request["transfer_encoding"]) == (b64(GZIPPED_REQUEST), "base64")


# --- §2.4 client IP ----------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "remote_addr", "expected"), [
    pytest.param({}, None, CLIENT_ADDRESS, id="remote-addr"),
    pytest.param({}, "10.1.2.3", "10.1.2.3", id="custom-remote-addr"),
    pytest.param({"X-Client-IP": "198.51.100.1", "X-Forwarded-For": "203.0.113.9"}, None,
                 "198.51.100.1", id="x-client-ip-first"),
    pytest.param({"X-Client-IP": "not-an-ip", "X-Forwarded-For": "203.0.113.9"}, None,
                 "203.0.113.9", id="invalid-x-client-ip-skipped"),
    pytest.param({"X-Forwarded-For": "unknown, 203.0.113.9:8080, 10.0.0.1"}, None,
                 "203.0.113.9", id="xff-leftmost-valid-with-port"),
    pytest.param({"X-Forwarded-For": "2001:db8::1, 10.0.0.1"}, None, "2001:db8::1",
                 id="xff-ipv6"),
    pytest.param({"X-Forwarded-For": "[2001:db8::1]:443"}, None, CLIENT_ADDRESS,
                 id="xff-bracketed-ipv6-port-not-handled"),
    pytest.param({"X-Forwarded-For": "abcd", "X-Real-IP": "192.0.2.7"}, None, "192.0.2.7",
                 id="xff-abcd-falls-through-W9"),
    pytest.param({"X-Forwarded-For": "abcd"}, None, CLIENT_ADDRESS,
                 id="xff-abcd-falls-back-to-remote-addr-W9"),
    pytest.param({"X-Forwarded-For": "203.0.113.9", "CF-Connecting-IP": "192.0.2.3"}, None,
                 "203.0.113.9", id="xff-before-cf"),
    pytest.param({"CF-Connecting-IP": "192.0.2.3", "True-Client-IP": "192.0.2.4"}, None,
                 "192.0.2.3", id="cf-before-true-client"),
    pytest.param({"True-Client-IP": "192.0.2.4", "X-Real-IP": "192.0.2.5"}, None,
                 "192.0.2.4", id="true-client-before-x-real"),
    pytest.param({"X-Real-IP": "192.0.2.5", "X-Cluster-Client-IP": "192.0.2.6"}, None,
                 "192.0.2.5", id="x-real-before-cluster"),
    pytest.param({"X-Cluster-Client-IP": "192.0.2.6", "X-Forwarded": "192.0.2.8"}, None,
                 "192.0.2.6", id="cluster-before-x-forwarded"),
    pytest.param({"X-Forwarded": "192.0.2.8", "Forwarded-For": "192.0.2.9"}, None,
                 "192.0.2.8", id="x-forwarded-before-forwarded-for"),
    pytest.param({"Forwarded-For": "192.0.2.9", "Forwarded": "192.0.2.10"}, None,
                 "192.0.2.9", id="forwarded-for-before-forwarded"),
    pytest.param({"Forwarded": "192.0.2.10"}, None, "192.0.2.10", id="forwarded-literal"),
    pytest.param({"Forwarded": "for=192.0.2.60;proto=http"}, None, CLIENT_ADDRESS,
                 id="forwarded-rfc7239-never-qualifies"),
    pytest.param({"X-Real-IP": "::1"}, None, "::1", id="ipv6-literal"),
])
def test_client_ip_rules(pipeline: Pipeline, headers: dict[str, str], remote_addr: str | None,
                         expected: str) -> None:
    extra = {"REMOTE_ADDR": remote_addr} if remote_addr else {}
    response = pipeline.send("get", "/json-object", headers=headers, **extra)
    assert response.status_code == 200
    assert pipeline.deliver_one()["request"]["ip_address"] == expected


def test_unusable_forwarded_for_never_drops_the_batch_W9(pipeline: Pipeline) -> None:
    """A client's `X-Forwarded-For: abcd` made the reference drop the whole batch."""
    for case, forwarded_for in (("first", "203.0.113.1"), ("bad", "abcd"),
                                ("last", "203.0.113.3")):
        response = pipeline.send("get", f"/json-object?{case}",
                                 headers={"X-Forwarded-For": forwarded_for})
        assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    delivery = pipeline.deliver()
    events = by_query(delivery.events)
    assert {case: event["request"]["ip_address"] for case, event in events.items()} == {
        "first": "203.0.113.1", "bad": CLIENT_ADDRESS, "last": "203.0.113.3"}
    assert [batch["event_count"] for batch in pipeline.collector.batches()] == [3]
    assert delivery.counters.refused == 0


# --- §2.6 user id ------------------------------------------------------------------------------

BASIC = "Basic " + b64(b"alice:s3cret")


@dataclass(frozen=True)
class UserCase:
    headers: dict[str, str]
    expected: Any
    options: dict[str, Any] | None = None
    middleware: tuple[str, ...] = (NEW_STYLE,)


ANONYMOUS_STACK = (SESSIONS, AUTHENTICATION, NEW_STYLE)
LOGIN_STACK = (LOGIN, NEW_STYLE)
USER_CASES = {
    "jwt-standard-alphabet": UserCase({"Authorization": f"Bearer {jwt({'sub': 'user-1'})}"},
                                      "user-1"),
    "jwt-url-safe-payload-W12": UserCase(
        {"Authorization": f"Bearer {url_safe_jwt('url-safe-user')}"}, "url-safe-user"),
    "jwt-lowercase-bearer-W12": UserCase({"Authorization": f"bearer {jwt({'sub': 'low'})}"},
                                         "low"),
    "jwt-number-field": UserCase({"Authorization": f"Bearer {jwt({'sub': 7})}"}, "7"),
    "jwt-first-of-comma-list": UserCase(
        {"Authorization": f"Bearer {jwt({'sub': 'first'})}, Basic {b64(b'x:y')}"}, "first"),
    "jwt-custom-field-case-insensitive": UserCase(
        {"Authorization": f"Bearer {jwt({'sub': 'no', 'Email': 'a@b.example'})}"},
        "a@b.example", {"AUTHORIZATION_USER_ID_FIELD": "email"}),
    "jwt-field-missing": UserCase({"Authorization": f"Bearer {jwt({'uid': 'u'})}"}, None),
    "opaque-bearer": UserCase({"Authorization": "Bearer opaque-token"}, None),
    "basic": UserCase({"Authorization": BASIC}, "alice"),
    "basic-lowercase-W12": UserCase({"Authorization": BASIC.lower()[:6] + BASIC[6:]}, "alice"),
    "custom-scheme-jwt": UserCase({"Authorization": f"Token {jwt({'sub': 'tok'})}"}, "tok"),
    "no-authorization": UserCase({}, None),
    "custom-header-list-first-present-wins": UserCase(
        {"X-Api-Token": jwt({"sub": "from-api-token"}),
         "Authorization": f"Bearer {jwt({'sub': 'from-authorization'})}"},
        "from-api-token", {"AUTHORIZATION_HEADER_NAME": "X-Api-Token, Authorization"}),
    "custom-header-list-falls-to-next": UserCase(
        {"Authorization": f"Bearer {jwt({'sub': 'from-authorization'})}"},
        "from-authorization", {"AUTHORIZATION_HEADER_NAME": "X-Api-Token, Authorization"}),
    "custom-header-replaces-authorization": UserCase(
        {"Authorization": f"Bearer {jwt({'sub': 'ignored'})}"}, None,
        {"AUTHORIZATION_HEADER_NAME": "X-User-Token"}),
    "masked-authorization-still-identifies-W12": UserCase(
        {"Authorization": f"Bearer {jwt({'sub': 'masked'})}"}, "masked",
        {"REQUEST_HEADER_MASKS": ["Authorization"]}),
    "missing-auth-middleware-W12": UserCase({"Authorization": BASIC}, "alice"),
    "anonymous-user-falls-through-to-header": UserCase(
        {"Authorization": BASIC}, "alice", middleware=ANONYMOUS_STACK),
    "request-user-before-header": UserCase(
        {compat_app.LOGIN_HEADER: "logged-in", "Authorization": BASIC}, "logged-in",
        middleware=LOGIN_STACK),
    "request-user-with-username-attribute-only": UserCase(
        {compat_app.LOGIN_WITHOUT_GET_USERNAME_HEADER: "legacy-user"}, "legacy-user",
        middleware=LOGIN_STACK),
    "identify-user-first": UserCase(
        {compat_app.LOGIN_HEADER: "logged-in", "Authorization": BASIC}, "from-callback",
        {"IDENTIFY_USER": lambda request, response: "from-callback"}, LOGIN_STACK),
    "identify-user-int-stays-a-number": UserCase(
        {}, 42, {"IDENTIFY_USER": lambda request, response: 42}),
    "identify-user-empty-falls-through": UserCase(
        {compat_app.LOGIN_HEADER: "logged-in"}, "logged-in",
        {"IDENTIFY_USER": lambda request, response: ""}, LOGIN_STACK),
    "identify-user-raising-falls-through": UserCase(
        {"Authorization": BASIC}, "alice", {"IDENTIFY_USER": lambda request, response: 1 / 0}),
}


@pytest.mark.parametrize("case", USER_CASES.values(), ids=USER_CASES.keys())
def test_user_id_rules(pipeline: Pipeline, case: UserCase) -> None:
    pipeline.configure(case.options, list(case.middleware), **SESSION_SETTINGS)
    response = pipeline.send("get", "/json-object", headers=case.headers)
    assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    event = pipeline.deliver_one()
    assert event["user_id"] == case.expected
    if case.options and "REQUEST_HEADER_MASKS" in case.options:
        assert header(event["request"]["headers"], "authorization") is None


# --- §2.7 transaction id -------------------------------------------------------------------


def test_client_transaction_id_is_kept(pipeline: Pipeline) -> None:
    response = pipeline.send("get", "/json-object",
                             headers={"X-Moesif-Transaction-Id": "client-tx-1"})
    assert response[TRANSACTION_HEADER] == "client-tx-1"
    event = pipeline.deliver_one()
    assert event["request"]["headers"][EVENT_TRANSACTION_KEY] == "client-tx-1"
    assert event["response"]["headers"][TRANSACTION_HEADER] == "client-tx-1"
    assert event["transaction_id"] == "client-tx-1"


@pytest.mark.parametrize(("client_id", "kept"), [
    pytest.param("", False, id="empty-replaced"),
    pytest.param("t" * 200, True, id="200-characters-kept"),
    pytest.param("t" * 201, False, id="longer-replaced"),
])
def test_client_transaction_id_length(pipeline: Pipeline, client_id: str, kept: bool) -> None:
    response = pipeline.send("get", "/json-object",
                             headers={"X-Moesif-Transaction-Id": client_id})
    transaction_id = response[TRANSACTION_HEADER]
    if kept:
        assert transaction_id == client_id
    else:
        assert uuid.UUID(transaction_id).version == 4
    event = pipeline.deliver_one()
    assert event["request"]["headers"][EVENT_TRANSACTION_KEY] == transaction_id
    assert event["transaction_id"] == transaction_id


def test_client_transaction_id_is_kept_when_header_masks_are_set_W13(
        pipeline: Pipeline) -> None:
    """With a mask list the reference ignored the client's id and put two ids in the event."""
    pipeline.configure({"REQUEST_HEADER_MASKS": ["x-secret"]})
    response = pipeline.send("get", "/json-object", headers={
        "X-Moesif-Transaction-Id": "client-tx-2", "X-Secret": "s"})
    assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    assert response[TRANSACTION_HEADER] == "client-tx-2"
    event = pipeline.deliver_one()
    request_headers = event["request"]["headers"]
    assert "x-secret" not in request_headers
    assert request_headers[EVENT_TRANSACTION_KEY] == "client-tx-2"
    assert {value for key, value in request_headers.items()
            if key.lower() == TRANSACTION_HEADER} == {"client-tx-2"}
    assert event["response"]["headers"][TRANSACTION_HEADER] == "client-tx-2"
    assert event["transaction_id"] == "client-tx-2"


def test_each_request_gets_its_own_transaction_id(pipeline: Pipeline) -> None:
    ids = [pipeline.send("get", f"/json-object?{n}")[TRANSACTION_HEADER] for n in range(3)]
    assert len(set(ids)) == 3
    events = by_query(pipeline.deliver().events)
    assert [events[str(n)]["transaction_id"] for n in range(3)] == ids


@pytest.mark.parametrize("options", [{"DISABLE_TRANSACTION_ID": True},
                                     {"DISABLE_TRANSACTION_ID": True,
                                      "REQUEST_HEADER_MASKS": []}])
def test_disable_transaction_id_adds_no_header(pipeline: Pipeline,
                                               options: dict[str, Any]) -> None:
    pipeline.configure(options)
    response = pipeline.send("get", "/json-object")
    plain = pipeline.send("get", "/json-object", middleware=[])
    assert TRANSACTION_HEADER not in response
    assert answer(response) == answer(plain)
    event = pipeline.deliver_one()
    assert header(event["request"]["headers"], TRANSACTION_HEADER) is None
    assert header(event["response"]["headers"], TRANSACTION_HEADER) is None
    assert uuid.UUID(event["transaction_id"])  # the field is still there, a fresh id


def test_misspelt_disabled_transaction_id_is_not_an_option(pipeline: Pipeline) -> None:
    """The reference reads DISABLE_TRANSACTION_ID only; DISABLED_... is ignored (§2.7)."""
    pipeline.configure({"DISABLED_TRANSACTION_ID": True})
    response = pipeline.send("get", "/json-object")
    event = pipeline.deliver_one()
    assert event["transaction_id"] == response[TRANSACTION_HEADER]


# --- §2.8 session token ------------------------------------------------------------------------


def test_django_session_key_is_the_session_token_before_the_callback(
        pipeline: Pipeline) -> None:
    pipeline.configure({"GET_SESSION_TOKEN": lambda request, response: "from-callback"},
                       [SESSIONS, NEW_STYLE], **SESSION_SETTINGS)
    started = pipeline.send("get", "/session")
    session_key = started.content.decode()
    assert started.cookies["sessionid"].value == session_key
    pipeline.send("get", "/json-object?again", headers={"Cookie": f"sessionid={session_key}"})
    pipeline.send("get", "/json-object?none")
    events = by_query(pipeline.deliver().events)
    assert events[""]["session_token"] == session_key
    assert events["again"]["session_token"] == session_key
    assert events["none"]["session_token"] == "from-callback"  # an empty session has no key


@pytest.mark.parametrize(("middleware", "options", "expected"), [
    pytest.param([SESSIONS, NEW_STYLE], {}, None, id="default-none"),
    pytest.param([NEW_STYLE], {"GET_SESSION_TOKEN": lambda request, response: "tok"}, "tok",
                 id="no-session-middleware-still-calls-back-W12"),
    pytest.param([NEW_STYLE], {"GET_SESSION_TOKEN": lambda request, response: 1 / 0}, None,
                 id="raising-callback"),
])
def test_session_token_without_a_django_session(pipeline: Pipeline, middleware: list[str],
                                                options: dict[str, Any],
                                                expected: str | None) -> None:
    pipeline.configure(options, middleware, **SESSION_SETTINGS)
    assert pipeline.send("get", "/json-object").status_code == 200
    assert pipeline.deliver_one()["session_token"] == expected


# --- §2.9, §2.10: SKIP, IDENTIFY_COMPANY, GET_METADATA, API_VERSION ----------------------------


@pytest.mark.parametrize(("skip", "captured_queries"), [
    pytest.param(None, {"a", "b"}, id="default-none"),
    pytest.param(lambda request, response: False, {"a", "b"}, id="false"),
    pytest.param(lambda request, response: request.GET.get("skip") == "1", {"a"},
                 id="by-request"),
    pytest.param(lambda request, response: response.status_code == 404, {"a"},
                 id="by-response"),
    pytest.param(lambda request, response: 1 / 0, {"a", "b"}, id="raising-captures"),
])
def test_skip(pipeline: Pipeline, skip: Callable[..., Any] | None,
              captured_queries: set[str]) -> None:
    pipeline.configure({"SKIP": skip})
    kept = pipeline.send("get", "/json-object?a")
    maybe_skipped = pipeline.send("get", "/status/404?b&skip=1")
    plain = pipeline.send("get", "/status/404?b&skip=1", middleware=[])
    assert answer(maybe_skipped) == answer(plain)
    assert (TRANSACTION_HEADER in maybe_skipped) == ("b" in captured_queries)
    events = pipeline.deliver().events
    queries = {event["request"]["uri"].partition("?")[2].partition("&")[0] for event in events}
    assert queries == captured_queries
    assert TRANSACTION_HEADER in kept


def test_callbacks_receive_the_django_request_and_response(pipeline: Pipeline) -> None:
    seen: list[tuple[str, str, int]] = []

    def remember(name: str, value: Any) -> Callable[..., Any]:
        def callback(request: Any, response: Any) -> Any:
            seen.append((name, request.path, response.status_code))
            return value
        return callback

    pipeline.configure({"SKIP": remember("SKIP", False),
                        "IDENTIFY_USER": remember("IDENTIFY_USER", "u-1"),
                        "IDENTIFY_COMPANY": remember("IDENTIFY_COMPANY", "acme"),
                        "GET_SESSION_TOKEN": remember("GET_SESSION_TOKEN", "s-1"),
                        "GET_METADATA": remember("GET_METADATA", {"plan": "gold", "seats": 3})})
    pipeline.send("get", "/status/201")
    assert sorted(seen) == sorted((name, "/status/201", 201) for name in (
        "SKIP", "IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_SESSION_TOKEN", "GET_METADATA"))
    event = pipeline.deliver_one()
    assert (event["user_id"], event["company_id"], event["session_token"],
            event["metadata"]) == ("u-1", "acme", "s-1", {"plan": "gold", "seats": 3})


@pytest.mark.parametrize(("options", "company_id", "metadata"), [
    pytest.param({}, None, None, id="defaults-none"),
    pytest.param({"IDENTIFY_COMPANY": lambda request, response: 12,
                  "GET_METADATA": lambda request, response: ["a", {"b": None}]},
                 12, ["a", {"b": None}], id="values-as-returned"),
    pytest.param({"IDENTIFY_COMPANY": lambda request, response: 1 / 0,
                  "GET_METADATA": lambda request, response: {}["missing"]},
                 None, None, id="raising-gives-null"),
])
def test_identify_company_and_metadata(pipeline: Pipeline, options: dict[str, Any],
                                       company_id: Any, metadata: Any) -> None:
    pipeline.configure(options)
    response = pipeline.send("get", "/json-object")
    assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    event = pipeline.deliver_one()
    assert (event["company_id"], event["metadata"]) == (company_id, metadata)


@pytest.mark.parametrize(("api_version", "expected"), [(None, None), ("1.2.3", "1.2.3")])
def test_api_version(pipeline: Pipeline, api_version: str | None,
                     expected: str | None) -> None:
    pipeline.configure({"API_VERSION": api_version})
    pipeline.send("get", "/json-object")
    assert pipeline.deliver_one()["request"]["api_version"] == expected


# --- W9: values JSON cannot carry --------------------------------------------------------------

MOMENT = datetime.datetime(2026, 11, 24, 9, 0, tzinfo=datetime.UTC)


def test_callback_values_json_cannot_carry_are_made_safe_for_that_event_only_W9(
        pipeline: Pipeline) -> None:
    def metadata(request: Any, response: Any) -> Any:
        if "bad" in request.GET:
            return {"when": MOMENT, "price": decimal.Decimal("1.50"), "raw": b"abc",
                    "ratio": math.nan, "tags": ("x",)}
        return {"plain": [1, 2.5, "three"]}

    pipeline.configure({"GET_METADATA": metadata,
                        "IDENTIFY_USER": lambda request, response: decimal.Decimal("7"),
                        "IDENTIFY_COMPANY": lambda request, response: math.inf})
    for case in ("first", "bad", "last"):
        assert pipeline.send("get", f"/json-object?{case}").status_code == 200
    delivery = pipeline.deliver()
    events = by_query(delivery.events)
    assert set(events) == {"first", "bad", "last"}
    assert [batch["event_count"] for batch in pipeline.collector.batches()] == [3]
    bad = events["bad"]["metadata"]
    assert datetime.datetime.fromisoformat(bad.pop("when")) == MOMENT
    assert bad == {"price": "1.50", "raw": "abc", "ratio": None, "tags": ["x"]}
    assert events["first"]["metadata"] == events["last"]["metadata"] == {
        "plain": [1, 2.5, "three"]}
    assert {event["user_id"] for event in events.values()} == {"7"}
    assert {event["company_id"] for event in events.values()} == {None}


@pytest.mark.parametrize("companion", [
    pytest.param({}, id="alone"),
    pytest.param({"when": MOMENT}, id="next-to-a-datetime"),
    pytest.param({"price": decimal.Decimal("2")}, id="next-to-a-decimal"),
])
def test_bytes_from_a_callback_arrive_the_same_whatever_else_the_value_holds(
        pipeline: Pipeline, companion: dict[str, Any]) -> None:
    pipeline.configure({"GET_METADATA": lambda request, response: {"raw": b"abc", **companion}})
    pipeline.send("get", "/json-object")
    assert pipeline.deliver_one()["metadata"]["raw"] == "abc"


def circular() -> dict[str, Any]:
    value: dict[str, Any] = {"name": "loop"}
    value["self"] = value
    return value


class Opaque:
    def __str__(self) -> str:
        return "opaque-object"


UNSAFE_VALUES: dict[str, tuple[Callable[[], Any], Callable[[Any], bool]]] = {
    "datetime": (lambda: MOMENT,
                 lambda sent: datetime.datetime.fromisoformat(sent) == MOMENT),
    "date": (lambda: datetime.date(2026, 11, 24), lambda sent: sent == "2026-11-24"),
    "decimal": (lambda: decimal.Decimal("1.50"), lambda sent: sent == "1.50"),
    "decimal-nan": (lambda: decimal.Decimal("NaN"), lambda sent: sent in (None, "NaN")),
    "bytes": (lambda: b"abc", lambda sent: sent == "abc"),
    "float-nan": (lambda: math.nan, lambda sent: sent is None),
    "infinity": (lambda: -math.inf, lambda sent: sent is None),
    "set": (lambda: {3, 1, 2}, lambda sent: sorted(sent) == [1, 2, 3]),
    "uuid": (lambda: uuid.UUID(int=7), lambda sent: sent == str(uuid.UUID(int=7))),
    "object": (Opaque, lambda sent: sent == "opaque-object"),
    "circular": (circular, lambda sent: sent["name"] == "loop" and isinstance(sent["self"],
                                                                               str)),
}


@pytest.mark.parametrize(("make_value", "arrived_safe"), UNSAFE_VALUES.values(),
                         ids=UNSAFE_VALUES.keys())
def test_each_callback_value_json_cannot_carry_arrives_made_safe_W9(
        pipeline: Pipeline, make_value: Callable[[], Any],
        arrived_safe: Callable[[Any], bool]) -> None:
    pipeline.configure({"GET_METADATA": lambda request, response: {"value": make_value()}})
    response = pipeline.send("get", "/json-object")
    assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    metadata = pipeline.deliver_one()["metadata"]
    assert arrived_safe(metadata["value"]), metadata


# --- §2.9 MASK_EVENT_MODEL ---------------------------------------------------------------------


def test_mask_event_model_gets_the_reference_attribute_names_and_its_changes_arrive(
        pipeline: Pipeline) -> None:
    seen: dict[str, Any] = {}

    def mask(event: Any) -> Any:
        for name in ("time", "uri", "verb", "headers", "api_version", "ip_address", "body",
                     "transfer_encoding"):
            seen[f"request.{name}"] = copy.deepcopy(getattr(event.request, name))
        for name in ("time", "status", "headers", "body", "ip_address", "transfer_encoding"):
            seen[f"response.{name}"] = copy.deepcopy(getattr(event.response, name))
        for name in EVENT_KEYS[2:]:
            seen[name] = copy.deepcopy(getattr(event, name))
        event.request.body = {"masked": True}
        del event.request.headers["X-SECRET"]
        event.response.headers["X-Masked"] = "yes"
        event.user_id = "masked-user"
        event.metadata = {"masked": 1}
        return event

    pipeline.configure({"MASK_EVENT_MODEL": mask, "API_VERSION": "v9"})
    response = pipeline.send("post", "/echo", data=b'{"card": "4111"}',
                             content_type="application/json", headers={"X-Secret": "s"})
    event = pipeline.deliver_one()
    assert seen["request.body"] == {"card": "4111"}
    assert seen["request.headers"]["X-SECRET"] == "s"
    assert seen["request.transfer_encoding"] == seen["response.transfer_encoding"] == "json"
    assert (seen["request.verb"], seen["request.api_version"], seen["request.ip_address"],
            seen["response.status"]) == ("POST", "v9", CLIENT_ADDRESS, 200)
    assert seen["transaction_id"] == response[TRANSACTION_HEADER]
    assert (seen["direction"], seen["weight"], seen["tags"]) == ("Incoming", 1, None)
    assert event["request"]["body"] == {"masked": True}
    assert "X-SECRET" not in event["request"]["headers"]
    assert event["response"]["headers"]["X-Masked"] == "yes"
    assert (event["user_id"], event["metadata"]) == ("masked-user", {"masked": 1})
    assert event["response"]["body"] == {"card": "4111"}


def test_mask_event_model_may_return_a_dict_of_the_event_shape(pipeline: Pipeline) -> None:
    def as_dict(event: Any) -> dict[str, Any]:
        return {"request": {name: getattr(event.request, name) for name in REQUEST_KEYS},
                "response": {name: getattr(event.response, name) for name in RESPONSE_KEYS},
                **{name: getattr(event, name) for name in EVENT_KEYS[2:]},
                "company_id": "from-dict"}

    pipeline.configure({"MASK_EVENT_MODEL": as_dict})
    pipeline.send("get", "/json-object")
    event = pipeline.deliver_one()
    assert event["company_id"] == "from-dict"
    assert event["response"]["body"] == compat_app.JSON_OBJECT


def raise_error(event: Any) -> Any:
    raise ValueError("mask bug")


def missing_response(event: Any) -> Any:
    del event.response
    return event


BAD_MASKS = {
    "raises": raise_error,
    "returns-none": lambda event: None,
    "returns-garbage": lambda event: "garbage",
    "returns-object-without-response": missing_response,
}


def test_a_record_the_shipper_cannot_read_is_counted_and_logged_and_the_rest_arrive(
        pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    pipeline.send("get", "/echo?before")
    older_version = b"C" + marshal.dumps(("Incoming", 0, 0, "GET", "http://h/x", (), None))
    assert sink._producers[pipeline.ring.path].append(older_version)
    pipeline.send("get", "/echo?after")
    with caplog.at_level(logging.WARNING, logger="moesif_fast.shipper"):
        delivery = pipeline.deliver()
    assert set(by_query(delivery.events)) == {"before", "after"}
    assert (delivery.counters.undecodable, delivery.counters.delivered) == (1, 2)
    assert [record.getMessage() for record in caplog.records] == [
        "moesif_fast shipper: a ring record could not be read (written by another version of "
        "moesif_fast, or damaged); it is dropped (1 so far)"]


@pytest.mark.parametrize("bad_mask", BAD_MASKS.values(), ids=BAD_MASKS.keys())
def test_mask_event_model_failure_drops_and_counts_only_that_event(
        pipeline: Pipeline, bad_mask: Callable[[Any], Any]) -> None:
    def mask(event: Any) -> Any:
        return bad_mask(event) if event.request.uri.endswith("?victim") else event

    pipeline.configure({"MASK_EVENT_MODEL": mask})
    for case in ("first", "victim", "last"):
        response = pipeline.send("post", f"/echo?{case}", data=b'{"secret": "unmasked"}',
                                 content_type="application/json")
        assert response.status_code == 200 and response.content == b'{"secret": "unmasked"}'
    delivery = pipeline.deliver()
    assert set(by_query(delivery.events)) == {"first", "last"}  # the unmasked one never leaks
    assert delivery.counters.masked_out == 1
    assert delivery.counters.delivered == 2 and delivery.counters.refused == 0
    assert [batch["event_count"] for batch in pipeline.collector.batches()] == [2]


BROKEN_SHAPES = {
    "header-value-not-a-string": lambda event: event.request.headers.update({"X-Count": 3}),
    "status-not-an-int": lambda event: setattr(event.response, "status", "200"),
    "uri-none": lambda event: setattr(event.request, "uri", None),
    "time-not-a-string": lambda event: setattr(event.request, "time", 1_700_000_000),
    "transaction-id-not-a-string": lambda event: setattr(event, "transaction_id", 5),
}


@pytest.mark.parametrize("breakage", BROKEN_SHAPES.values(), ids=BROKEN_SHAPES.keys())
def test_mask_event_model_breaking_the_event_shape_never_drops_the_batch_W9(
        pipeline: Pipeline, breakage: Callable[[Any], None]) -> None:
    """An event MASK_EVENT_MODEL returned in a shape the collector refuses must cost only that
    event (dropped and counted, or repaired), never the other events of its batch."""
    def mask(event: Any) -> Any:
        if event.request.uri.endswith("?victim"):
            breakage(event)
        return event

    pipeline.configure({"MASK_EVENT_MODEL": mask})
    for case in ("first", "victim", "last"):
        assert pipeline.send("get", f"/json-object?{case}").status_code == 200
    delivery = pipeline.deliver()
    assert {"first", "last"} <= set(by_query(delivery.events))
    assert delivery.counters.refused == 0
    for event in delivery.events:
        assert_event_shape(event)


# --- §3 BATCH_SIZE, EVENT_QUEUE_SIZE, BASE_URI, LOCAL_DEBUG, APPLICATION_ID --------------------


@pytest.mark.parametrize(("batch_size", "requests", "expected_batches"), [
    pytest.param(None, 1003, [3, 1000], id="default-1000"),
    pytest.param(25, 30, [5, 25], id="the-reference-default-when-set"),
    pytest.param(3, 7, [1, 3, 3], id="three"),
])
def test_batch_size_bounds_the_events_per_post(pipeline: Pipeline, batch_size: int | None,
                                               requests: int,
                                               expected_batches: list[int]) -> None:
    pipeline.configure({"BATCH_SIZE": batch_size})
    for number in range(requests):
        pipeline.send("get", f"/json-object?{number}")
    delivery = pipeline.deliver()
    assert len(delivery.events) == requests
    batches = pipeline.collector.batches()
    assert sorted(batch["event_count"] for batch in batches) == expected_batches
    assert all(batch["gzip"] and batch["path"] == "/v1/events/batch" for batch in batches)


def test_event_queue_size_default() -> None:
    options = moesif_settings.load({"APPLICATION_ID": APPLICATION_ID})
    assert options.EVENT_QUEUE_SIZE == 1_000_000
    geometry = ringfile.geometry(options, 2)
    assert geometry.max_records == 1_000_000  # per process, as moesifdjango's queue


def test_event_queue_size_bounds_the_queue_and_drops_without_touching_responses_W3(
        make_pipeline: Callable[..., Pipeline]) -> None:
    """The reference blocked requests on a full queue; here the excess is dropped and counted."""
    options = {"APPLICATION_ID": APPLICATION_ID, "EVENT_QUEUE_SIZE": 3}
    pipeline = make_pipeline(ringfile.geometry(moesif_settings.load(options), 2))
    pipeline.configure(options)
    answers = [answer(pipeline.send("get", f"/json-object?{n}")) for n in range(5)]
    plain = answer(pipeline.send("get", "/json-object", middleware=[]))
    assert answers == [plain] * 5
    held = pipeline.ring.geometry.max_records  # one lane: this process's
    stats = pipeline.ring.stats()
    assert (stats.appended, stats.dropped) == (held, 5 - held)
    assert len(pipeline.deliver().events) == held


@pytest.mark.parametrize(("event_queue_size", "producers"), [
    pytest.param(1_000, ringfile.FALLBACK_PRODUCERS, id="small-queue-fallback-ring"),
    pytest.param(None, ringfile.producers_for_workers(16), id="default-queue-16-workers"),
])
def test_bodies_up_to_max_body_size_fit_in_the_deployments_ring(
        make_pipeline: Callable[..., Pipeline], event_queue_size: int | None,
        producers: int) -> None:
    """The ring a deployment derives from its options must carry an event whose bodies are
    within MAX_BODY_SIZE: "a larger body is replaced by a clear marker and the event still
    arrives", so a smaller one must arrive too."""
    options = {"APPLICATION_ID": APPLICATION_ID, "EVENT_QUEUE_SIZE": event_queue_size}
    loaded = moesif_settings.load(options)
    pipeline = make_pipeline(ringfile.geometry(loaded, producers))
    pipeline.configure(options)
    size = loaded.MAX_BODY_SIZE
    response = pipeline.send("post", f"/large?size={size}", data=b"u" * size,
                             content_type="text/plain")
    assert response.content == b"L" * size
    oversize = sum(lane.dropped_oversize for lane in pipeline.ring.stats().lanes)
    assert oversize == 0, f"largest record {pipeline.ring.geometry.max_record} bytes"
    event = pipeline.deliver_one()
    assert event["request"]["body"] == b64(b"u" * size)
    assert event["response"]["body"] == b64(b"L" * size)


@pytest.mark.parametrize(("base_uri", "local_base_url", "expected"), [
    (None, None, "https://api.moesif.net"),
    ("https://proxy.example/moesif/", None, "https://proxy.example/moesif"),
    (None, "http://local.example:8085", "http://local.example:8085"),
    ("https://base.example", "http://local.example", "https://base.example"),
    ("", "http://local.example", "http://local.example"),
])
def test_base_uri_is_preferred_over_local_moesif_baseurl(
        base_uri: str | None, local_base_url: str | None, expected: str) -> None:
    options = moesif_settings.load({"APPLICATION_ID": APPLICATION_ID, "BASE_URI": base_uri,
                                    "LOCAL_MOESIF_BASEURL": local_base_url})
    assert options.base_uri == expected


@pytest.mark.parametrize("urls", [
    pytest.param(("BASE_URI", "LOCAL_MOESIF_BASEURL"), id="base-uri-wins"),
    pytest.param(("LOCAL_MOESIF_BASEURL", None), id="local-base-url-alone"),
])
def test_delivery_goes_to_the_resolved_base_uri(pipeline: Pipeline,
                                                urls: tuple[str, str | None]) -> None:
    live, dead = urls
    pipeline.options.pop("BASE_URI")
    pipeline.configure({live: pipeline.collector.url, **({dead: "http://127.0.0.1:9"}
                                                          if dead else {})})
    pipeline.send("get", "/json-object")
    assert pipeline.deliver_one()["request"]["uri"] == "http://testserver/json-object"


SECRETS = ("header-secret-4242", "query-secret-1717", "body-secret-9999", "cookie-secret-3131",
           "response-secret")


def send_secrets(pipeline: Pipeline) -> HttpResponseBase:
    return pipeline.send(
        "post", f"/echo?token={SECRETS[1]}", data=json.dumps({"password": SECRETS[2]}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {SECRETS[0]}", "Cookie": f"sessionid={SECRETS[3]}",
                 "X-Secret-Header": SECRETS[4]})


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{record.getMessage()} {record.exc_text or ''}"
                     for record in caplog.records)


def test_local_debug_logs_through_logging_and_never_logs_secrets_W21(
        pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline.configure({"LOCAL_DEBUG": True, "GET_METADATA": lambda request, response: 1 / 0})
    assert send_secrets(pipeline).status_code == 200
    assert pipeline.deliver_one()["request"]["headers"]["AUTHORIZATION"] == \
        f"Bearer {SECRETS[0]}"
    moesif_lines = [record.getMessage() for record in caplog.records
                    if record.name.startswith("moesif_fast")]
    assert any("/echo" in line and "POST" in line for line in moesif_lines), moesif_lines
    assert any("delivered" in line for line in moesif_lines), moesif_lines
    logged = log_text(caplog)
    for secret in SECRETS:
        assert secret not in logged


def test_local_debug_off_logs_no_request_lines(pipeline: Pipeline,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert send_secrets(pipeline).status_code == 200
    pipeline.deliver_one()
    assert not [record for record in caplog.records
                if record.name == "moesif_fast" and "/echo" in record.getMessage()]
    logged = log_text(caplog)
    for secret in SECRETS:
        assert secret not in logged


def test_missing_application_id_serves_requests_captures_nothing_and_says_why_W1(
        pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    """The reference answered every request with 500 when its config was missing."""
    pipeline.options.pop("APPLICATION_ID")
    caplog.set_level(logging.WARNING)
    response = pipeline.send("post", "/echo", data=b'{"a": 1}', content_type="application/json")
    plain = pipeline.send("post", "/echo", data=b'{"a": 1}', content_type="application/json",
                          middleware=[])
    assert answer(response) == answer(plain) and response.status_code == 200
    assert TRANSACTION_HEADER not in response
    assert pipeline.ring.stats().appended == 0
    errors = [record.getMessage() for record in caplog.records
              if record.levelno >= logging.ERROR and record.name.startswith("moesif_fast")]
    assert any("APPLICATION_ID" in message for message in errors), errors


def test_wrong_application_id_is_refused_by_the_collector_while_requests_succeed_W1(
        pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    pipeline.configure({"APPLICATION_ID": "not-the-collectors-id"})
    for number in range(3):
        response = pipeline.send("get", f"/json-object?{number}")
        assert response.status_code == 200 and response.json() == compat_app.JSON_OBJECT
    delivery = pipeline.deliver()
    assert delivery.events == []
    assert (delivery.counters.refused, delivery.counters.delivered) == (3, 0)
    assert any("refused" in record.getMessage() for record in caplog.records
               if record.levelno >= logging.ERROR)


# --- W2: bodies without a Content-Type ---------------------------------------------------------


def test_body_without_content_type_is_answered_and_captured_W2(pipeline: Pipeline) -> None:
    """The reference turned such a request into a 500 (`'json' in None`)."""
    def environ() -> dict[str, Any]:
        return {"REQUEST_METHOD": "POST", "PATH_INFO": "/describe", "CONTENT_LENGTH": "8",
                "wsgi.input": FakePayload(b'{"a": 1}')}

    response = pipeline.send_environ(**environ())
    plain = pipeline.send_environ(middleware=[], **environ())
    assert answer(response) == answer(plain)
    assert response.status_code == 200 and response.json()["body_length"] == 8
    request = pipeline.deliver_one()["request"]
    assert header(request["headers"], "content-type") is None
    assert (request["body"], request["transfer_encoding"]) == ({"a": 1}, "json")


def test_masked_content_type_is_answered_and_captured_W2(pipeline: Pipeline) -> None:
    pipeline.configure({"REQUEST_HEADER_MASKS": ["Content-Type"]})
    response = pipeline.send("post", "/echo", data=b'{"a": 1}', content_type="application/json")
    assert response.status_code == 200 and response.content == b'{"a": 1}'
    request = pipeline.deliver_one()["request"]
    assert "content-type" not in request["headers"]
    assert request["body"] == {"a": 1}


# --- async (ASGI) and the old-style middleware ------------------------------------------------


def test_middleware_is_sync_and_async_capable() -> None:
    assert MoesifMiddleware.sync_capable and MoesifMiddleware.async_capable


@pytest.mark.parametrize("path", ["/async", "/echo"])
def test_async_client_request_is_captured(pipeline: Pipeline, path: str) -> None:
    response = pipeline.send_async("post", f"{path}?q=1", data=b'{"n": 1}',
                                   content_type="application/json",
                                   headers={"X-Trace": "t", "Authorization": BASIC})
    assert response.status_code == 200
    event = pipeline.deliver_one()
    assert event["request"]["uri"] == f"http://testserver{path}?q=1"
    assert event["request"]["headers"]["X-TRACE"] == "t"
    assert event["request"]["body"] == {"n": 1}
    assert event["response"]["body"] == json.loads(response.content)
    assert event["user_id"] == "alice"
    assert event["transaction_id"] == response[TRANSACTION_HEADER]


def test_async_secure_request_has_an_https_uri(pipeline: Pipeline) -> None:
    response = pipeline.send_async("get", "/async?q=1", secure=True)
    assert response.status_code == 200
    assert pipeline.deliver_one()["request"]["uri"] == "https://testserver/async?q=1"


@pytest.mark.parametrize(("middleware", "headers", "expected"), [
    pytest.param([SESSIONS, AUTHENTICATION, NEW_STYLE], {"Authorization": BASIC}, "alice",
                 id="anonymous-user-then-header"),
    pytest.param([LOGIN, NEW_STYLE], {compat_app.LOGIN_HEADER: "async-user"}, "async-user",
                 id="request-user"),
    pytest.param([SESSIONS, AUTHENTICATION, LOGIN, NEW_STYLE],
                 {compat_app.LOGIN_HEADER: "async-user"}, "async-user",
                 id="request-user-set-after-authentication-middleware"),
])
def test_async_user_id(pipeline: Pipeline, middleware: list[str], headers: dict[str, str],
                       expected: str) -> None:
    pipeline.configure(middleware=middleware, **SESSION_SETTINGS)
    assert pipeline.send_async("get", "/async", headers=headers).status_code == 200
    assert pipeline.deliver_one()["user_id"] == expected


@async_unsafe
def company_from_the_orm(request: Any, response: Any) -> str:
    """Stands for an IDENTIFY_COMPANY that queries the ORM, as moesifdjango users' callbacks
    often do: Django's ORM entry points are `async_unsafe` like this one."""
    return "acme"


@pytest.mark.parametrize("send", ["send", "send_async"])
def test_callbacks_that_use_the_orm_work_under_asgi(pipeline: Pipeline, send: str) -> None:
    """Under ASGI Django ran the reference's (sync) middleware in a thread, where ORM calls in
    callbacks work; they must keep working with a middleware that is async-capable."""
    pipeline.configure({"IDENTIFY_COMPANY": company_from_the_orm})
    assert getattr(pipeline, send)("get", "/async").status_code == 200
    assert pipeline.deliver_one()["company_id"] == "acme"


def test_async_request_body_without_content_length_is_captured(pipeline: Pipeline) -> None:
    """An ASGI request body may come chunked, without Content-Length; Django reads it whole,
    and so did the reference (§2.2: "a chunked request with no Content-Length is read whole")."""
    async def call() -> HttpResponseBase:
        with pipeline.django():
            return await AsyncClient(raise_request_exception=False).request(
                method="POST", path="/async",
                headers=[(b"host", b"testserver"), (b"transfer-encoding", b"chunked")],
                _body_file=FakePayload(b'{"chunked": true}'))

    response = asyncio.run(call())
    assert response.json() == {"async": True, "body": {"chunked": True}}
    request = pipeline.deliver_one()["request"]
    assert (request["body"], request["transfer_encoding"]) == ({"chunked": True}, "json")


def without_ids_and_times(event: dict[str, Any]) -> dict[str, Any]:
    def side(values: dict[str, Any]) -> dict[str, Any]:
        headers = {key: value for key, value in values["headers"].items()
                   if key.lower() != TRANSACTION_HEADER}
        return {**values, "time": None, "headers": headers}

    return {**event, "request": side(event["request"]), "response": side(event["response"]),
            "transaction_id": None}


@pytest.mark.parametrize("send", ["send", "send_async"])
def test_pre19_middleware_delivers_the_same_event(pipeline: Pipeline, send: str) -> None:
    pipeline.configure({"IDENTIFY_COMPANY": lambda request, response: "acme",
                        "REQUEST_BODY_MASKS": ["password"]}, **SESSION_SETTINGS)
    request = {"data": b'{"password": "p", "keep": 1}', "content_type": "application/json",
               "headers": {"Authorization": BASIC, "X-Forwarded-For": "203.0.113.5"}}
    answers = [answer(getattr(pipeline, send)("post", "/echo?same", middleware=stack,
                                              **request))
               for stack in ([SESSIONS, NEW_STYLE], [SESSIONS, PRE19])]
    assert answers[0] == answers[1]
    new_style, pre19 = pipeline.deliver().events
    for event in (new_style, pre19):
        assert_event_shape(event)
    assert without_ids_and_times(new_style) == without_ids_and_times(pre19)
    assert pre19["request"]["body"] == {"keep": 1} and pre19["user_id"] == "alice"


# --- property tests ----------------------------------------------------------------------------

HEADER_NAMES = st.one_of(
    st.sampled_from(["X-Forwarded-For", "X-Client-IP", "X-Real-IP", "Forwarded",
                     "Authorization", "X-Api-Key", "Content-Encoding", "Accept", "User-Agent"]),
    st.from_regex(r"X-[A-Za-z0-9]{1,10}(-[A-Za-z0-9]{1,6})?", fullmatch=True))
HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
            max_size=40).map(str.strip),
    st.sampled_from(["abcd", "gzip", "unknown, 203.0.113.9:8080", "::1", "Basic Og==",
                     BASIC, f"Bearer {url_safe_jwt('p')}", "Bearer a.b.c"]))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200).map(gzip.compress),
    st.text(max_size=100).map(str.encode))
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/octet-stream",
                                 "application/x-www-form-urlencoded", ""])
ROUTES = st.sampled_from(["/describe", "/echo", "/stream", "/file", "/text", "/gzipped",
                          "/empty", "/status/404", "/status/500", "/no-such-route"])
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow])


def header_dicts() -> st.SearchStrategy[dict[str, str]]:
    """Headers with distinct names whatever their case."""
    return st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8,
                    unique_by=lambda pair: pair[0].lower()).map(dict)


@PROPERTY_SETTINGS
@given(method=METHODS, route=ROUTES, headers=header_dicts(), body=BODIES,
       content_type=CONTENT_TYPES, masked=st.booleans())
def test_property_responses_are_identical_and_events_well_formed(
        pipeline: Pipeline, method: str, route: str, headers: dict[str, str], body: bytes,
        content_type: str, masked: bool) -> None:
    pipeline.configure({"REQUEST_HEADER_MASKS": ["authorization"] if masked else None,
                        "RESPONSE_BODY_MASKS": ["method"] if masked else None})
    request = {"data": body, "content_type": content_type, "headers": headers}
    captured = pipeline.send("generic", method, route, **request)
    plain = pipeline.send("generic", method, route, middleware=[], **request)
    assert answer(captured) == answer(plain)
    event = pipeline.deliver_one()
    assert event["request"]["verb"] == method
    assert event["response"]["status"] == captured.status_code
    assert event["transaction_id"] == captured[TRANSACTION_HEADER]
    sent = {key.lower(): value for key, value in event["request"]["headers"].items()}
    for name, value in headers.items():
        if not (masked and name.lower() == "authorization"):
            assert sent[name.lower()] == value


CALLBACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8) | st.datetimes() | st.dates()
    | st.decimals(allow_nan=True, allow_infinity=True) | st.uuids(),
    lambda children: st.lists(children, max_size=3) | st.tuples(children)
    | st.frozensets(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=3),
    max_leaves=10)


def is_plain_json(value: Any) -> bool:
    """True when JSON carries `value` unchanged (so the event must hold it as it is)."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(is_plain_json, value))
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain_json(item) for key, item in value.items())
    return False


@PROPERTY_SETTINGS
@given(metadata=CALLBACK_VALUES, company=CALLBACK_VALUES, user=CALLBACK_VALUES,
       session=CALLBACK_VALUES)
def test_property_callback_results_never_change_the_response_and_arrive_as_json(
        pipeline: Pipeline, metadata: Any, company: Any, user: Any, session: Any) -> None:
    pipeline.configure({"GET_METADATA": lambda request, response: metadata,
                        "IDENTIFY_COMPANY": lambda request, response: company,
                        "IDENTIFY_USER": lambda request, response: user,
                        "GET_SESSION_TOKEN": lambda request, response: session})
    captured = pipeline.send("post", "/describe", data=b'{"a": 1}',
                             content_type="application/json")
    plain = pipeline.send("post", "/describe", data=b'{"a": 1}',
                          content_type="application/json", middleware=[])
    assert answer(captured) == answer(plain)
    event = pipeline.deliver_one()
    for field, value in (("metadata", metadata), ("company_id", company),
                         ("session_token", session)):
        if is_plain_json(value):
            assert event[field] == value
    if user and is_plain_json(user):
        assert event["user_id"] == user

