"""Outgoing capture: real `requests` calls to a real loopback HTTP service → a real ring, read back.

Each test points capture at a fresh ring (as the gunicorn hooks do, through MOESIF_FAST_RING),
enables it with its options, calls the service at 127.0.0.1 through requests (module functions,
Sessions, streamed responses, uploads), reads the records back with the ring's reader and
checks the captured call and the Moesif event the shipper builds from it.
"""

from __future__ import annotations

import datetime
import decimal
import gzip
import io
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from records import captured

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from event_shape import EVENT_KEYS, REQUEST_KEYS, RESPONSE_KEYS  # noqa: E402

from moesif_fast import outgoing, settings  # noqa: E402
from moesif_fast.event import EventBuilder  # noqa: E402
from moesif_fast.ringbuffer import Reader  # noqa: E402
from moesif_fast.settings import MoesifOptions  # noqa: E402
from moesif_fast.shipper.transport import CollectorTransport, Stop  # noqa: E402

BASE_OPTIONS = {"APPLICATION_ID": "app-id", "BASE_URI": "http://127.0.0.1:9",
                "CAPTURE_OUTGOING_REQUESTS": True}
ORIGINAL_SEND = vars(requests.Session)["send"]
BIG_BODY = bytes(range(256)) * 1200  # 307,200 bytes: several reads for a streaming client
ITEMS = {"items": [1, 2, 3], "secret": "hidden"}
OUTGOING_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}")  # §1.4, outgoing
TIMEOUT = 10


# --- the external service --------------------------------------------------------------------


class ServiceHandler(BaseHTTPRequestHandler):
    """GET /items: JSON; POST /echo: what it received, as JSON; GET /big: BIG_BODY;
    GET /gzip: gzip-encoded JSON; GET /redirect: 302 to /items?from=redirect; other GET and
    POST paths: 404; HEAD: headers only; PUT, PATCH, DELETE, OPTIONS: the method's name."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        route = self.path.partition("?")[0]
        if route == "/items":
            self._reply(200, json.dumps(ITEMS).encode(), "application/json",
                        {"X-Service": "loopback"})
        elif route == "/big":
            self._reply(200, BIG_BODY, "application/octet-stream")
        elif route == "/gzip":
            self._reply(200, gzip.compress(json.dumps(ITEMS).encode()), "application/json",
                        {"Content-Encoding": "gzip"})
        elif route == "/redirect":
            self._reply(302, b"", "text/plain", {"Location": "/items?from=redirect"})
        else:
            self._reply(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        received = self._read_body()
        if self.path.partition("?")[0] != "/echo":
            self._reply(404, b"not found", "text/plain")
            return
        reply = {"body": received.decode("latin-1"), "secret": "hidden", "kept": 1}
        self._reply(201, json.dumps(reply).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()

    def do_other(self) -> None:
        """PUT, PATCH, DELETE, OPTIONS: 200 naming the method."""
        self._read_body()
        self._reply(200, self.command.encode(), "text/plain")

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_other

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _reply(self, status: int, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    """The base URL of a loopback HTTP service (see ServiceHandler)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ServiceHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


# --- the ring and capture ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def capture_is_disabled_afterwards() -> Iterator[None]:
    yield
    outgoing.disable()
    assert vars(requests.Session)["send"] is ORIGINAL_SEND


def options(**extra: Any) -> MoesifOptions:
    return settings.load({**BASE_OPTIONS, **extra})


def enable(**extra: Any) -> MoesifOptions:
    loaded = options(**extra)
    outgoing.enable(loaded)
    return loaded


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- what a record holds ----------------------------------------------------------------------


def test_get_and_post_are_recorded_field_by_field(ring: Reader, service: str) -> None:
    enable()
    before = outgoing._time_ns()
    got = requests.get(f"{service}/items?x=1", headers={"X-Api-Key": "k1", "X-Raw": b"r\xe9"},
                       timeout=TIMEOUT)
    posted = requests.post(f"{service}/echo", json={"a": 1}, timeout=TIMEOUT)
    after = outgoing._time_ns()
    assert got.json() == ITEMS and posted.status_code == 201

    get_call, post_call = captured(ring)
    assert get_call.direction == "Outgoing"
    assert (get_call.verb, get_call.uri, get_call.status) == ("GET", f"{service}/items?x=1", 200)
    request_headers = dict(zip(*get_call.request_headers, strict=True))
    assert request_headers["X-Api-Key"] == "k1"  # real header names
    assert request_headers["X-Raw"] == "r\xe9"  # bytes values as sent, as text
    assert get_call.request_body is None
    assert ("X-Service", "loopback") in get_call.response_headers
    assert get_call.response_body == got.content
    assert before <= get_call.request_time_ns <= get_call.response_time_ns
    assert get_call.response_time_ns <= post_call.request_time_ns <= post_call.response_time_ns
    assert post_call.response_time_ns <= after
    assert (get_call.remote_addr, get_call.transaction_id, get_call.weight,
            get_call.blocked_by) == (None, None, 1, None)

    assert (post_call.verb, post_call.uri, post_call.status) == ("POST", f"{service}/echo", 201)
    assert post_call.request_body == b'{"a": 1}'
    assert ("Content-Type", "application/json") in zip(*post_call.request_headers, strict=True)
    assert post_call.response_body == posted.content


def test_every_module_function_is_captured(ring: Reader, service: str) -> None:
    enable()
    requests.put(f"{service}/thing", data=b"new", timeout=TIMEOUT)
    requests.patch(f"{service}/thing", data=b"change", timeout=TIMEOUT)
    requests.delete(f"{service}/thing", timeout=TIMEOUT)
    requests.options(f"{service}/thing", timeout=TIMEOUT)
    requests.head(f"{service}/thing", timeout=TIMEOUT)
    requests.request("get", f"{service}/items", timeout=TIMEOUT)
    calls = captured(ring)
    assert [(call.verb, call.status) for call in calls] == [
        ("PUT", 200), ("PATCH", 200), ("DELETE", 200), ("OPTIONS", 200), ("HEAD", 200),
        ("GET", 200)]
    assert [call.request_body for call in calls[:2]] == [b"new", b"change"]
    assert [call.response_body for call in calls[:5]] == [b"PUT", b"PATCH", b"DELETE",
                                                        b"OPTIONS", None]


def test_local_debug_logs_no_query_credentials_or_headers(ring: Reader, service: str,
                                                          caplog) -> None:
    enable(LOCAL_DEBUG=True)
    with_credentials = service.replace("http://", "http://ada:secret@")
    with caplog.at_level("INFO", logger="moesif_fast"):
        requests.get(f"{with_credentials}/items?token=t0ken", headers={"X-Api-Key": "k3y"},
                     timeout=TIMEOUT)
    [message] = [record.getMessage() for record in caplog.records]
    assert message == f"moesif_fast: outgoing GET {service}/items -> 200, queued"


def test_event_has_the_outgoing_shape_and_the_masks(ring: Reader, service: str) -> None:
    loaded = enable(REQUEST_HEADER_MASKS=["X-Api-Key"], RESPONSE_HEADER_MASKS=["X-Service"],
                    REQUEST_BODY_MASKS=["password"], RESPONSE_BODY_MASKS=["secret"],
                    API_VERSION="2.0")
    requests.post(f"{service}/echo", json={"user": "ada", "password": "p"},
                  headers={"X-Api-Key": "k1", "Authorization": "Basic YWRhOnB3"},
                  timeout=TIMEOUT)
    requests.get(f"{service}/items", timeout=TIMEOUT)
    post_call, get_call = captured(ring)
    builder = EventBuilder(loaded)
    event = builder.build(post_call)

    assert list(event) == EVENT_KEYS
    request, response = event["request"], event["response"]
    assert (list(request), list(response)) == (REQUEST_KEYS, RESPONSE_KEYS)
    assert OUTGOING_TIME.fullmatch(request["time"]) and OUTGOING_TIME.fullmatch(response["time"])
    assert (request["uri"], request["verb"], request["api_version"], request["ip_address"]) == (
        f"{service}/echo", "POST", "2.0", None)
    assert "x-api-key" not in request["headers"]
    assert request["headers"]["authorization"] == "Basic YWRhOnB3"  # keys lowercased by masks
    assert "X-MOESIF-TRANSACTION-ID" not in request["headers"]  # none was sent
    assert (request["body"], request["transfer_encoding"]) == ({"user": "ada"}, "json")
    assert response["status"] == 201 and response["ip_address"] is None
    assert response["body"] == {"body": '{"user": "ada", "password": "p"}', "kept": 1}
    assert event["user_id"] is None  # outgoing Authorization headers are not the user's
    assert (event["direction"], event["weight"], event["blocked_by"]) == ("Outgoing", 1, None)
    assert uuid.UUID(event["transaction_id"]).version == 4
    assert "x-service" not in builder.build(get_call)["response"]["headers"]


def test_sessions_made_before_enable_and_subclasses_are_captured(ring: Reader,
                                                                 service: str) -> None:
    class TracingSession(requests.Session):
        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            request.headers["X-Trace"] = "t1"
            return super().send(request, **kwargs)

    early = requests.Session()
    enable()
    early.get(f"{service}/items?session=early", timeout=TIMEOUT)
    TracingSession().get(f"{service}/items?session=subclass", timeout=TIMEOUT)
    early_call, subclass_call = captured(ring)
    assert early_call.uri.endswith("session=early")
    assert subclass_call.uri.endswith("session=subclass")
    assert ("X-Trace", "t1") in zip(*subclass_call.request_headers, strict=True)


def test_streamed_responses_are_left_unread_for_the_caller(ring: Reader, service: str) -> None:
    enable()
    streamed = requests.get(f"{service}/big", stream=True, timeout=TIMEOUT)
    session = requests.Session()
    session.stream = True
    streamed_by_session = session.get(f"{service}/big", timeout=TIMEOUT)

    call, session_call = captured(ring)  # recorded before the caller read anything
    assert call.response_body is None and session_call.response_body is None
    assert call.status == 200
    assert ("Content-Length", str(len(BIG_BODY))) in call.response_headers
    assert b"".join(streamed.iter_content(4096)) == BIG_BODY
    assert streamed_by_session.content == BIG_BODY


def test_request_bodies_are_recorded_as_sent_and_uploads_are_not_read(ring: Reader,
                                                                      service: str) -> None:
    enable()
    uploads: list[Any] = [
        "text é",
        {"field": "value", "n": "1"},
        bytearray(b"raw bytes"),
        iter([b"gene", b"rated"]),
        io.BytesIO(b"from a file"),
    ]
    echoed = [requests.post(f"{service}/echo", data=upload, timeout=TIMEOUT).json()["body"]
              for upload in uploads]
    assert echoed == ["text é".encode().decode("latin-1"), "field=value&n=1", "raw bytes",
                      "generated", "from a file"]  # the service got every upload in full
    assert [call.request_body for call in captured(ring)] == [
        "text é".encode(), b"field=value&n=1", b"raw bytes", None, None]


def test_log_body_outgoing_false_records_no_bodies(ring: Reader, service: str) -> None:
    enable(LOG_BODY_OUTGOING=False)
    requests.post(f"{service}/echo", json={"a": 1}, timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.request_body is None and call.response_body is None
    assert ("Content-Type", "application/json") in zip(*call.request_headers, strict=True)
    assert call.status == 201


def test_bodies_over_max_body_size_are_recorded_as_their_size(ring: Reader,
                                                              service: str) -> None:
    enable(MAX_BODY_SIZE=1000)
    posted = requests.post(f"{service}/echo", data=b"x" * 5000, timeout=TIMEOUT)
    requests.get(f"{service}/big", timeout=TIMEOUT)
    post_call, big_call = captured(ring)
    assert post_call.request_body == 5000
    assert post_call.response_body == len(posted.content)
    assert big_call.response_body == len(BIG_BODY)


def test_compressed_responses_are_recorded_as_the_caller_received_them(ring: Reader,
                                                                       service: str) -> None:
    enable()
    reply = requests.get(f"{service}/gzip", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.response_body == reply.content == json.dumps(ITEMS).encode()
    assert ("Content-Encoding", "gzip") in call.response_headers


def test_credentials_in_the_url_are_left_out_of_the_uri(ring: Reader, service: str) -> None:
    enable()
    with_credentials = service.replace("http://", "http://ada:secret@")
    requests.get(f"{with_credentials}/items?q=a@b", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.uri == f"{service}/items?q=a@b"
    assert ("Authorization", "Basic YWRhOnNlY3JldA==") in zip(*call.request_headers, strict=True)


def test_redirects_make_one_record_of_the_final_exchange(ring: Reader, service: str) -> None:
    enable()
    reply = requests.get(f"{service}/redirect", timeout=TIMEOUT)
    assert [hop.status_code for hop in reply.history] == [302]
    [call] = captured(ring)
    assert (call.uri, call.status) == (f"{service}/items?from=redirect", 200)
    assert call.response_body == reply.content


# --- callbacks ---------------------------------------------------------------------------------


def test_skip_outgoing_is_asked_first(ring: Reader, service: str) -> None:
    identified: list[str] = []

    def identify(request: requests.PreparedRequest, response: requests.Response) -> str:
        identified.append(request.url)
        return "user-1"

    enable(SKIP_OUTGOING=lambda request, response: "skip=1" in request.url,
           IDENTIFY_USER_OUTGOING=identify)
    requests.get(f"{service}/items?skip=1", timeout=TIMEOUT)
    requests.get(f"{service}/items?skip=0", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.uri.endswith("skip=0") and call.user_id == "user-1"
    assert identified == [f"{service}/items?skip=0"]


def test_outgoing_callbacks_fill_the_record_and_never_reach_the_caller(ring: Reader,
                                                                       service: str) -> None:
    seen: list[tuple[type, type]] = []

    def identify_user(request: requests.PreparedRequest, response: requests.Response) -> str:
        seen.append((type(request), type(response)))
        return f"user-{response.headers['X-Service']}"

    def identify_company(request: requests.PreparedRequest, response: requests.Response) -> str:
        raise RuntimeError("broken callback")

    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    loaded = enable(
        IDENTIFY_USER_OUTGOING=identify_user,
        IDENTIFY_COMPANY_OUTGOING=identify_company,
        GET_SESSION_TOKEN_OUTGOING=lambda request, response: "token-1",
        GET_METADATA_OUTGOING=lambda request, response: {"when": when,
                                                         "amount": decimal.Decimal("1.5")},
    )
    reply = requests.get(f"{service}/items", timeout=TIMEOUT)
    assert reply.json() == ITEMS
    [call] = captured(ring)
    assert seen == [(requests.PreparedRequest, requests.Response)]
    assert (call.user_id, call.company_id, call.session_token) == ("user-loopback", None,
                                                                   "token-1")
    assert call.metadata == {"when": when.isoformat(), "amount": "1.5"}
    event = EventBuilder(loaded).build(call)
    assert (event["user_id"], event["session_token"]) == ("user-loopback", "token-1")
    assert outgoing.capture_errors() == 0


def test_calls_made_by_callbacks_are_part_of_the_call(ring: Reader, service: str) -> None:
    def metadata(request: requests.PreparedRequest, response: requests.Response) -> dict:
        return {"lookup": requests.get(f"{service}/items?nested=1", timeout=TIMEOUT).status_code}

    enable(GET_METADATA_OUTGOING=metadata)
    requests.get(f"{service}/items?outer=1", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.uri.endswith("outer=1") and call.metadata == {"lookup": 200}


# --- what is never captured, and failures -----------------------------------------------------


def test_calls_to_the_collector_are_not_captured(ring: Reader, service: str) -> None:
    enable(BASE_URI=f"{service}/collector")
    requests.post(f"{service}/collector/v1/events/batch", json=[], timeout=TIMEOUT)
    requests.get(f"{service}/collector-like/items", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.uri == f"{service}/collector-like/items"


def test_the_shippers_transport_is_not_captured(ring: Reader, service: str) -> None:
    enable()  # BASE_URI elsewhere: the transport's calls stay out as they bypass requests
    transport = CollectorTransport(service, "app-id", user_agent="test")
    outcome, body = transport.get_json("/items", give_up_at=None, stop=Stop())
    transport.close()
    assert outcome.delivered and body == ITEMS
    assert captured(ring) == []


def test_failed_calls_raise_the_same_exception_and_make_no_record(ring: Reader) -> None:
    url = f"http://127.0.0.1:{closed_port()}/items"
    with pytest.raises(requests.ConnectionError) as without_capture:
        requests.get(url, timeout=TIMEOUT)
    enable()
    with pytest.raises(requests.ConnectionError) as with_capture:
        requests.get(url, timeout=TIMEOUT)
    assert type(with_capture.value) is type(without_capture.value)
    assert captured(ring) == []
    assert outgoing.capture_errors() == 0


def test_a_failed_capture_is_counted_and_the_caller_gets_its_response(ring: Reader,
                                                                      service: str) -> None:
    enable()

    def replace_request(response: requests.Response, **kwargs: Any) -> None:
        response.request = "not a request"  # type: ignore[assignment]

    reply = requests.get(f"{service}/items", hooks={"response": replace_request},
                         timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json() == ITEMS
    assert captured(ring) == []
    assert outgoing.capture_errors() == 1


# --- enabling and disabling -------------------------------------------------------------------


def test_disable_restores_send_and_stops_capture(ring: Reader, service: str) -> None:
    assert not outgoing.is_enabled()
    enable()
    assert outgoing.is_enabled() and vars(requests.Session)["send"] is not ORIGINAL_SEND
    outgoing.disable()
    assert not outgoing.is_enabled() and vars(requests.Session)["send"] is ORIGINAL_SEND
    requests.get(f"{service}/items", timeout=TIMEOUT)
    assert captured(ring) == []
    outgoing.disable()  # a second disable changes nothing
    assert vars(requests.Session)["send"] is ORIGINAL_SEND


def test_enable_twice_patches_once_and_the_latest_options_apply(ring: Reader,
                                                                 service: str) -> None:
    enable()
    patched = vars(requests.Session)["send"]
    enable()
    enable(LOG_BODY_OUTGOING=False)
    assert vars(requests.Session)["send"] is patched
    requests.get(f"{service}/items", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.response_body is None


def test_a_patch_installed_on_top_survives_disable(ring: Reader, service: str) -> None:
    enable()
    below = vars(requests.Session)["send"]

    def instrumented_send(session: requests.Session, request: requests.PreparedRequest,
                          **kwargs: Any) -> requests.Response:
        return below(session, request, **kwargs)

    requests.Session.send = instrumented_send  # another library instruments requests
    try:
        outgoing.disable()
        assert vars(requests.Session)["send"] is instrumented_send
        requests.get(f"{service}/items?disabled=1", timeout=TIMEOUT)
        enable()
        requests.get(f"{service}/items?enabled=1", timeout=TIMEOUT)
    finally:
        requests.Session.send = below  # the other library uninstruments
    [call] = captured(ring)
    assert call.uri.endswith("enabled=1")


def test_enable_reinstalls_after_another_library_put_the_original_back(ring: Reader,
                                                                        service: str) -> None:
    enable()
    requests.Session.send = ORIGINAL_SEND  # e.g. a library restoring what it saw before us
    requests.get(f"{service}/items?restored=1", timeout=TIMEOUT)
    enable()
    requests.get(f"{service}/items?enabled=1", timeout=TIMEOUT)
    [call] = captured(ring)
    assert call.uri.endswith("enabled=1")


def test_concurrent_calls_from_threads_each_make_one_record(ring: Reader, service: str) -> None:
    enable()
    shared = requests.Session()
    failures: list[BaseException] = []

    def call_many(thread_number: int) -> None:
        own = requests.Session()
        try:
            for number in range(25):
                session = shared if number % 2 else own
                reply = session.get(f"{service}/items?t={thread_number}&n={number}",
                                    timeout=TIMEOUT)
                assert reply.json() == ITEMS
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=call_many, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    uris = [call.uri for call in captured(ring)]
    assert sorted(uris) == sorted(f"{service}/items?t={t}&n={n}"
                                  for t in range(8) for n in range(25))


# --- under the Django middleware --------------------------------------------------------------


def call_service(request: HttpRequest) -> JsonResponse:
    reply = requests.get(request.GET["target"], timeout=TIMEOUT)
    return JsonResponse({"service_status": reply.status_code, "items": reply.json()["items"]})


urlpatterns = [path("call", call_service)]


def test_a_view_calling_a_service_makes_one_incoming_and_one_outgoing_record(
        ring: Reader, service: str) -> None:
    middleware_options = {**BASE_OPTIONS, "RESPONSE_BODY_MASKS": ["secret"]}
    target = f"{service}/items?from=view"
    with override_settings(MOESIF_MIDDLEWARE=middleware_options, ROOT_URLCONF=__name__):
        # The middleware enables capture itself once it is wired to CAPTURE_OUTGOING_REQUESTS;
        # enabling here too is harmless (idempotent).
        outgoing.enable(settings.load(middleware_options))
        response = Client().get("/call", {"target": target})
    assert response.status_code == 200
    assert response.json() == {"service_status": 200, "items": ITEMS["items"]}

    calls = {call.direction: call for call in captured(ring)}
    assert sorted(calls) == ["Incoming", "Outgoing"]
    assert calls["Incoming"].uri.startswith("http://testserver/call?target=")
    assert (calls["Outgoing"].verb, calls["Outgoing"].uri) == ("GET", target)
    event = EventBuilder(settings.load(middleware_options)).build(calls["Outgoing"])
    assert event["response"]["body"] == {"items": ITEMS["items"]}
