"""The middleware in process: real Django clients (sync and async) → a real ring, read back.

Each test points the middleware at a fresh ring (as the gunicorn hooks do, through
MOESIF_FAST_RING), sends requests with Django's test clients, reads the records back with the
ring's reader and checks the captured call and the Moesif event built from it.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import logging
import os
import string
import time
import uuid

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

import pytest  # noqa: E402
from django.http import (  # noqa: E402
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.test import AsyncClient, Client, RequestFactory, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from records import captured  # noqa: E402

from moesif_fast import ringfile, snapshot  # noqa: E402
from moesif_fast.event import EventBuilder  # noqa: E402
from moesif_fast.middleware import (  # noqa: E402
    MAX_HEADER_KEY_SETS,
    MoesifMiddleware,
    _full_path,
    _header_getters,
)
from moesif_fast.ringbuffer import Geometry, Reader, RingFile  # noqa: E402
from moesif_fast.settings import MoesifOptions  # noqa: E402
from moesif_fast.snapshot import Snapshot, publish  # noqa: E402

BASE_OPTIONS = {"APPLICATION_ID": "app-id", "BASE_URI": "http://127.0.0.1:9"}


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"got": json.loads(request.body or b"null")}, status=201)


@csrf_exempt
def upload_size(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(len(request.read())), content_type="text/plain")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"one ", b"two"]), content_type="text/plain")


async def async_echo(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"async": True, "path": request.path})


VIEW_CALLS: list[str] = []


def counted(request: HttpRequest) -> HttpResponse:
    VIEW_CALLS.append(request.path)
    return JsonResponse({"missing": True}, status=404)


urlpatterns = [path("echo", echo), path("upload", upload_size), path("stream", stream),
               path("async", async_echo), path("counted", counted)]


def send(method: str, url: str, options: dict[str, object] | None = None,
         **request: object) -> HttpResponse:
    """One request through a new test client (so a new middleware) with these options."""
    with override_settings(MOESIF_MIDDLEWARE={**BASE_OPTIONS, **(options or {})},
                           ROOT_URLCONF=__name__):
        return getattr(Client(), method)(url, **request)


def test_json_call_is_captured_field_by_field(ring: Reader) -> None:
    response = send("post", "/echo?x=1", data={"a": 1}, content_type="application/json",
                    headers={"X-Api-Key": "k1"})
    assert response.status_code == 201
    transaction_id = response["x-moesif-transaction-id"]
    assert uuid.UUID(transaction_id).version == 4
    [call] = captured(ring)
    assert (call.verb, call.uri, call.status) == ("POST", "http://testserver/echo?x=1", 201)
    assert ("HTTP_X_API_KEY", "k1") in zip(*call.request_headers, strict=True)
    assert call.request_body == b'{"a": 1}'
    assert call.response_body == b'{"got": {"a": 1}}'
    assert ("x-moesif-transaction-id", transaction_id) in call.response_headers
    assert call.transaction_id == transaction_id
    assert call.request_time_ns <= call.response_time_ns

    event = EventBuilder(MoesifOptions(**BASE_OPTIONS)).build(call)
    assert event["request"]["headers"]["X-API-KEY"] == "k1"
    assert event["request"]["headers"]["X-MOESIF-TRANSACTION-ID"] == transaction_id
    assert event["request"]["body"] == {"a": 1}
    assert event["response"]["body"] == {"got": {"a": 1}}
    assert event["response"]["headers"]["x-moesif-transaction-id"] == transaction_id
    assert event["transaction_id"] == transaction_id


def test_client_transaction_id_is_kept_and_disable_adds_none(ring: Reader) -> None:
    kept = send("get", "/echo", headers={"X-Moesif-Transaction-Id": "client-id-1"})
    disabled = send("get", "/echo", {"DISABLE_TRANSACTION_ID": True})
    assert kept["x-moesif-transaction-id"] == "client-id-1"
    assert "x-moesif-transaction-id" not in disabled
    first, second = captured(ring)
    assert first.transaction_id == "client-id-1"
    assert second.transaction_id is None


def test_skip_leaves_response_untouched_and_captures_nothing(ring: Reader) -> None:
    response = send("get", "/echo", {"SKIP": lambda request, response: True})
    assert response.status_code == 201 and "x-moesif-transaction-id" not in response
    assert captured(ring) == []


def test_broken_callbacks_never_reach_the_application(ring: Reader) -> None:
    def broken(request: HttpRequest, response: HttpResponse) -> object:
        raise RuntimeError("callback bug")

    response = send("post", "/echo", {"IDENTIFY_USER": broken, "IDENTIFY_COMPANY": broken,
                                      "GET_METADATA": broken, "SKIP": broken},
                    data={"b": 2}, content_type="application/json")
    assert response.status_code == 201 and response.json() == {"got": {"b": 2}}
    [call] = captured(ring)
    assert (call.user_id, call.company_id, call.metadata) == (None, None, None)


def test_a_raising_callback_is_logged_with_its_count_at_most_once_a_minute(
        ring: Reader, caplog: pytest.LogCaptureFixture) -> None:
    def failing_identify(request: HttpRequest, response: HttpResponse) -> object:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.WARNING, logger="moesif_fast"):
        for _ in range(3):
            assert send("get", "/echo", {"IDENTIFY_USER": failing_identify}).status_code == 201
    warnings = [record.getMessage() for record in caplog.records
                if "failing_identify" in record.getMessage()]
    assert warnings == [
        "moesif_fast: the callback test_a_raising_callback_is_logged_with_its_count_at_most_once"
        "_a_minute.<locals>.failing_identify raised 1 times since the last report; its value is "
        "left out of those events (LOCAL_DEBUG logs each one with its traceback)"]
    assert len(captured(ring)) == 3


def test_callback_values_marshal_cannot_carry_are_made_plain(ring: Reader) -> None:
    moment = datetime.datetime(2026, 11, 24, 9, 0, tzinfo=datetime.timezone.utc)

    def metadata(request: HttpRequest, response: HttpResponse) -> object:
        return {"when": moment, "price": decimal.Decimal("1.50"), "tags": ["a"]}

    send("get", "/echo", {"GET_METADATA": metadata, "IDENTIFY_USER": lambda q, s: 42},
         HTTP_X_WHEN=moment, HTTP_X_NONE=None, HTTP_X_LIST=[1, "x"])  # as a WSGI server may
    [call] = captured(ring)
    assert call.metadata == {"when": moment.isoformat(), "price": "1.50", "tags": ["a"]}
    assert call.user_id == 42
    headers = dict(zip(*call.request_headers, strict=True))  # flattened as the shipper does
    assert (headers["HTTP_X_WHEN"], headers["HTTP_X_NONE"], headers["HTTP_X_LIST"]) == (
        str(moment), "", '[1, "x"]')


def test_streaming_response_is_not_consumed(ring: Reader) -> None:
    response = send("get", "/stream")
    assert b"".join(response.streaming_content) == b"one two"
    [call] = captured(ring)
    assert call.response_body is None and call.status == 200


def test_body_over_the_limit_is_left_to_the_view(ring: Reader) -> None:
    body = b"z" * 5000
    response = send("post", "/upload", {"MAX_BODY_SIZE": 1000}, data=body,
                    content_type="application/octet-stream")
    assert response.content == b"5000"  # the view read the whole body itself
    [call] = captured(ring)
    assert call.request_body == 5000  # its size, recorded instead of the bytes


class TimedStream:
    """A request body stream that notes when it was read."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.read_at: int | None = None

    def read(self, size: int = -1) -> bytes:
        self.read_at = time.time_ns()
        body, self._body = self._body, b""
        return body

    def close(self) -> None:
        pass


def test_the_request_time_is_taken_after_the_body_is_read(ring: Reader) -> None:
    """As before the capture path was compiled: a slow upload does not count as the view's
    time."""
    request = RequestFactory().post("/echo", b'{"a": 1}', content_type="application/json")
    request._stream = stream = TimedStream(b'{"a": 1}')
    with override_settings(MOESIF_MIDDLEWARE=BASE_OPTIONS, ROOT_URLCONF=__name__):
        assert MoesifMiddleware(echo)(request).status_code == 201
    [call] = captured(ring)
    assert call.request_body == b'{"a": 1}' and stream.read_at is not None
    assert call.request_time_ns >= stream.read_at


class FalsyCompany:
    """A callable that is false as a value (it has a length of 0)."""

    def __len__(self) -> int:
        return 0

    def __call__(self, request: HttpRequest, response: HttpResponse) -> str:
        return "acme"


def test_a_company_callback_that_is_false_as_a_value_is_still_called(ring: Reader) -> None:
    send("get", "/echo", {"IDENTIFY_COMPANY": FalsyCompany()})
    [call] = captured(ring)
    assert call.company_id == "acme"


def test_invalid_settings_pass_requests_through(ring: Reader) -> None:
    with override_settings(MOESIF_MIDDLEWARE={"BATCH_SIZE": "ten"}, ROOT_URLCONF=__name__):
        response = Client().post("/echo", {"c": 3}, content_type="application/json")
    assert response.status_code == 201 and "x-moesif-transaction-id" not in response
    assert captured(ring) == []


def test_full_ring_drops_and_counts_without_touching_responses(tmp_path, monkeypatch) -> None:
    ring_file = RingFile.create(str(tmp_path / "small.ring"), Geometry.for_size(1, 1, 1))
    monkeypatch.setenv(ringfile.RING_ENV, ring_file.path)
    with override_settings(MOESIF_MIDDLEWARE=BASE_OPTIONS, ROOT_URLCONF=__name__):
        http = Client()
        statuses = [http.get("/echo").status_code for _ in range(5)]
    assert statuses == [201] * 5
    stats = ring_file.stats()
    assert stats.appended == 1 and stats.dropped == 4  # max_records: 1 per lane


def test_async_view_is_captured_without_a_thread_hop(ring: Reader) -> None:
    async def get() -> HttpResponse:
        with override_settings(MOESIF_MIDDLEWARE=BASE_OPTIONS, ROOT_URLCONF=__name__):
            return await AsyncClient().get("/async?q=1", headers={"X-Trace": "t"})

    response = asyncio.run(get())
    assert response.status_code == 200 and response.json() == {"async": True, "path": "/async"}
    [call] = captured(ring)
    assert call.uri == "http://testserver/async?q=1"
    assert ("HTTP_X_TRACE", "t") in zip(*call.request_headers, strict=True)
    assert call.transaction_id == response["x-moesif-transaction-id"]


def rule(rule_id: str, path: str, value: str, status: int, headers: dict[str, str]) -> dict:
    return {"_id": rule_id, "type": "regex", "block": True,
            "regex_config": [{"conditions": [{"path": path, "value": value}]}],
            "response": {"status": status, "headers": headers, "body": {"rule": rule_id}}}


def publish_rules(reader: Reader, rules: list[dict]) -> None:
    """What the shipper publishes after fetching /v1/rules."""
    publish(ringfile.policy_snapshot_path(reader.ring.path),
            Snapshot({"sample_rate": 100}, rules, "etag", "tag", 1))


def test_a_rule_on_the_route_blocks_before_the_view_runs(ring: Reader) -> None:
    publish_rules(ring, [rule("before", "request.route", "/counted", 429, {"Retry-After": "9"})])
    VIEW_CALLS.clear()
    response = send("get", "/counted")
    assert VIEW_CALLS == []  # no side effects
    assert (response.status_code, response.json()) == (429, {"rule": "before"})
    assert (response["Retry-After"], response["Content-Type"]) == ("9", "application/json")
    [call] = captured(ring)
    assert (call.status, call.blocked_by, call.response_body) == (429, "before",
                                                                   b'{"rule": "before"}')


def test_a_rule_on_the_status_replaces_the_response_after_the_view(ring: Reader) -> None:
    publish_rules(ring, [rule("after", "response.status", "404", 451, {"X-Rule": "after"})])
    VIEW_CALLS.clear()
    response = send("get", "/counted")
    assert VIEW_CALLS == ["/counted"]
    assert (response.status_code, response["X-Rule"], response.json()) == (
        451, "after", {"rule": "after"})
    [call] = captured(ring)
    assert (call.status, call.blocked_by) == (451, "after")


def test_rules_published_while_serving_apply_to_the_next_request(ring: Reader,
                                                                  monkeypatch) -> None:
    """One middleware (one client) serving on: each request sees the newest snapshot once its
    check interval has passed (none here)."""
    monkeypatch.setattr(snapshot, "CHECK_INTERVAL", 0.0)
    with override_settings(MOESIF_MIDDLEWARE=BASE_OPTIONS, ROOT_URLCONF=__name__):
        http = Client()
        statuses = [http.get("/counted").status_code]
        publish_rules(ring, [rule("later", "request.route", "/counted", 429, {})])
        statuses.append(http.get("/counted").status_code)
        publish_rules(ring, [])
        statuses.append(http.get("/counted").status_code)
    assert statuses == [404, 429, 404]
    assert [call.blocked_by for call in captured(ring)] == [None, "later", None]



def test_user_callbacks_run_once_when_sampling_needs_the_user(ring: Reader) -> None:
    publish(ringfile.policy_snapshot_path(ring.ring.path),
            Snapshot({"sample_rate": 100, "user_sample_rate": {"ada": 100}}, [], "e", "t", 1))
    calls: list[str] = []

    def identify(request: HttpRequest, response: HttpResponse) -> str:
        calls.append(request.path)
        return "ada"

    send("get", "/echo", {"IDENTIFY_USER": identify})
    [call] = captured(ring)
    assert calls == ["/echo"]
    assert (call.user_id, call.weight) == ("ada", 1)


# Where quoting rules differ: ASCII punctuation and space, among a few other characters.
URL_TEXT = st.sampled_from(string.punctuation + " aZ0é\x7f\x00☃")


@settings(max_examples=500, deadline=None)
@given(path=st.text(URL_TEXT, max_size=3) | st.text(st.characters(blacklist_categories=("Cs",))),
       query=st.text(URL_TEXT, max_size=3) | st.text(st.characters(max_codepoint=255)))
def test_the_captured_path_is_djangos_full_path(path: str, query: str) -> None:
    """The quoting shortcut in the URI gives exactly what request.get_full_path() gives, for
    any path text and any (latin-1, as WSGI delivers it) query string."""
    request = RequestFactory().get("/")
    for request.path, request.META["QUERY_STRING"] in (("/" + path, ""), ("/", query),
                                                       ("/" + path, query)):
        assert _full_path(request) == request.get_full_path()


def test_each_request_carries_exactly_its_own_headers(ring: Reader) -> None:
    """Header names are remembered per set of META keys: requests alternating between header
    sets, and more distinct sets than are remembered, each carry their own headers only."""
    header_sets = [{"X-One": "1"}, {"X-One": "1", "X-Two": "2"}, {}]
    header_sets += [{f"X-Many-{number}": str(number)} for number in range(MAX_HEADER_KEY_SETS)]
    with override_settings(MOESIF_MIDDLEWARE=BASE_OPTIONS, ROOT_URLCONF=__name__):
        client = Client()
        for headers in header_sets + header_sets[:3]:
            client.get("/echo", headers=headers)
    calls = captured(ring)
    assert len(calls) == len(header_sets) + 3
    assert len(_header_getters) <= MAX_HEADER_KEY_SETS
    for call, headers in zip(calls, header_sets + header_sets[:3], strict=True):
        sent = {name: value for name, value in zip(*call.request_headers, strict=True)
                if name.startswith("HTTP_X_")}
        assert sent == {"HTTP_" + name.upper().replace("-", "_"): value
                        for name, value in headers.items()}
