"""The record of an incoming call packed in C from the live request and response
(`_recordpack.pack_incoming`) against the middleware's Python path, the reference: whenever it
answers, the bytes are the ones the Python path packs from the fields it gathers (`_uri`,
`_meta_headers`, `_response_headers`); whatever it declines, the Python path still runs. And the
compiled transaction ids (`_recordpack.transaction_id`): format, and a fresh sequence in a forked
child."""

from __future__ import annotations

import os
import random
import re
import string

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

import pytest  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.test import RequestFactory  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moesif_fast import middleware  # noqa: E402
from moesif_fast.record import decode, encode_call_safely  # noqa: E402

compiled_only = pytest.mark.skipif(middleware._compiled_incoming is None,
                                   reason="the compiled packer is not built or forced off")
pack_incoming = middleware._compiled_incoming

REQUEST_TIME, RESPONSE_TIME = 1_700_000_000_123_456_789, 1_700_000_000_125_000_000
TRANSACTION_ID = "8c6b5a1e-0000-4000-a000-000000000001"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}")


class Wiring:
    """The two settings the URI depends on, as the middleware holds them."""

    def __init__(self, proxy_ssl_header: bool, forwarded_host: bool) -> None:
        self._proxy_ssl_header = proxy_ssl_header
        self._forwarded_host = forwarded_host

    uri = middleware.MoesifMiddleware._uri


def records(request: HttpRequest, response: HttpResponse, wiring: Wiring,
            callback_results: tuple = ("ada", None, None, {"plan": "pro"}),
            request_body: object = b'{"user": "ada"}', response_body: object = b'{"ok": true}'
            ) -> tuple[bytes | None, bytes | None]:
    """(the compiled record or None, the Python path's record or None when it raises), for
    the same call, with the arguments the middleware passes."""
    method = request.method or ""
    store = getattr(response.headers, "_store", None)
    compiled = pack_incoming(
        request.META, request.path, request.scheme if wiring._proxy_ssl_header else None,
        wiring._forwarded_host, REQUEST_TIME, RESPONSE_TIME, method, request_body,
        response.status_code, store, response_body, TRANSACTION_ID, *callback_results, 1,
        None, 7)
    try:
        python = encode_call_safely((
            "Incoming", REQUEST_TIME, RESPONSE_TIME, method, wiring.uri(request),
            middleware._meta_headers(request.META), request.META.get("REMOTE_ADDR"),
            request_body, response.status_code, middleware._response_headers(response),
            response_body, TRANSACTION_ID, *callback_results, 1, None, 7))
    except Exception:
        python = None
    return compiled, python


def a_response() -> HttpResponse:
    response = HttpResponse(b'{"ok": true}', content_type="application/json", status=201)
    response["X-Request-Id"] = "r-1"
    response["x-moesif-transaction-id"] = TRANSACTION_ID
    return response


COMMON_REQUESTS = {
    "test client (SERVER_NAME, no Host)": lambda: RequestFactory().post(
        "/api/items", b'{"user": "ada"}', content_type="application/json",
        HTTP_AUTHORIZATION="Bearer abc.def.ghi", HTTP_USER_AGENT="curl/8.5"),
    "Host header and a query": lambda: RequestFactory().get(
        "/api/items", {"page": "2", "q": "a b"}, HTTP_HOST="api.example.com:8443"),
    "non-ASCII header values and host": lambda: RequestFactory().get(
        "/v1/items", HTTP_HOST="bücher.example", HTTP_X_NAME="Zoë ✓"),
    "a path Django quotes": lambda: RequestFactory().get("/v1/ünï code"),
    "https on a non-default port": lambda: RequestFactory().get(
        "/", secure=True, SERVER_PORT="8443"),
    "https on its default port": lambda: RequestFactory().get("/", secure=True,
                                                              SERVER_PORT="443"),
    "twenty headers": lambda: RequestFactory().get(
        "/", **{f"HTTP_X_HEADER_{number}": str(number) for number in range(20)}),
    "forwarded host": lambda: RequestFactory().get(
        "/x", HTTP_HOST="internal:8000", HTTP_X_FORWARDED_HOST="api.example.com"),
}


@compiled_only
@pytest.mark.parametrize("wiring", [Wiring(False, False), Wiring(True, True)],
                         ids=["plain", "proxy-and-forwarded-host"])
@pytest.mark.parametrize("make_request", COMMON_REQUESTS.values(), ids=COMMON_REQUESTS.keys())
def test_a_common_call_is_packed_in_c_as_the_python_path_packs_it(make_request,
                                                                   wiring: Wiring) -> None:
    request = make_request()
    compiled, python = records(request, a_response(), wiring)
    if not middleware._is_plain_path(request.path):
        assert compiled is None  # Django would quote it: the Python path builds the URI
        return
    assert compiled is not None and compiled == python
    call = decode(compiled)
    assert call.uri == wiring.uri(request) and call.transaction_id == TRANSACTION_ID
    assert call.request_headers == middleware._meta_headers(request.META)


@compiled_only
def test_a_request_with_no_headers_at_all_is_packed_in_c() -> None:
    request = RequestFactory().get("/")
    for key in [key for key in request.META if key.startswith("HTTP_")]:
        del request.META[key]
    compiled, python = records(request, HttpResponse(), Wiring(False, False))
    assert compiled is not None and compiled == python
    assert decode(compiled).request_headers == ((), ())


class HostileKey(str):
    """A META key equal to no other whose __eq__ (which a dict lookup of a key with the same
    hash calls), once armed, deletes values, reuses their memory and removes itself."""

    __hash__ = str.__hash__
    meta: dict[str, object] | None = None  # armed when set

    def __eq__(self, other: object) -> bool:
        meta, self.meta = self.meta, None
        if meta is not None:
            for key in ("wsgi.url_scheme", "REMOTE_ADDR", "HTTP_USER_AGENT"):
                meta.pop(key, None)
            self.junk = ["Z" * 40 + str(number) for number in range(2_000)]
            meta.pop(self, None)  # and leaves, so that no later check of META sees it
        return False


@compiled_only
@pytest.mark.parametrize("name", ["HTTP_HOST", "REMOTE_ADDR", "QUERY_STRING", "CONTENT_TYPE"])
def test_a_meta_key_that_is_not_a_str_is_left_to_python(name: str) -> None:
    """A str subclass as a key could run Python code inside a lookup of META while values are
    held: the compiled packer declines before its first lookup."""
    request = RequestFactory().get("/p", HTTP_USER_AGENT="".join(["curl/", "8"]))
    key = HostileKey(name)
    request.META["wsgi.url_scheme"] = "".join(["ht", "tp"])
    request.META[key] = "x"
    key.meta = request.META
    assert pack_incoming(
        request.META, request.path, None, False, REQUEST_TIME, RESPONSE_TIME, "GET", None, 200,
        {}, None, TRANSACTION_ID, None, None, None, None, 1, None, 7) is None


@compiled_only
@pytest.mark.parametrize("scheme", ["https", "https\x00", "http"])
@pytest.mark.parametrize("port", ["443", "80", "8443", ""])
def test_the_default_port_is_left_out_exactly_as_in_python(scheme: str, port: str) -> None:
    request = RequestFactory().get("/", SERVER_PORT=port)
    request.META["wsgi.url_scheme"] = scheme
    compiled, python = records(request, HttpResponse(), Wiring(False, False))
    assert compiled is not None and compiled == python


@compiled_only
def test_the_response_header_store_is_read_as_django_keeps_it() -> None:
    response = a_response()
    response["Set-Cookie"] = "a=1"
    compiled, python = records(RequestFactory().get("/"), response, Wiring(False, False))
    assert compiled == python
    assert decode(compiled).response_headers == (
        ("Content-Type", "application/json"), ("X-Request-Id", "r-1"),
        ("x-moesif-transaction-id", TRANSACTION_ID), ("Set-Cookie", "a=1"))


URL_TEXT = st.sampled_from(string.punctuation + " aZ0é\x7f\x00☃")
PLAIN_URL_TEXT = st.sampled_from(string.ascii_letters + string.digits + "_.~/:@&+$,!*'()-=")
TEXT = st.text(max_size=12) | st.text(st.characters(codec="ascii"), max_size=12)
ODD_VALUES = st.none() | st.integers() | st.lists(st.integers(), max_size=2) | \
    st.binary(max_size=4) | st.builds(object)
# Mostly what the compiled packer takes, and some of every kind it leaves to Python.
HOST_VALUES = st.one_of(*[TEXT] * 8, st.integers(), st.just("\ud800"))


@compiled_only
@settings(max_examples=1_000, deadline=None)
@given(
    headers=st.dictionaries(st.text(string.ascii_uppercase + "_", min_size=1, max_size=8)
                            .map("HTTP_".__add__), TEXT, max_size=6),
    odd_value=st.sampled_from([None] * 4 + ["value"]).flatmap(
        lambda odd: st.none() if odd is None else ODD_VALUES.map(lambda value: [value])),
    host=st.none() | HOST_VALUES, forwarded=st.none() | HOST_VALUES,
    server=st.none() | st.tuples(HOST_VALUES,
                                 HOST_VALUES | st.sampled_from(["80", "443", "8", "", "0443"])),
    scheme=st.sampled_from(["http", "https"] * 4 + ["", None, 1, "https\x00"]),
    path=st.one_of(*[st.text(PLAIN_URL_TEXT, max_size=8).map("/".__add__)] * 3,
                   st.text(URL_TEXT, max_size=6).map("/".__add__)),
    query=st.one_of(st.sampled_from([None, "", "a=1&b=2", 3]),
                    *[st.text(PLAIN_URL_TEXT, max_size=6)] * 2, st.text(URL_TEXT, max_size=4)),
    content=st.sampled_from([(), ("CONTENT_TYPE",), ("CONTENT_LENGTH",),
                             ("CONTENT_TYPE", "CONTENT_LENGTH")]),
    odd_key=st.sampled_from([None] * 8 + [1, ("HTTP_X",)]),
    wiring=st.builds(Wiring, st.booleans(), st.booleans()),
    response_headers=st.lists(st.tuples(st.text(string.ascii_letters, min_size=1, max_size=6),
                                        st.text(string.printable.strip(), max_size=6)),
                              max_size=4),
    plain_store=st.sampled_from([True] * 4 + [False]),
    user_id=st.one_of(st.none(), TEXT, TEXT, TEXT, st.integers(-2**70, 2**70),
                      st.sets(st.integers(), max_size=2)),
    request_body=st.none() | st.binary(max_size=20) | st.integers(0, 2**40),
)
def test_any_request_packs_as_the_python_path_packs_it_or_is_left_to_it(
        headers, odd_value, host, forwarded, server, scheme, path, query, content, odd_key, wiring,
        response_headers, plain_store, user_id, request_body) -> None:
    request = RequestFactory().get("/")
    meta = request.META
    for key in [key for key in meta if key.startswith("HTTP_") or key.startswith("SERVER_")]:
        del meta[key]
    meta.update(headers)
    if odd_value is not None:
        meta["HTTP_ODD"] = odd_value[0]
    for key, value in (("HTTP_HOST", host), ("HTTP_X_FORWARDED_HOST", forwarded)):
        if value is not None:
            meta[key] = value
    if server is not None:
        meta["SERVER_NAME"], meta["SERVER_PORT"] = server
    if scheme is None:
        del meta["wsgi.url_scheme"]
    else:
        meta["wsgi.url_scheme"] = scheme
    request.path = path
    if query is None:
        meta.pop("QUERY_STRING", None)
    else:
        meta["QUERY_STRING"] = query
    for key in content:
        meta[key] = "7" if key == "CONTENT_LENGTH" else "text/plain"
    if odd_key is not None:
        meta[odd_key] = "x"
    response = HttpResponse()
    for name, value in response_headers:
        response[name] = value
    if not plain_store:
        response.headers._store = type("Store", (dict,), {})(response.headers._store)
    try:
        compiled, python = records(request, response, wiring, (user_id, None, None, None),
                                   request_body=request_body)
    except Exception:  # request.scheme under the proxy setting, in Python: the same error
        return
    if python is None:
        assert compiled is None  # the Python path cannot build it: the C one must not answer
    else:
        assert compiled is None or compiled == python


@compiled_only
def test_transaction_ids_are_random_uuid4_strings() -> None:
    ids = [middleware._compiled_transaction_id() for _ in range(20_000)]
    assert all(UUID4.fullmatch(transaction_id) for transaction_id in ids)
    assert len(set(ids)) == len(ids)
    digits = "".join(transaction_id.replace("-", "")[:12] for transaction_id in ids)
    shares = [digits.count(digit) / len(digits) for digit in "0123456789abcdef"]
    assert min(shares) > 0.055 and max(shares) < 0.07  # 1/16 each (0.0625 ± 0.0005)


GENERATORS = {"compiled": middleware._compiled_transaction_id,
              "python": middleware.new_transaction_id}


@pytest.mark.parametrize("generator", GENERATORS.values(), ids=GENERATORS.keys())
def test_a_forked_child_draws_other_transaction_ids_than_its_parent(generator) -> None:
    """Without the reseed after fork, a child would repeat its parent's next ids (two gunicorn
    workers forked from one master would send the same ones)."""
    if generator() is None:
        pytest.skip("the compiled generator is not built or forced off")
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.write(writing, " ".join(generator() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        child_ids = pipe.read().split()
    os.waitpid(child, 0)
    parent_ids = [generator() for _ in range(3)]
    assert len(child_ids) == 3 and all(UUID4.fullmatch(item) for item in child_ids)
    assert not set(child_ids) & set(parent_ids)


def test_seeding_random_does_not_repeat_transaction_ids() -> None:
    """An application that calls random.seed() (a test suite, a simulation) must not make its
    requests' transaction ids repeat."""
    ids = []
    for _ in range(2):
        random.seed(7)
        ids.append(middleware._compiled_transaction_id() or middleware.new_transaction_id())
        ids.append(middleware.new_transaction_id())
    assert len(set(ids)) == 4
