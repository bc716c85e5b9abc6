"""CollectorTransport against scripted HTTP servers on 127.0.0.1: delivery, retries, refusal,
proxies from the environment, certificate verification."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import certifi
import pytest

from moesif_fast.shipper import transport as transport_module
from moesif_fast.shipper.transport import CollectorTransport, Outcome, Stop

APPLICATION_ID = "app-id-for-tests"
USER_AGENT = "moesif-fast-tests/1.0"
BATCH_PATH = "/v1/events/batch"
# Small timeouts and waits keep the file fast; tests that need longer waits say so.
FAST_OPTIONS = {"connect_timeout": 1.0, "read_timeout": 2.0, "max_backoff": 0.2}


@dataclass(frozen=True)
class Reply:
    """One scripted answer. status None: close the connection without answering."""

    status: int | None = 201
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    content_length: int | None = None  # more than len(body): the body is cut short, then closed


@dataclass(frozen=True)
class Received:
    """One request as the collector saw it, body already gunzipped."""

    method: str
    path: str
    headers: Message
    body: bytes
    client_port: int
    at: float  # time.monotonic() on arrival


class ScriptedCollector:
    """An HTTP/1.1 server that records every request and answers from a script.

    Replies are used in order; the last one repeats once the script runs out (201 by default).
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self._replies = [Reply()]
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._server = _QuietServer(("127.0.0.1", 0), _Handler)
        self._server.collector = self
        self._scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def base_uri(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, *replies: Reply) -> None:
        with self._changed:
            self._replies = list(replies)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.received) >= count, timeout)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        if handler.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        with self._changed:
            self.received.append(Received(
                handler.command, handler.path, handler.headers, body,
                handler.client_address[1], time.monotonic(),
            ))
            reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]
            self._changed.notify_all()
        if reply.delay:
            self._closing.wait(reply.delay)
        if reply.status is None:
            handler.close_connection = True
            return
        handler.send_response(reply.status)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(reply.content_length or len(reply.body)))
        handler.end_headers()
        handler.wfile.write(reply.body)
        if reply.content_length is not None:
            handler.close_connection = True


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    collector: ScriptedCollector

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that time out leave broken pipes behind; they are expected here."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own
    server: _QuietServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.collector.handle(self)

    def do_POST(self) -> None:  # noqa: N802
        self.server.collector.handle(self)

    def do_CONNECT(self) -> None:  # noqa: N802 (as a proxy: the script answers the tunnel)
        self.server.collector.handle(self)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output clean."""


@pytest.fixture
def collector() -> Iterator[ScriptedCollector]:
    server = ScriptedCollector()
    yield server
    server.close()


@pytest.fixture
def proxy() -> Iterator[ScriptedCollector]:
    """A recording stand-in for a proxy: it answers itself instead of forwarding."""
    server = ScriptedCollector()
    yield server
    server.close()


@pytest.fixture
def proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any proxy variable; the test sets the ones it needs."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def make_transport() -> Iterator[Callable[..., CollectorTransport]]:
    made: list[CollectorTransport] = []

    def make(base_uri: str, **options: float) -> CollectorTransport:
        transport = CollectorTransport(
            base_uri, APPLICATION_ID, user_agent=USER_AGENT, **{**FAST_OPTIONS, **options}
        )
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


def post_batch(
    transport: CollectorTransport,
    payload: bytes = b'[{"request": {}}]',
    *,
    give_up_at: float | None = None,
    stop: Stop | None = None,
) -> Outcome:
    return transport.post(
        BATCH_PATH, gzipped(payload), gzipped=True,
        give_up_at=give_up_at, stop=stop or Stop()
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gzipped(payload: bytes) -> bytes:
    stream = transport_module.GzipStream()
    stream.write(payload)
    return stream.finish()


@pytest.mark.parametrize("compressor", ["new_isal_compressor", "new_zlib_compressor"])
def test_delivers_gzipped_payload_with_collector_headers(collector, make_transport, compressor):
    """ISA-L when installed (the default then), zlib otherwise, fed in pieces as the loop feeds
    them (`BatchWriter`: memory reused once `write` returns): the collector reads either with
    plain `gzip.decompress`."""
    if compressor == "new_isal_compressor":
        pytest.importorskip("isal")
        assert transport_module.new_compressor is transport_module.new_isal_compressor
    collector.answer(Reply(201))
    payload = json.dumps([{"request": {"verb": "GET"}, "response": {"status": 200}}]).encode()
    stream = transport_module.GzipStream(getattr(transport_module, compressor)())
    piece = bytearray(len(payload))
    for start, end in [(0, 1), (1, 20), (20, 20), (20, len(payload))]:
        piece[:end - start] = payload[start:end]
        stream.write(memoryview(piece)[:end - start])
        piece[:] = b"x" * len(piece)

    outcome = make_transport(collector.base_uri).post(
        BATCH_PATH, stream.finish(), gzipped=True, give_up_at=None, stop=Stop())

    assert outcome == Outcome(delivered=True, permanent=False, status=201, attempts=1, error=None)
    [request] = collector.received
    assert (request.method, request.path, request.body) == ("POST", BATCH_PATH, payload)
    assert request.headers["X-Moesif-Application-Id"] == APPLICATION_ID
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.headers["User-Agent"] == USER_AGENT


def test_uncompressed_payload_is_sent_as_is(collector, make_transport):
    transport = make_transport(collector.base_uri)

    outcome = transport.post(
        "/v1/users", b'{"user_id": "u1"}', gzipped=False, give_up_at=None, stop=Stop()
    )

    assert outcome.delivered
    [request] = collector.received
    assert request.body == b'{"user_id": "u1"}'
    assert request.headers["Content-Encoding"] is None


def test_keeps_no_cookies_between_requests(collector, make_transport):
    collector.answer(Reply(201, {"Set-Cookie": "AWSALB=sticky; Path=/"}), Reply(201))
    transport = make_transport(collector.base_uri)

    post_batch(transport)
    post_batch(transport)

    assert [request.headers["Cookie"] for request in collector.received] == [None, None]


def test_returns_config_etag_and_rules_tag_of_the_delivery(collector, make_transport):
    collector.answer(Reply(200, {"X-Moesif-Config-ETag": "etag-7", "X-Moesif-Rules-Tag": "tag-3"}))

    outcome = post_batch(make_transport(collector.base_uri))

    assert (outcome.config_etag, outcome.rules_tag) == ("etag-7", "tag-3")


def test_retries_server_errors_until_delivered(collector, make_transport):
    collector.answer(Reply(503), Reply(503), Reply(201))

    outcome = post_batch(make_transport(collector.base_uri), b"[1, 2, 3]")

    assert (outcome.delivered, outcome.status, outcome.attempts) == (True, 201, 3)
    assert [request.body for request in collector.received] == [b"[1, 2, 3]"] * 3


@pytest.mark.parametrize("failure", [Reply(None), Reply(408), Reply(500), Reply(502)])
def test_retries_dropped_connections_and_transient_statuses(collector, make_transport, failure):
    collector.answer(failure, Reply(201))

    outcome = post_batch(make_transport(collector.base_uri))

    assert (outcome.delivered, outcome.attempts) == (True, 2)


def test_waits_as_long_as_retry_after_asks(collector, make_transport):
    collector.answer(Reply(429, {"Retry-After": "1"}), Reply(201))

    outcome = post_batch(make_transport(collector.base_uri, max_backoff=5.0))

    assert (outcome.delivered, outcome.attempts) == (True, 2)
    first, second = collector.received
    assert second.at - first.at >= 0.9


def test_honours_retry_after_as_http_date(collector, make_transport):
    collector.answer(Reply(503, {"Retry-After": formatdate(time.time() + 2, usegmt=True)}), Reply())

    outcome = post_batch(make_transport(collector.base_uri, max_backoff=5.0))

    assert (outcome.delivered, outcome.attempts) == (True, 2)
    first, second = collector.received
    assert second.at - first.at >= 0.8  # the date has whole seconds: between 1 and 2 s from now


def test_huge_retry_after_is_capped_at_max_backoff(collector, make_transport):
    collector.answer(Reply(429, {"Retry-After": "3600"}), Reply(201))
    started = time.monotonic()

    outcome = post_batch(make_transport(collector.base_uri, max_backoff=0.3))

    assert (outcome.delivered, outcome.attempts) == (True, 2)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "retry_after", ["soon", "-1", "1.5", "Fri, 31 Dec 99999 23:59:59 GMT"]
)
def test_unreadable_retry_after_falls_back_to_backoff(collector, make_transport, retry_after):
    collector.answer(Reply(503, {"Retry-After": retry_after}), Reply(201))

    outcome = post_batch(make_transport(collector.base_uri))

    assert (outcome.delivered, outcome.attempts) == (True, 2)


@pytest.mark.parametrize("status", [400, 401, 403, 413])
def test_client_errors_are_permanent(collector, make_transport, status):
    collector.answer(Reply(status, body=b'{"message": "bad application id"}'))

    outcome = post_batch(make_transport(collector.base_uri))

    assert (outcome.delivered, outcome.permanent, outcome.status) == (False, True, status)
    assert outcome.attempts == 1
    assert str(status) in outcome.error
    assert "bad application id" in outcome.error
    assert len(collector.received) == 1


def test_permanent_refusal_is_logged_with_status_and_body(collector, make_transport, caplog):
    collector.answer(Reply(400, body=b"x" * 1000))

    with caplog.at_level("WARNING", logger="moesif_fast.shipper"):
        post_batch(make_transport(collector.base_uri))

    [record] = caplog.records
    assert "400" in record.getMessage()
    assert "x" * 200 in record.getMessage()
    assert "x" * 201 not in record.getMessage()


def test_redirect_is_not_followed(collector, make_transport):
    collector.answer(Reply(302, {"Location": "https://elsewhere.example/v1/events/batch"}))

    outcome = post_batch(make_transport(collector.base_uri))

    assert (outcome.delivered, outcome.permanent, outcome.status) == (False, True, 302)
    assert "https://elsewhere.example/v1/events/batch" in outcome.error
    assert [request.method for request in collector.received] == ["POST"]


def test_refused_connection_is_retried_until_the_deadline(make_transport, caplog):
    transport = make_transport(f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()

    with caplog.at_level("WARNING", logger="moesif_fast.shipper"):
        outcome = post_batch(transport, give_up_at=started + 1.5)

    assert (outcome.delivered, outcome.permanent, outcome.status) == (False, False, None)
    assert outcome.attempts >= 2
    assert "refused" in outcome.error.lower()
    assert time.monotonic() - started < 4
    assert "gave up" in caplog.text


def test_read_timeout_is_retried(collector, make_transport):
    collector.answer(Reply(201, delay=5.0), Reply(201))

    outcome = post_batch(make_transport(collector.base_uri, read_timeout=0.5))

    assert (outcome.delivered, outcome.attempts) == (True, 2)


def test_truncated_response_is_retried(collector, make_transport):
    collector.answer(Reply(201, body=b'{"status": "o', content_length=100), Reply(201))

    outcome = post_batch(make_transport(collector.base_uri))

    assert (outcome.delivered, outcome.attempts) == (True, 2)


def test_truncated_json_body_is_fetched_again(collector, make_transport):
    collector.answer(Reply(200, body=b'{"sample_rate": 5', content_length=20),
                     Reply(200, body=b'{"sample_rate": 50}'))
    transport = make_transport(collector.base_uri)

    outcome, body = transport.get_json("/v1/config", give_up_at=None, stop=Stop())

    assert (outcome.delivered, outcome.attempts, body) == (True, 2, {"sample_rate": 50})


def test_gives_up_at_once_when_the_next_wait_would_pass_the_deadline(collector, make_transport):
    collector.answer(Reply(503, {"Retry-After": "30"}))
    started = time.monotonic()

    outcome = post_batch(
        make_transport(collector.base_uri, max_backoff=30.0), give_up_at=started + 10
    )

    assert (outcome.delivered, outcome.permanent, outcome.status) == (False, False, 503)
    assert outcome.attempts == 1
    assert time.monotonic() - started < 5


def test_stop_interrupts_a_long_backoff(collector, make_transport):
    collector.answer(Reply(503, {"Retry-After": "60"}))
    transport = make_transport(collector.base_uri, max_backoff=60.0)
    stop = Stop()
    outcomes: list[Outcome] = []
    sender = threading.Thread(target=lambda: outcomes.append(post_batch(transport, stop=stop)))
    sender.start()
    collector.wait_for_requests(1)

    stop.set()
    stopped_at = time.monotonic()
    sender.join(timeout=10)

    assert not sender.is_alive()
    assert time.monotonic() - stopped_at < 3
    [outcome] = outcomes
    assert (outcome.delivered, outcome.permanent, outcome.attempts) == (False, False, 1)


def test_nothing_is_sent_once_stopped_or_past_the_deadline(collector, make_transport):
    transport = make_transport(collector.base_uri)
    stop = Stop()
    stop.set()

    stopped = post_batch(transport, stop=stop)
    too_late = post_batch(transport, give_up_at=time.monotonic() - 1)

    assert (stopped.delivered, stopped.attempts) == (False, 0)
    assert (too_late.delivered, too_late.attempts) == (False, 0)
    assert collector.received == []


@pytest.mark.parametrize(
    ("base_suffix", "path", "expected_path"),
    [
        ("", BATCH_PATH, BATCH_PATH),
        ("/", BATCH_PATH, BATCH_PATH),
        ("/moesif", BATCH_PATH, "/moesif/v1/events/batch"),
        ("/moesif/", BATCH_PATH, "/moesif/v1/events/batch"),
        ("/moesif//", "//v1//events/batch", "/moesif/v1/events/batch"),
    ],
)
def test_joins_base_uri_and_path(collector, make_transport, base_suffix, path, expected_path):
    transport = make_transport(collector.base_uri + base_suffix)

    transport.post(path, b"[]", gzipped=False, give_up_at=None, stop=Stop())

    assert [request.path for request in collector.received] == [expected_path]


def test_concurrent_posts_from_pool_size_threads_are_all_delivered(collector, make_transport):
    transport = make_transport(collector.base_uri, pool_size=4)
    payloads = [json.dumps([{"n": n}]).encode() for n in range(40)]
    outcomes: list[Outcome] = []

    def send(share: list[bytes]) -> None:
        outcomes.extend(post_batch(transport, payload) for payload in share)

    senders = [threading.Thread(target=send, args=(payloads[i::4],)) for i in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=30)

    assert len(outcomes) == 40
    assert all(outcome.delivered for outcome in outcomes)
    assert sorted(request.body for request in collector.received) == sorted(payloads)
    assert len({request.client_port for request in collector.received}) <= 4


def test_never_opens_more_than_pool_size_connections(collector, make_transport):
    collector.answer(Reply(201, delay=0.05))
    transport = make_transport(collector.base_uri, pool_size=2)
    outcomes: list[Outcome] = []

    def send() -> None:
        outcomes.extend(post_batch(transport) for _ in range(3))

    senders = [threading.Thread(target=send) for _ in range(6)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=30)

    assert len(outcomes) == 18 and all(outcome.delivered for outcome in outcomes)
    assert len({request.client_port for request in collector.received}) <= 2


def test_one_connection_serves_successive_requests(collector, make_transport):
    collector.answer(Reply(201), Reply(503, body=b"busy, try again"), Reply(201), Reply(200))
    transport = make_transport(collector.base_uri)

    post_batch(transport)
    post_batch(transport)  # 503 then 201: the error's body is read, the connection kept
    transport.get_json("/v1/config", give_up_at=None, stop=Stop())

    assert len(collector.received) == 4
    assert len({request.client_port for request in collector.received}) == 1


def test_get_json_returns_the_parsed_body(collector, make_transport):
    collector.answer(Reply(200, {"X-Moesif-Config-ETag": "etag-1"}, b'{"sample_rate": 50}'))
    transport = make_transport(collector.base_uri)

    outcome, body = transport.get_json("/v1/config", give_up_at=None, stop=Stop())

    assert (outcome.delivered, outcome.config_etag, body) == (True, "etag-1", {"sample_rate": 50})
    [request] = collector.received
    assert (request.method, request.path, request.body) == ("GET", "/v1/config", b"")
    assert request.headers["X-Moesif-Application-Id"] == APPLICATION_ID


@pytest.mark.parametrize("reply", [Reply(200, body=b"<html>"), Reply(404, body=b"{}")])
def test_get_json_has_no_body_without_a_json_2xx(collector, make_transport, reply):
    collector.answer(reply)
    transport = make_transport(collector.base_uri)

    outcome, body = transport.get_json("/v1/rules", give_up_at=None, stop=Stop())

    assert body is None
    assert outcome.delivered == (reply.status == 200)


@pytest.mark.parametrize(
    "base_uri", ["api.moesif.net", "ftp://api.moesif.net", "http://", "https://x.example/?a=1"]
)
def test_rejects_a_base_uri_that_is_not_an_http_url(base_uri):
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        CollectorTransport(base_uri, APPLICATION_ID, user_agent=USER_AGENT)


# --- proxies from the environment, TLS ---------------------------------------------------------


def test_http_goes_through_the_proxy_named_by_the_environment(
    proxy, proxy_environment, make_transport
):
    proxy_port = proxy.base_uri.rpartition(":")[2]
    proxy_environment.setenv("HTTP_PROXY", f"http://moesif:p%40ss@127.0.0.1:{proxy_port}")
    transport = make_transport("http://collector.test:8080/moesif")  # not resolvable: via proxy

    outcome = post_batch(transport, b"[7]")

    assert outcome.delivered
    [request] = proxy.received
    assert request.path == "http://collector.test:8080/moesif/v1/events/batch"  # absolute form
    assert request.body == b"[7]"
    assert request.headers["Host"] == "collector.test:8080"
    assert request.headers["X-Moesif-Application-Id"] == APPLICATION_ID
    credentials = base64.b64encode(b"moesif:p@ss").decode()
    assert request.headers["Proxy-Authorization"] == f"Basic {credentials}"


def test_https_is_tunnelled_through_the_proxy(proxy, proxy_environment, make_transport):
    proxy.answer(Reply(403))  # the tunnel is refused: no TLS server is needed behind it
    proxy_environment.setenv("HTTPS_PROXY", proxy.base_uri)
    transport = make_transport("https://collector.test")

    outcome = post_batch(transport, give_up_at=time.monotonic() + 0.5)

    assert (outcome.delivered, outcome.permanent, outcome.status) == (False, False, None)
    assert "403" in outcome.error
    assert {(request.method, request.path) for request in proxy.received} == {
        ("CONNECT", "collector.test:443")
    }


def test_no_proxy_is_respected(collector, proxy, proxy_environment, make_transport):
    proxy_environment.setenv("HTTP_PROXY", proxy.base_uri)
    proxy_environment.setenv("NO_PROXY", "localhost,127.0.0.1")

    outcome = post_batch(make_transport(collector.base_uri))

    assert outcome.delivered
    assert (len(collector.received), len(proxy.received)) == (1, 0)


def test_proxy_variables_set_after_the_transport_is_built_are_ignored(
    collector, proxy, proxy_environment, make_transport
):
    transport = make_transport(collector.base_uri)
    proxy_environment.setenv("HTTP_PROXY", proxy.base_uri)

    outcome = post_batch(transport)

    assert outcome.delivered
    assert (len(collector.received), len(proxy.received)) == (1, 0)


@pytest.mark.parametrize("proxy_url", ["ftp://127.0.0.1:2121", "http://:3128"])
def test_an_unusable_proxy_makes_requests_fail_for_good(
    proxy_environment, make_transport, caplog, proxy_url
):
    proxy_environment.setenv("HTTPS_PROXY", proxy_url)

    with caplog.at_level("WARNING", logger="moesif_fast.shipper"):
        outcome = post_batch(make_transport("https://collector.test"))

    assert (outcome.delivered, outcome.permanent, outcome.attempts) == (False, True, 1)
    assert "proxy" in outcome.error
    assert "refused for good" in caplog.text


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_collector(self_signed: tuple[Path, Path]) -> Iterator[ScriptedCollector]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    server = ScriptedCollector(tls=context)
    yield server
    server.close()


def test_certificates_are_verified_against_certifis_bundle(
    tls_collector, self_signed, make_transport, monkeypatch
):
    unknown_issuer = post_batch(
        make_transport(tls_collector.base_uri), give_up_at=time.monotonic() + 0.5
    )
    monkeypatch.setattr(certifi, "where", lambda: str(self_signed[0]))
    trusted_issuer = post_batch(
        make_transport(tls_collector.base_uri), give_up_at=time.monotonic() + 5
    )

    assert (unknown_issuer.delivered, unknown_issuer.permanent) == (False, False)
    assert "CERTIFICATE_VERIFY_FAILED" in unknown_issuer.error
    assert (trusted_issuer.delivered, trusted_issuer.attempts) == (True, 1)
    assert len(tls_collector.received) == 1


def test_a_closed_transport_sends_on_new_connections(collector, make_transport):
    """`close` closes the pooled connections: a request made afterwards opens a new one."""
    transport = make_transport(collector.base_uri)
    post_batch(transport)

    transport.close()
    outcome = post_batch(transport, give_up_at=time.monotonic() + 1)

    assert (outcome.delivered, outcome.attempts) == (True, 1)
    assert len({request.client_port for request in collector.received}) == 2
