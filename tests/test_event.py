"""CapturedCall → Moesif event (`moesif_fast.event`): every rule of the reference's §1.4 and §2,
the corrected weak points, the event's JSON text (JSON bodies copied as sent) and the batch. The
record decoding in front of it (`moesif_fast.record.decode`) is tested in test_record.py."""

from __future__ import annotations

import base64
import contextlib
import datetime
import decimal
import gzip
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesif_fast.event import (
    PIECE_BYTES,
    BatchWriter,
    EventBuilder,
    EventDropped,
    json_safe,
    serialize_batch,
)
from moesif_fast.record import CapturedCall, header_columns
from moesif_fast.settings import MoesifOptions

T0_NS = 1_795_510_036_321_000_000  # 2026-11-24T08:47:16.321 UTC
TX = "93889631-9a82-4595-bd6d-f210bf44c915"
EVENT_KEYS = ["request", "response", "session_token", "tags", "user_id", "company_id",
              "metadata", "direction", "weight", "blocked_by", "transaction_id"]
REQUEST_KEYS = ["time", "uri", "verb", "headers", "api_version", "ip_address", "body",
                "transfer_encoding"]
RESPONSE_KEYS = ["time", "status", "headers", "body", "ip_address", "transfer_encoding"]


def make_call(**fields: Any) -> CapturedCall:
    """A CapturedCall of the defaults below and `fields`, request_headers given as pairs."""
    defaults: dict[str, Any] = {
        "direction": "Incoming",
        "request_time_ns": T0_NS,
        "response_time_ns": T0_NS + 1_000_000,
        "verb": "POST",
        "uri": "http://api.example.com/echo?x=1",
        "request_headers": (),
        "remote_addr": "10.9.8.7",
        "request_body": None,
        "status": 200,
        "response_headers": (),
        "response_body": None,
        "transaction_id": None,
        "user_id": None,
        "company_id": None,
        "session_token": None,
        "metadata": None,
        "weight": 1,
        "blocked_by": None,
    }
    call = {**defaults, **fields}
    return CapturedCall(**{**call, "request_headers": header_columns(call["request_headers"])})


def build(call: CapturedCall, **options: Any) -> dict[str, Any]:
    return EventBuilder(MoesifOptions(**options)).build(call)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def jwt(payload: dict[str, Any]) -> str:
    """A JWT-shaped token whose payload is URL-safe base64 without padding, as real JWTs are."""
    segment = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"hdr.{segment}.sig"


# --- shape -----------------------------------------------------------------------------------


def test_reference_example_event() -> None:
    """The captured example of §1.4, field by field."""
    call = make_call(
        request_headers=(
            ("HTTP_COOKIE", ""),
            ("CONTENT_LENGTH", "68"),
            ("CONTENT_TYPE", "application/json"),
            ("HTTP_AUTHORIZATION",
             "Bearer hdr.eyJzdWIiOiAiand0LXVzZXItNyIsICJFbWFpbCI6ICJhQGIifQ.sig"),
            ("HTTP_X_FORWARDED_FOR", "unknown, 203.0.113.9:8080, 10.0.0.1"),
            ("HTTP_HOST", "api.example.com"),
            ("HTTP_X_CUSTOM", "hidden"),
        ),
        request_body=b'{"a": 1, "password": "x", "inner": [{"b": 2, "password": "y"}]}',
        response_headers=(("Content-Type", "application/json"), ("x-moesif-transaction-id", TX)),
        response_body=b'{"ok": true, "password": "p", "nested": {"keep": 2, "secret": 1}}',
        transaction_id=TX,
    )
    event = build(call, REQUEST_BODY_MASKS=["password"], RESPONSE_BODY_MASKS=["secret"],
                  REQUEST_HEADER_MASKS=["X-Custom"], API_VERSION="1.2.3")
    assert event["request"] == {
        "time": "2026-11-24T08:47:16.321",
        "uri": "http://api.example.com/echo?x=1",
        "verb": "POST",
        "headers": {
            "cookie": "",
            "content-length": "68",
            "content-type": "application/json",
            "authorization":
                "Bearer hdr.eyJzdWIiOiAiand0LXVzZXItNyIsICJFbWFpbCI6ICJhQGIifQ.sig",
            "x-forwarded-for": "unknown, 203.0.113.9:8080, 10.0.0.1",
            "host": "api.example.com",
            "X-MOESIF-TRANSACTION-ID": TX,
        },
        "api_version": "1.2.3",
        "ip_address": "203.0.113.9",
        "body": {"a": 1, "inner": [{"b": 2}]},
        "transfer_encoding": "json",
    }
    assert event["response"] == {
        "time": "2026-11-24T08:47:16.322",
        "status": 200,
        "headers": {"Content-Type": "application/json", "x-moesif-transaction-id": TX},
        "body": {"ok": True, "password": "p", "nested": {"keep": 2}},
        "ip_address": None,
        "transfer_encoding": "json",
    }
    assert event["user_id"] == "jwt-user-7"
    assert event["transaction_id"] == TX


def test_keys_in_wire_order_and_always_present() -> None:
    event = build(make_call())
    assert list(event) == EVENT_KEYS
    assert list(event["request"]) == REQUEST_KEYS
    assert list(event["response"]) == RESPONSE_KEYS
    sent = json.loads(serialize_batch([EventBuilder(MoesifOptions()).encode(make_call())]))[0]
    assert list(sent) == EVENT_KEYS
    assert list(sent["request"]) == REQUEST_KEYS
    assert list(sent["response"]) == RESPONSE_KEYS


def test_plain_fields() -> None:
    call = make_call(verb="PATCH", uri="https://h/p?q=1", status=418, weight=3,
                     session_token="sess", company_id=77, metadata={"plan": "pro"},
                     user_id="u-1")
    event = build(call, API_VERSION="2.0")
    assert event["request"]["verb"] == "PATCH"
    assert event["request"]["uri"] == "https://h/p?q=1"
    assert event["request"]["api_version"] == "2.0"
    assert event["response"]["status"] == 418
    assert event["response"]["ip_address"] is None
    assert event["weight"] == 3
    assert event["session_token"] == "sess"
    assert event["company_id"] == 77
    assert event["metadata"] == {"plan": "pro"}
    assert event["user_id"] == "u-1"
    assert event["direction"] == "Incoming"
    assert event["tags"] is None
    assert event["blocked_by"] is None


def test_api_version_defaults_to_null() -> None:
    assert build(make_call())["request"]["api_version"] is None


def test_transaction_id_is_the_calls_when_set() -> None:
    assert build(make_call(transaction_id=TX))["transaction_id"] == TX


def test_transaction_id_is_a_fresh_uuid4_otherwise() -> None:
    builder = EventBuilder(MoesifOptions())
    first = builder.build(make_call())["transaction_id"]
    second = builder.build(make_call())["transaction_id"]
    assert first != second
    assert uuid.UUID(first).version == 4
    assert uuid.UUID(second).version == 4


def test_unknown_direction_is_dropped() -> None:
    with pytest.raises(EventDropped) as dropped:
        build(make_call(direction="Sideways"))
    assert dropped.value.reason == "unknown direction"


# --- headers ---------------------------------------------------------------------------------

META_HEADERS = (("HTTP_X_API_KEY", "k"), ("CONTENT_TYPE", "application/json"),
                ("CONTENT_LENGTH", "2"), ("HTTP_USER_AGENT", "curl"))


@pytest.mark.parametrize(
    ("masks", "transaction_id", "expected"),
    [
        pytest.param(None, None, {"X-API-KEY": "k", "CONTENT-TYPE": "application/json",
                                  "CONTENT-LENGTH": "2", "USER-AGENT": "curl"},
                     id="no-masks-upper-dashed"),
        pytest.param(None, TX, {"X-API-KEY": "k", "CONTENT-TYPE": "application/json",
                                "CONTENT-LENGTH": "2", "USER-AGENT": "curl",
                                "X-MOESIF-TRANSACTION-ID": TX},
                     id="no-masks-transaction"),
        pytest.param([], None, {"x-api-key": "k", "content-type": "application/json",
                                "content-length": "2", "user-agent": "curl"},
                     id="empty-mask-list-lowercases"),
        pytest.param(["X-Api-KEY", "user-agent"], None,
                     {"content-type": "application/json", "content-length": "2"},
                     id="masks-case-insensitive"),
        pytest.param(["x-api-key"], TX, {"content-type": "application/json",
                                         "content-length": "2", "user-agent": "curl",
                                         "X-MOESIF-TRANSACTION-ID": TX},
                     id="masks-transaction-key-stays-upper"),
        pytest.param(["X-Moesif-Transaction-Id"], TX,
                     {"x-api-key": "k", "content-type": "application/json",
                      "content-length": "2", "user-agent": "curl",
                      "X-MOESIF-TRANSACTION-ID": TX},
                     id="transaction-key-is-never-masked"),
    ],
)
def test_incoming_request_headers(
    masks: list[str] | None, transaction_id: str | None, expected: dict[str, str]
) -> None:
    call = make_call(request_headers=META_HEADERS, transaction_id=transaction_id)
    headers = build(call, REQUEST_HEADER_MASKS=masks)["request"]["headers"]
    assert headers == expected
    assert list(headers) == list(expected)


@pytest.mark.parametrize(
    ("masks", "expected"),
    [
        pytest.param(None, {"X-MOESIF-TRANSACTION-ID": TX}, id="no-masks"),
        pytest.param([], {"x-moesif-transaction-id": TX, "X-MOESIF-TRANSACTION-ID": TX},
                     id="masks-keep-the-clients-header-too"),
    ],
)
def test_client_supplied_transaction_header(
    masks: list[str] | None, expected: dict[str, str]
) -> None:
    call = make_call(request_headers=(("HTTP_X_MOESIF_TRANSACTION_ID", TX),),
                     transaction_id=TX)
    assert build(call, REQUEST_HEADER_MASKS=masks)["request"]["headers"] == expected


@pytest.mark.parametrize(
    ("masks", "expected"),
    [
        pytest.param(None, {"X-Api-Key": "k", "Accept": "*/*"}, id="names-kept"),
        pytest.param(["x-api-key"], {"accept": "*/*"}, id="masks-apply-to-outgoing"),
    ],
)
def test_outgoing_request_headers(masks: list[str] | None, expected: dict[str, str]) -> None:
    call = make_call(direction="Outgoing", request_headers=(("X-Api-Key", "k"),
                                                            ("Accept", "*/*")))
    assert build(call, REQUEST_HEADER_MASKS=masks)["request"]["headers"] == expected


@pytest.mark.parametrize(
    ("masks", "expected"),
    [
        pytest.param(None, {"Content-Type": "text/plain", "X-Secret": "s",
                            "x-moesif-transaction-id": TX}, id="case-kept"),
        pytest.param([], {"content-type": "text/plain", "x-secret": "s",
                          "x-moesif-transaction-id": TX}, id="empty-list-lowercases"),
        pytest.param(["x-SECRET"], {"content-type": "text/plain",
                                    "x-moesif-transaction-id": TX}, id="masked"),
    ],
)
def test_response_headers(masks: list[str] | None, expected: dict[str, str]) -> None:
    call = make_call(response_headers=(("Content-Type", "text/plain"), ("X-Secret", "s"),
                                       ("x-moesif-transaction-id", TX)))
    assert build(call, RESPONSE_HEADER_MASKS=masks)["response"]["headers"] == expected


# --- bodies ----------------------------------------------------------------------------------

JSON_GZIP = (("HTTP_CONTENT_ENCODING", "gzip"),)
BOMB = gz(b"\0" * 1_000_000)


@pytest.mark.parametrize(
    ("raw", "headers", "options", "expected_body", "expected_encoding"),
    [
        pytest.param(b'{"a": 1, "b": [true, null]}', (), {}, {"a": 1, "b": [True, None]},
                     "json", id="json-object"),
        pytest.param(b'[1, "two", {"three": 3}]', (), {}, [1, "two", {"three": 3}], "json",
                     id="json-array"),
        pytest.param(b"hello world", (), {}, "aGVsbG8gd29ybGQ=", "base64", id="text"),
        pytest.param(b"\x00\xff\x10\x80", (), {}, b64(b"\x00\xff\x10\x80"), "base64",
                     id="binary"),
        pytest.param(b"42", (), {}, b64(b"42"), "base64", id="json-scalar-is-not-detected"),
        pytest.param(b' {"a": 1}', (), {}, b64(b' {"a": 1}'), "base64",
                     id="leading-space-not-stripped"),
        pytest.param(b"{not json", (), {}, b64(b"{not json"), "base64", id="bad-json"),
        pytest.param(b"[NaN, Infinity]", (), {}, b64(b"[NaN, Infinity]"), "base64",
                     id="nan-literal-is-not-json"),
        pytest.param(b'{"a": "\xff"}', (), {}, b64(b'{"a": "\xff"}'), "base64",
                     id="not-utf8"),
        pytest.param(b"[" * 5_000 + b"]" * 5_000, (), {}, b64(b"[" * 5_000 + b"]" * 5_000),
                     "base64", id="json-too-deep-to-parse"),
        pytest.param(b'{"password": "p", "user": {"password": 1, "Password": 2},'
                     b' "list": [{"password": 3, "keep": [{"password": 4, "x": 5}]}]}',
                     (), {"REQUEST_BODY_MASKS": ["password"]},
                     {"user": {"Password": 2}, "list": [{"keep": [{"x": 5}]}]}, "json",
                     id="body-masks-nested-in-lists-case-sensitive"),
        pytest.param(b'{"a": 1}', (), {"REQUEST_BODY_MASKS": []}, {"a": 1}, "json",
                     id="empty-body-mask-list"),
        pytest.param(gz(b'{"a": 1}'), JSON_GZIP, {}, b64(b'{"a": 1}'), "base64",
                     id="gzip-decompressed-then-base64"),
        pytest.param(gz(b"ab") + gz(b"cd"),
                     (("HTTP_CONTENT_ENCODING", "x-GZIP"),), {}, b64(b"abcd"), "base64",
                     id="gzip-multi-member"),
        pytest.param(gz(b""), JSON_GZIP, {}, None, None, id="gzip-of-nothing"),
        pytest.param(b"not gzip at all", JSON_GZIP, {}, b64(b"not gzip at all"), "base64",
                     id="bad-gzip-raw-base64"),
        pytest.param(gz(b"abcdef")[:-5], JSON_GZIP, {},
                     b64(gz(b"abcdef")[:-5]), "base64", id="truncated-gzip"),
        pytest.param(gz(b'{"a": 1}'), JSON_GZIP,
                     {"REQUEST_HEADER_MASKS": ["content-encoding"]},
                     b64(gz(b'{"a": 1}')), "base64",
                     id="masked-content-encoding-stays-compressed"),
        pytest.param(b"", (), {}, None, None, id="empty"),
        pytest.param(None, (), {}, None, None, id="none-streaming-or-not-logged"),
        pytest.param(250_000, (), {},
                     {"msg": "request body of 250000 bytes not captured: it is larger than "
                             "MAX_BODY_SIZE (100000 bytes)"}, "json", id="oversized-marker"),
        pytest.param(BOMB, JSON_GZIP, {},
                     {"msg": "request body not captured: it decompresses to more than "
                             "MAX_BODY_SIZE (100000 bytes)"}, "json", id="gzip-bomb"),
        pytest.param(gz(b"x" * 100_000), JSON_GZIP, {}, b64(b"x" * 100_000),
                     "base64", id="gzip-exactly-at-the-limit"),
    ],
)
def test_request_body(
    raw: bytes | int | None,
    headers: tuple[tuple[str, str], ...],
    options: dict[str, Any],
    expected_body: Any,
    expected_encoding: str | None,
) -> None:
    event = build(make_call(request_headers=headers, request_body=raw), **options)
    assert event["request"]["body"] == expected_body
    assert event["request"]["transfer_encoding"] == expected_encoding


@pytest.mark.parametrize(
    ("raw", "headers", "expected_body", "expected_encoding"),
    [
        pytest.param(b'{"secret": 1, "ok": true}', (), {"ok": True}, "json", id="json-masked"),
        pytest.param(b"plain", (), b64(b"plain"), "base64", id="text"),
        pytest.param(gz(b"zipped"), (("Content-Encoding", "gzip"),), b64(b"zipped"),
                     "base64", id="gzip"),
        pytest.param(None, (), None, None, id="streaming"),
        pytest.param(5_000_000, (), {"msg": "response body of 5000000 bytes not captured: it "
                                            "is larger than MAX_BODY_SIZE (100000 bytes)"},
                     "json", id="oversized-marker"),
    ],
)
def test_response_body(
    raw: bytes | int | None,
    headers: tuple[tuple[str, str], ...],
    expected_body: Any,
    expected_encoding: str | None,
) -> None:
    event = build(make_call(response_headers=headers, response_body=raw),
                  RESPONSE_BODY_MASKS=["secret"])
    assert event["response"]["body"] == expected_body
    assert event["response"]["transfer_encoding"] == expected_encoding


def test_body_masks_apply_to_outgoing_calls() -> None:
    call = make_call(direction="Outgoing", request_body=b'{"token": "t", "q": 1}')
    assert build(call, REQUEST_BODY_MASKS=["token"])["request"]["body"] == {"q": 1}


def test_marker_uses_the_configured_limit() -> None:
    event = build(make_call(request_body=2_000), MAX_BODY_SIZE=1_000)
    assert event["request"]["body"] == {
        "msg": "request body of 2000 bytes not captured: it is larger than MAX_BODY_SIZE "
               "(1000 bytes)"}


# --- client IP -------------------------------------------------------------------------------

IP_HEADERS = ["HTTP_X_CLIENT_IP", "HTTP_X_FORWARDED_FOR", "HTTP_CF_CONNECTING_IP",
              "HTTP_TRUE_CLIENT_IP", "HTTP_X_REAL_IP", "HTTP_X_CLUSTER_CLIENT_IP",
              "HTTP_X_FORWARDED", "HTTP_FORWARDED_FOR", "HTTP_FORWARDED"]


@pytest.mark.parametrize("position", range(len(IP_HEADERS)), ids=IP_HEADERS)
def test_ip_header_precedence(position: int) -> None:
    """Each header wins over every header after it in §2.4's order, and loses to those before."""
    headers = tuple((name, f"192.0.2.{index + 1}")
                    for index, name in enumerate(IP_HEADERS) if index >= position)
    event = build(make_call(request_headers=headers))
    assert event["request"]["ip_address"] == f"192.0.2.{position + 1}"


@pytest.mark.parametrize(
    ("headers", "remote_addr", "expected"),
    [
        pytest.param((), "10.9.8.7", "10.9.8.7", id="remote-addr-fallback"),
        pytest.param((), None, None, id="nothing-known"),
        pytest.param((("HTTP_X_FORWARDED_FOR", "unknown, 203.0.113.9:8080, 10.0.0.1"),),
                     "10.9.8.7", "203.0.113.9", id="xff-unknown-and-port"),
        pytest.param((("HTTP_X_FORWARDED_FOR", "2001:db8::1, 10.0.0.1"),), "10.9.8.7",
                     "2001:db8::1", id="xff-ipv6-whole"),
        pytest.param((("HTTP_X_FORWARDED_FOR", "[2001:db8::1]:443, 198.51.100.2"),),
                     "10.9.8.7", "198.51.100.2", id="xff-bracketed-v6-skipped"),
        pytest.param((("HTTP_X_FORWARDED_FOR", "abcd"), ("HTTP_CF_CONNECTING_IP", "198.51.100.3")),
                     "10.9.8.7", "198.51.100.3", id="xff-abcd-falls-through-to-next-header"),
        pytest.param((("HTTP_X_FORWARDED_FOR", "abcd"),), "10.9.8.7", "10.9.8.7",
                     id="xff-abcd-falls-through-to-remote-addr"),
        pytest.param((("HTTP_X_FORWARDED_FOR", "unknown, unknown"),
                      ("HTTP_X_REAL_IP", "2001:db8::5")),
                     "10.9.8.7", "2001:db8::5", id="xff-all-unknown"),
        pytest.param((("HTTP_X_CLIENT_IP", "not-an-ip"), ("HTTP_X_REAL_IP", " 198.51.100.4 ")),
                     "10.9.8.7", "198.51.100.4", id="invalid-skipped-whitespace-stripped"),
        pytest.param((("HTTP_X_CLIENT_IP", "1.2.3.4, 5.6.7.8"),), "10.9.8.7", "10.9.8.7",
                     id="list-only-understood-in-xff"),
        pytest.param((("HTTP_FORWARDED", "for=192.0.2.60;proto=http"),), "10.9.8.7",
                     "10.9.8.7", id="rfc7239-forwarded-never-qualifies"),
        pytest.param((("HTTP_X_REAL_IP", ""),), "10.9.8.7", "10.9.8.7", id="empty-header"),
    ],
)
def test_client_ip(
    headers: tuple[tuple[str, str], ...], remote_addr: str | None, expected: str | None
) -> None:
    event = build(make_call(request_headers=headers, remote_addr=remote_addr))
    assert event["request"]["ip_address"] == expected


def test_ip_headers_read_before_masks() -> None:
    call = make_call(request_headers=(("HTTP_X_REAL_IP", "198.51.100.9"),))
    assert build(call, REQUEST_HEADER_MASKS=["x-real-ip"])["request"]["ip_address"] == (
        "198.51.100.9")


def test_outgoing_calls_have_no_client_ip() -> None:
    call = make_call(direction="Outgoing", remote_addr=None,
                     request_headers=(("X-Real-IP", "198.51.100.9"),))
    assert build(call)["request"]["ip_address"] is None


# --- user id ---------------------------------------------------------------------------------

URL_SAFE_TOKEN = jwt({"sub": "jwt-user~~~>>>???"})
URL_SAFE_SEGMENT = URL_SAFE_TOKEN.split(".")[1]


def test_url_safe_case_really_uses_url_safe_characters() -> None:
    assert "-" in URL_SAFE_SEGMENT
    assert "_" in URL_SAFE_SEGMENT
    assert len(URL_SAFE_SEGMENT) % 4 != 0  # and its padding is missing


def basic(credentials: str) -> str:
    return b64(credentials.encode())


@pytest.mark.parametrize(
    ("headers", "options", "expected"),
    [
        pytest.param((("HTTP_AUTHORIZATION",
                       "Bearer hdr.eyJzdWIiOiAiand0LXVzZXItNyIsICJFbWFpbCI6ICJhQGIifQ.sig"),),
                     {}, "jwt-user-7", id="bearer-standard-base64"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {URL_SAFE_TOKEN}"),), {},
                     "jwt-user~~~>>>???", id="bearer-url-safe-no-padding"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'ab'})}"),), {}, "ab",
                     id="bearer-missing-padding"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer hdr.eyJzdWIiOiJhYiJ9.sig"),), {}, "ab",
                     id="bearer-padding-needed-and-absent"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer hdr.eyJzdWIiOiAiYWJjIn0=.sig"),), {},
                     "abc", id="bearer-with-padding"),
        pytest.param((("HTTP_AUTHORIZATION", f"bearer {jwt({'sub': 'low'})}"),), {}, "low",
                     id="lowercase-bearer"),
        pytest.param((("HTTP_AUTHORIZATION", f"BEARER {jwt({'sub': 'up'})}"),), {}, "up",
                     id="uppercase-bearer"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 42})}"),), {}, "42",
                     id="numeric-sub-as-string"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'SUB': 'upper-key'})}"),), {},
                     "upper-key", id="payload-keys-case-insensitive"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'User_Id': 'cu'})}"),),
                     {"AUTHORIZATION_USER_ID_FIELD": "USER_ID"}, "cu",
                     id="custom-field-case-insensitive"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'email': 'e'})}"),), {}, None,
                     id="field-absent"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': ''})}"),), {}, None,
                     id="empty-sub"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'a'})}, Basic eA=="),), {},
                     "a", id="first-comma-element"),
        pytest.param((("HTTP_AUTHORIZATION", "Basic " + basic("alice:s3cret")),), {}, "alice",
                     id="basic"),
        pytest.param((("HTTP_AUTHORIZATION", "basic " + basic(" bob :pw")),), {}, "bob",
                     id="lowercase-basic-stripped"),
        pytest.param((("HTTP_AUTHORIZATION", "Basic " + basic("nocolon")),), {}, "nocolon",
                     id="basic-without-colon"),
        pytest.param((("HTTP_X_API_KEY", f"Bearer {jwt({'sub': 'from-key'})}"),
                      ("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'from-auth'})}")),
                     {"AUTHORIZATION_HEADER_NAME": "x-api-key, authorization"}, "from-key",
                     id="header-list-first-wins"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'from-auth'})}"),),
                     {"AUTHORIZATION_HEADER_NAME": "x-api-key, authorization"}, "from-auth",
                     id="header-list-second-used"),
        pytest.param((("HTTP_X_API_KEY", ""),
                      ("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'from-auth'})}")),
                     {"AUTHORIZATION_HEADER_NAME": "X-Api-Key,Authorization"}, "from-auth",
                     id="empty-header-skipped"),
        pytest.param((("HTTP_X_TOKEN", jwt({"sub": "custom"})),),
                     {"AUTHORIZATION_HEADER_NAME": "x-token"}, "custom",
                     id="custom-scheme-jwt-without-bearer"),
        pytest.param((("HTTP_X_TOKEN", b64(b'{"sub": "whole"}')),),
                     {"AUTHORIZATION_HEADER_NAME": "x-token"}, "whole",
                     id="custom-scheme-whole-token-base64-json"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer opaque-token"),), {}, None,
                     id="bearer-opaque"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer a.%%%%.c"),), {}, None,
                     id="garbage-payload"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer a.bm90IGpzb24.c"),), {}, None,
                     id="payload-not-json"),
        pytest.param((("HTTP_AUTHORIZATION", f"Bearer a.{b64(b'[1, 2]')}.c"),), {}, None,
                     id="payload-not-an-object"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer a.\u00fc\u00fc\u00fc\u00fc.c"),), {}, None,
                     id="non-ascii"),
        pytest.param((("HTTP_AUTHORIZATION", "Basic !!!"),), {}, None, id="garbage-basic"),
        pytest.param((("HTTP_AUTHORIZATION", "Basic " + b64(b"\xff\xfe:x")),), {}, None,
                     id="basic-not-utf8"),
        pytest.param((("HTTP_AUTHORIZATION", "Bearer"),), {}, None, id="scheme-only"),
        pytest.param((("HTTP_AUTHORIZATION", "   "),), {}, None, id="blank"),
        pytest.param((), {}, None, id="no-header"),
    ],
)
def test_user_id_from_headers(
    headers: tuple[tuple[str, str], ...], options: dict[str, Any], expected: str | None
) -> None:
    assert build(make_call(request_headers=headers), **options)["user_id"] == expected


@pytest.mark.parametrize("identified", ["u-1", 42, {"id": 7}, ""], ids=repr)
def test_identified_user_id_kept_as_is(identified: Any) -> None:
    call = make_call(user_id=identified, request_headers=(
        ("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'from-jwt'})}"),))
    assert build(call)["user_id"] == identified


def test_user_id_read_before_header_masks() -> None:
    call = make_call(request_headers=(("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': 'm'})}"),))
    event = build(call, REQUEST_HEADER_MASKS=["Authorization"])
    assert event["user_id"] == "m"
    assert event["request"]["headers"] == {}


def test_outgoing_authorization_is_not_a_user() -> None:
    call = make_call(direction="Outgoing",
                     request_headers=(("Authorization", f"Bearer {jwt({'sub': 'svc'})}"),))
    assert build(call)["user_id"] is None


def test_user_id_cache_does_not_mix_tokens() -> None:
    builder = EventBuilder(MoesifOptions())
    for name in ["a", "b", "a", "c", "b"]:
        call = make_call(request_headers=(("HTTP_AUTHORIZATION", f"Bearer {jwt({'sub': name})}"),))
        assert builder.build(call)["user_id"] == name


# --- times -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "time_ns", "expected"),
    [
        pytest.param("Incoming", T0_NS, "2026-11-24T08:47:16.321", id="incoming-ms"),
        pytest.param("Incoming", T0_NS + 999_999, "2026-11-24T08:47:16.321",
                     id="incoming-truncated"),
        pytest.param("Incoming", 0, "1970-01-01T00:00:00.000", id="epoch"),
        pytest.param("Incoming", 1_000_000_000 * 86_399 + 999_000_000, "1970-01-01T23:59:59.999",
                     id="end-of-day"),
        pytest.param("Outgoing", T0_NS + 123_456, "2026-11-24T08:47:16.321123", id="outgoing-us"),
        pytest.param("Outgoing", T0_NS - 321_000_000, "2026-11-24T08:47:16.000000",
                     id="outgoing-whole-second-keeps-digits"),
    ],
)
def test_times(direction: str, time_ns: int, expected: str) -> None:
    event = build(make_call(direction=direction, request_time_ns=time_ns,
                            response_time_ns=time_ns))
    assert event["request"]["time"] == expected
    assert event["response"]["time"] == expected


def test_times_across_seconds_with_one_builder() -> None:
    builder = EventBuilder(MoesifOptions())
    for offset_s in [0, 1, 0, 3600, 1]:
        call = make_call(request_time_ns=T0_NS + offset_s * 1_000_000_000,
                         response_time_ns=T0_NS)
        expected = (datetime.datetime(2026, 11, 24, 8, 47, 16, 321_000)
                    + datetime.timedelta(seconds=offset_s))
        assert builder.build(call)["request"]["time"] == expected.isoformat(
            timespec="milliseconds")


def test_time_out_of_range_is_dropped() -> None:
    with pytest.raises(EventDropped) as dropped:
        build(make_call(request_time_ns=10**30))
    assert dropped.value.reason == "time out of range"


# --- MASK_EVENT_MODEL ------------------------------------------------------------------------


def test_mask_event_model_sees_the_reference_attributes_and_its_changes_are_sent() -> None:
    seen: dict[str, Any] = {}

    def mask(event: Any) -> Any:
        seen["request"] = {name: getattr(event.request, name) for name in REQUEST_KEYS}
        seen["response"] = {name: getattr(event.response, name) for name in RESPONSE_KEYS}
        seen["tail"] = {name: getattr(event, name) for name in EVENT_KEYS[2:]}
        event.request.body["card"] = "****"
        del event.request.headers["X-CARD"]
        event.response.headers["X-Added"] = "1"
        event.response.body = None
        event.metadata = {"masked": True}
        return event

    call = make_call(request_headers=(("HTTP_X_CARD", "4111"), ("CONTENT_TYPE", "a/b")),
                     request_body=b'{"card": "4111", "amount": 5}', response_body=b"{}",
                     transaction_id=TX, user_id="u")
    event = build(call, MASK_EVENT_MODEL=mask, API_VERSION="v")
    assert seen["request"]["api_version"] == "v"
    assert seen["request"]["ip_address"] == "10.9.8.7"
    assert seen["request"]["transfer_encoding"] == "json"
    assert seen["tail"]["user_id"] == "u"
    assert seen["tail"]["transaction_id"] == TX
    assert event["request"]["body"] == {"card": "****", "amount": 5}
    assert event["request"]["headers"] == {"CONTENT-TYPE": "a/b", "X-MOESIF-TRANSACTION-ID": TX}
    assert event["response"]["headers"] == {"X-Added": "1"}
    assert event["response"]["body"] is None
    assert event["metadata"] == {"masked": True}
    assert list(event) == EVENT_KEYS
    assert list(event["request"]) == REQUEST_KEYS
    assert list(event["response"]) == RESPONSE_KEYS


def test_mask_event_model_may_return_a_dict_of_the_event_shape() -> None:
    def to_dict(event: Any) -> dict[str, Any]:
        result = {name: getattr(event, name) for name in EVENT_KEYS}
        result["request"] = dict(vars(event.request), body="replaced")
        result["response"] = dict(vars(event.response))
        return result

    event = build(make_call(request_body=b"secret"), MASK_EVENT_MODEL=to_dict)
    assert event["request"]["body"] == "replaced"
    assert list(event) == EVENT_KEYS


def _raises(event: Any) -> Any:
    raise RuntimeError("callback bug")


def _returns_none(event: Any) -> Any:
    event.request.body = "masked"
    return None


def _drops_response(event: Any) -> Any:
    del event.response
    return event


@pytest.mark.parametrize(
    ("callback", "reason"),
    [
        pytest.param(_raises, "MASK_EVENT_MODEL raised", id="raises"),
        pytest.param(_returns_none, "MASK_EVENT_MODEL returned no event", id="returns-none"),
        pytest.param(lambda event: 42, "MASK_EVENT_MODEL returned no event", id="returns-int"),
        pytest.param(lambda event: {"request": {}}, "MASK_EVENT_MODEL returned no event",
                     id="returns-partial-dict"),
        pytest.param(_drops_response, "MASK_EVENT_MODEL returned no event",
                     id="attribute-removed"),
    ],
)
def test_mask_event_model_failure_drops_the_event(callback: Any, reason: str) -> None:
    with pytest.raises(EventDropped) as dropped:
        build(make_call(request_body=b'{"password": "p"}'), MASK_EVENT_MODEL=callback)
    assert dropped.value.reason == reason


# --- serialize_batch -------------------------------------------------------------------------


def test_serialize_batch_is_the_json_array_of_its_events() -> None:
    events = [b'{"a":1}', b'{"b":[2]}', b'{}', b'{"c":"d"}']
    for count in range(len(events) + 1):
        assert serialize_batch(events[:count]) == b"[" + b",".join(events[:count]) + b"]"
    assert events == [b'{"a":1}', b'{"b":[2]}', b'{}', b'{"c":"d"}']  # left as they were


def written_batch(writer: BatchWriter, calls: list[CapturedCall]) -> tuple[list[bytes], int]:
    """The pieces `writer` hands over for `calls` (copied: their memory is reused), and its
    count of events."""
    pieces: list[bytes] = []
    writer.start(lambda piece: pieces.append(bytes(piece)))
    for call in calls:
        with contextlib.suppress(EventDropped):
            writer.add(call)
    writer.finish()
    return pieces, writer.count


BODY_SIZES = [[], [10], [PIECE_BYTES * 3], [100] * 3_000, [PIECE_BYTES // 3] * 7,
              [5, PIECE_BYTES * 2, 5, 5] * 3, [PIECE_BYTES - 700, PIECE_BYTES - 600] * 3]


@pytest.mark.parametrize("sizes", BODY_SIZES)
@pytest.mark.parametrize("masks", [{}, {"REQUEST_BODY_MASKS": ["x"]}])
def test_batch_writer_hands_over_the_array_in_pieces_of_at_most_piece_bytes(
        sizes: list[int], masks: dict[str, Any]) -> None:
    """What the loop gzips: the same bytes as the events encoded one by one, joined, in pieces
    no longer than PIECE_BYTES but for an event longer than that, handed over whole. With body
    masks the events take the Python path, which the writer copies into its piece."""
    builder = EventBuilder(MoesifOptions(**masks))
    calls = [make_call(transaction_id=f"tx-{number}", response_body=b"r" * size,
                       request_body=json.dumps({"x": number}).encode())
             for number, size in enumerate(sizes)]
    events = [builder.encode(call) for call in calls]

    pieces, count = written_batch(BatchWriter(builder), calls)

    assert b"".join(pieces) == serialize_batch(events)
    assert count == len(calls)
    assert [len(piece) for piece in pieces if len(piece) > PIECE_BYTES] == [
        len(event) + 1 for event in events if len(event) + 1 > PIECE_BYTES]
    assert len(pieces) <= 2 + sum(map(len, events)) // (PIECE_BYTES // 2)  # no tiny pieces


def test_batch_writer_leaves_out_dropped_events_and_is_reused() -> None:
    """A call whose event is dropped (EventDropped) writes nothing: not even its comma; the
    next batch of the same writer starts afresh."""
    builder = EventBuilder(MoesifOptions())
    good = [make_call(transaction_id=f"tx-{number}") for number in range(3)]
    dropped = make_call(direction="Sideways")
    writer = BatchWriter(builder)

    pieces, count = written_batch(writer, [dropped, good[0], dropped, good[1], good[2], dropped])
    assert (b"".join(pieces), count) == (serialize_batch([builder.encode(call) for call in good]),
                                         3)
    pieces, count = written_batch(writer, [good[2]])
    assert (b"".join(pieces), count) == (serialize_batch([builder.encode(good[2])]), 1)
    assert written_batch(writer, [dropped]) == ([b"[]"], 0)
    assert written_batch(writer, []) == ([b"[]"], 0)


def strict_loads(data: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise AssertionError(f"{name} literal in output")

    return json.loads(data, parse_constant=no_constants)


def sent_the_old_way(event: dict[str, Any]) -> Any:
    """What reached the collector for `event` before events were written as JSON text: the
    event object encoded, or its JSON-safe copy when it held a value JSON cannot carry."""
    try:
        text = json.dumps(event, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(json_safe(event), allow_nan=False)
    return strict_loads(text)


def sent(call: CapturedCall, **options: Any) -> tuple[Any, Any, bytes]:
    """(what `encode` sends, parsed; what the event of `build` sent, parsed; the batch)."""
    builder = EventBuilder(MoesifOptions(**options))
    data = serialize_batch([builder.encode(call)])
    return strict_loads(data)[0], sent_the_old_way(builder.build(call)), data


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


CYCLE: list[Any] = []
CYCLE.append(CYCLE)
DEEP: Any = "bottom"
for _ in range(2_000):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        pytest.param({"at": datetime.datetime(2026, 1, 2, 3, 4, 5, 6)},
                     {"at": "2026-01-02T03:04:05.000006"}, id="datetime"),
        pytest.param({"on": datetime.date(2026, 1, 2)}, {"on": "2026-01-02"}, id="date"),
        pytest.param({"price": decimal.Decimal("12.3400")}, {"price": "12.3400"}, id="decimal"),
        pytest.param({"d": decimal.Decimal("NaN")}, {"d": None}, id="decimal-nan"),
        pytest.param({"b": b"text"}, {"b": "text"}, id="utf8-bytes"),
        pytest.param({"b": b"\xff\x00"}, {"b": "/wA="}, id="binary-bytes"),
        pytest.param({"x": math.nan, "y": math.inf, "z": -math.inf, "ok": 1.5},
                     {"x": None, "y": None, "z": None, "ok": 1.5}, id="nan-infinity"),
        pytest.param({"s": {3}, "t": (1, 2), "f": frozenset()}, {"s": [3], "t": [1, 2], "f": []},
                     id="sets-tuples"),
        pytest.param({(1, 2): "tuple-key", 3: "int-key"}, {"(1, 2)": "tuple-key", "3": "int-key"},
                     id="non-string-keys"),
        pytest.param({"u": uuid.UUID(int=1)}, {"u": "00000000-0000-0000-0000-000000000001"},
                     id="other-object-str"),
        pytest.param({"o": Unprintable()}, {"o": "<unprintable Unprintable>"}, id="unprintable"),
        pytest.param({"n": 1 << 20_000}, {"n": hex(1 << 20_000)}, id="int-too-long-for-decimal"),
        pytest.param(CYCLE, ["<circular reference>"], id="cycle"),
    ],
)
def test_serialize_batch_makes_only_the_bad_event_safe(metadata: Any, expected: Any) -> None:
    builder = EventBuilder(MoesifOptions())
    good_call = make_call(metadata={"n": 1}, transaction_id=TX, response_body=b'{"ok": 1}')
    good = builder.build(good_call)
    encoded_good = builder.encode(good_call)
    bad = builder.encode(make_call(metadata=metadata, transaction_id=TX,
                                   response_body=b'{"ok": 1}'))
    parsed = strict_loads(serialize_batch([encoded_good, bad, encoded_good]))
    assert parsed[0] == good
    assert parsed[2] == good
    assert parsed[1]["metadata"] == expected
    assert {key: value for key, value in parsed[1].items() if key != "metadata"} == {
        key: value for key, value in good.items() if key != "metadata"}
    assert list(parsed[1]) == EVENT_KEYS


def test_serialize_batch_cuts_nesting_too_deep_for_json() -> None:
    event = EventBuilder(MoesifOptions()).encode(make_call(metadata=DEEP))
    metadata = strict_loads(serialize_batch([event]))[0]["metadata"]
    depth = 0
    while isinstance(metadata, list):
        metadata = metadata[0]
        depth += 1
    assert metadata.startswith("<nested deeper than")
    assert 100 < depth < 1_000


def test_serialize_batch_is_compact_ascii_json() -> None:
    call = make_call(metadata={"name": "J\u00fcrgen \ud800"}, transaction_id=TX,
                     request_headers=(("HTTP_X_NAME", "J\u00fcrgen \"q\" \\ \x7f"),),
                     response_body=b"\xff binary")
    data = serialize_batch([EventBuilder(MoesifOptions()).encode(call)])
    assert data.isascii()
    assert b", " not in data
    assert b": " not in data
    assert strict_loads(data) == [build(call)]


def test_serialize_empty_batch() -> None:
    assert serialize_batch([]) == b"[]"


# --- JSON bodies copied as sent --------------------------------------------------------------

JSON_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["", "\\", '"', "\x00\x1f\x7f", "\u2028\u2029", "\U0001f600", "</script>",
                       '"},"status":999,"x":{"', "\\u0000"])
)
JSON_DOCUMENTS = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=25,
).map(lambda value: value if isinstance(value, list | dict) else [value])
RAW_LITERALS = st.sampled_from([
    "1E2", "-0", "-0.0", "1e-400", "1.7976931348623157e308", "0.1000000000000000055511151231257827",
    "123456789012345678901234567890", "5e-324", '"\\u00e9\\/\\ud83d\\ude00"', '"\\ud800"',
    '"\u00e9"', "[]", "{}", "[ ]", "{ }", "[[[]]]", '{"a":1,"a":2}', "true", "null",
])


def _written(document: Any, ensure_ascii: bool, indent: int | str | None,
             separators: tuple[str, str] | None, trailing: str) -> bytes:
    return (json.dumps(document, ensure_ascii=ensure_ascii, indent=indent,
                       separators=separators) + trailing).encode()


JSON_BODIES = st.builds(
    _written, JSON_DOCUMENTS, st.booleans(), st.sampled_from([None, 0, 2, "\t"]),
    st.sampled_from([None, (",", ":"), (" ,\n", " :\t")]),
    st.sampled_from(["", " ", "\n", "\r\n\t "]),
) | st.lists(RAW_LITERALS, min_size=1, max_size=6).map(
    lambda items: f"[{', '.join(items)}]".encode())


@settings(max_examples=400, deadline=None)
@given(body=JSON_BODIES, side=st.sampled_from(["request", "response"]),
       direction=st.sampled_from(["Incoming", "Outgoing"]))
def test_a_copied_json_body_parses_to_the_value_the_event_had(
    body: bytes, side: str, direction: str
) -> None:
    call = make_call(direction=direction, transaction_id=TX, **{f"{side}_body": body})
    parsed, expected, data = sent(call)
    assert parsed == expected
    assert parsed[side]["transfer_encoding"] == "json"
    if b'"\\ud800"' not in body:  # a lone surrogate escape: parsed and written again
        assert body in data  # copied as sent, not re-encoded


@settings(max_examples=1000, deadline=None)
@given(body=JSON_BODIES, position=st.integers(0, 1 << 16),
       replacement=st.binary(max_size=2) | st.sampled_from(
           [b"\\", b'"', b"\x00", b"\x0b", b"\xed\xa0\x80", b"NaN", b"e999", b"]", b"}", b","]))
def test_a_body_is_copied_only_when_the_events_parser_accepts_it(
    body: bytes, position: int, replacement: bytes
) -> None:
    """A damaged JSON body: whether it is copied as sent or not, the event carries the body
    that parsing it gives, or its base64 when it does not parse (as an object or array from
    its first byte, §2.2)."""
    position %= len(body) + 1
    damaged = body[:position] + replacement + body[position + 1:]
    parsed, expected, _ = sent(make_call(request_body=damaged, transaction_id=TX))
    assert parsed == expected
    try:
        json.loads(damaged.decode(), parse_constant=_no_constants)
        is_json = damaged[:1] in (b"{", b"[")
    except ValueError:
        is_json = False
    assert parsed["request"]["transfer_encoding"] == ("json" if is_json else "base64")


def _no_constants(name: str) -> Any:
    raise ValueError(name)


@pytest.mark.parametrize(
    ("body", "options", "expected_body", "expected_encoding", "copied"),
    [
        pytest.param(b'{"a": [1, 2.5, "\xc3\xa9"]}  ', {}, {"a": [1, 2.5, "\u00e9"]}, "json", True,
                     id="utf8-and-spacing-kept"),
        pytest.param(b"[NaN, Infinity]", {}, b64(b"[NaN, Infinity]"), "base64", False,
                     id="nan-literal-is-base64"),
        pytest.param(b"[-Infinity]", {}, b64(b"[-Infinity]"), "base64", False,
                     id="minus-infinity-literal-is-base64"),
        pytest.param(b'{"a": "\xff"}', {}, b64(b'{"a": "\xff"}'), "base64", False,
                     id="not-utf8-is-base64"),
        pytest.param(b'{"a": "\xed\xa0\x80"}', {}, b64(b'{"a": "\xed\xa0\x80"}'), "base64",
                     False, id="utf8-encoded-surrogate-is-base64"),
        pytest.param(b'{"a": 1} x', {}, b64(b'{"a": 1} x'), "base64", False,
                     id="extra-data-is-base64"),
        pytest.param(b'{"a": 1}\x0c', {}, b64(b'{"a": 1}\x0c'), "base64", False,
                     id="form-feed-is-not-json-whitespace"),
        pytest.param(b'["a\tb"]', {}, b64(b'["a\tb"]'), "base64", False,
                     id="raw-control-character-in-string-is-base64"),
        pytest.param(b"[1e400, -1e999, 2]", {}, [None, None, 2], "json", False,
                     id="float-overflow-sent-as-null-as-before"),
        pytest.param(b'{"keep": 1, "secret": {"secret": 2, "x": 3}}',
                     {"REQUEST_BODY_MASKS": ["secret"]}, {"keep": 1}, "json", False,
                     id="masked-keys-removed-not-copied"),
        pytest.param(b'{"keep": 1, "secret": 2}', {"RESPONSE_BODY_MASKS": ["secret"]},
                     {"keep": 1, "secret": 2}, "json", True,
                     id="masks-of-the-other-side-still-copy"),
        pytest.param(b'{"a": 1, "a": 2}', {}, {"a": 2}, "json", True,
                     id="duplicate-keys-last-wins-as-parsed"),
        pytest.param(b"[" * 300 + b"]" * 300, {}, json.loads(b"[" * 300 + b"]" * 300), "json",
                     True, id="nested-300-deep-kept-whole"),
        pytest.param(b"[" * 450 + b"{}, " * 449 + b"{}" + b"]" * 450, {},
                     json.loads(b"[" * 450 + b"{}, " * 449 + b"{}" + b"]" * 450), "json", False,
                     id="900-containers-parsed-and-written-again"),
        pytest.param(b'["\\ud800", 1]', {}, ["\ud800", 1], "json", False,
                     id="lone-surrogate-escape-parsed-and-written-again"),
        pytest.param(b'{"x": "\\"}, \\"status\\": 999, \\"body\\": {"}', {},
                     {"x": '"}, "status": 999, "body": {'}, "json", True,
                     id="text-that-looks-like-event-structure"),
    ],
)
def test_json_body_edge_cases(
    body: bytes, options: dict[str, Any], expected_body: Any, expected_encoding: str,
    copied: bool,
) -> None:
    parsed, expected, data = sent(make_call(request_body=body, transaction_id=TX), **options)
    assert parsed == expected
    assert parsed["request"]["body"] == expected_body
    assert parsed["request"]["transfer_encoding"] == expected_encoding
    assert (body in data) == copied
    assert parsed["response"]["status"] == 200


def test_mask_event_model_sees_the_parsed_body_and_its_change_is_sent() -> None:
    def mask(event: Any) -> Any:
        event.request.body["card"] = "****"
        return event

    call = make_call(request_body=b'{"card": "4111", "n": 1}', transaction_id=TX)
    parsed, expected, data = sent(call, MASK_EVENT_MODEL=mask)
    assert parsed == expected
    assert parsed["request"]["body"] == {"card": "****", "n": 1}
    assert b"4111" not in data


@pytest.mark.parametrize(("metadata", "sent_metadata"),
                         [({"at": datetime.date(2026, 1, 2)}, {"at": "2026-01-02"}),
                          ({"x": math.nan}, {"x": None})], ids=["date", "nan"])
def test_a_value_json_cannot_carry_changes_only_that_value(
    metadata: Any, sent_metadata: Any,
) -> None:
    body = b'{"deep": ' + b"[" * 300 + b"]" * 300 + b', "n": 1}'
    parsed, expected, data = sent(make_call(request_body=body, response_body=b'[1, {"b": 2}]',
                                            metadata=metadata, transaction_id=TX))
    assert parsed["metadata"] == expected["metadata"] == sent_metadata
    assert body in data  # the body is still copied whole (made JSON-safe, it would be cut)
    assert parsed["request"].pop("body") == json.loads(body)
    expected["request"].pop("body")
    assert parsed == expected


def test_an_event_orjson_cannot_write_is_made_safe_with_its_parsed_body() -> None:
    body = b'{"deep": ' + b"[" * 300 + b"]" * 300 + b', "n": 1}'
    parsed, expected, _ = sent(make_call(request_body=body, response_body=b'[1, {"b": 2}]',
                                         metadata=CYCLE, transaction_id=TX))
    assert parsed == expected  # what _json_safe makes of the whole event, the bodies included
    assert parsed["metadata"] == ["<circular reference>"]
    assert parsed["response"]["body"] == [1, {"b": 2}]


# --- property --------------------------------------------------------------------------------

HEADER_KEYS = st.sampled_from([
    "HTTP_AUTHORIZATION", "HTTP_X_API_KEY", "HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP",
    "HTTP_X_CLIENT_IP", "HTTP_CONTENT_ENCODING", "CONTENT_TYPE", "Content-Encoding",
    "HTTP_X_MOESIF_TRANSACTION_ID",
]) | st.text(max_size=20)
HEADER_VALUES = st.sampled_from([
    "gzip", "Bearer a.eyJzdWIiOiJ4In0.c", "Basic YTpi", "unknown, 1.2.3.4:80", "abcd",
    "2001:db8::1", "", "bearer " + jwt({"sub": ["nested"]}),
]) | st.text(max_size=40)
MEANINGFUL_HEADERS = st.sampled_from([
    ("HTTP_AUTHORIZATION", "Bearer " + jwt({"sub": "x"})),
    ("HTTP_AUTHORIZATION", "Basic YTpi"),
    ("HTTP_X_API_KEY", jwt({"SUB": 7})),
    ("HTTP_X_FORWARDED_FOR", "unknown, 1.2.3.4:80"),
    ("HTTP_X_FORWARDED_FOR", "abcd"),
    ("HTTP_X_REAL_IP", "2001:db8::1"),
    ("HTTP_CONTENT_ENCODING", "gzip"),
    ("Content-Encoding", "gzip"),
])
HEADERS = st.lists(MEANINGFUL_HEADERS | st.tuples(HEADER_KEYS, HEADER_VALUES), max_size=8).map(
    tuple)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
BODIES = (
    st.none()
    | st.integers(min_value=0, max_value=10**12)
    | st.binary(max_size=120)
    | JSON_VALUES.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=120).map(gzip.compress)
)
ODD_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=1).map(lambda n: n << 15_000)
    | st.floats() | st.text(max_size=10) | st.binary(max_size=10) | st.datetimes() | st.dates()
    | st.decimals() | st.uuids(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
        | st.frozensets(st.integers() | st.text(max_size=4), max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers() | st.tuples(st.integers()), inner,
                          max_size=4)
    ),
    max_leaves=12,
)
MASKS = st.none() | st.lists(st.sampled_from(["authorization", "Content-Encoding", "a", "sub",
                                              "x-forwarded-for", ""]), max_size=3)


def _identity(event: Any) -> Any:
    return event


OPTIONS = st.builds(
    MoesifOptions,
    REQUEST_HEADER_MASKS=MASKS, RESPONSE_HEADER_MASKS=MASKS,
    REQUEST_BODY_MASKS=MASKS, RESPONSE_BODY_MASKS=MASKS,
    AUTHORIZATION_HEADER_NAME=st.sampled_from(["authorization", "x-api-key, authorization", ","]),
    AUTHORIZATION_USER_ID_FIELD=st.sampled_from(["sub", "SUB", "user_id"]),
    MASK_EVENT_MODEL=st.none() | st.sampled_from([_identity, _raises, _returns_none]),
    MAX_BODY_SIZE=st.integers(min_value=1, max_value=200),
    API_VERSION=st.none() | st.text(max_size=5),
)
CALLS = st.builds(
    CapturedCall,
    direction=st.sampled_from(["Incoming", "Outgoing"]),
    request_time_ns=st.integers(min_value=0, max_value=4 * 10**18) | st.integers(),
    response_time_ns=st.integers(min_value=0, max_value=4 * 10**18),
    verb=st.sampled_from(["GET", "POST"]),
    uri=st.text(max_size=30),
    request_headers=HEADERS.map(header_columns),
    remote_addr=st.none() | st.text(max_size=15),
    request_body=BODIES,
    status=st.integers(min_value=100, max_value=599),
    response_headers=HEADERS,
    response_body=BODIES,
    transaction_id=st.none() | st.text(max_size=40),
    user_id=st.none() | ODD_VALUES,
    company_id=ODD_VALUES,
    session_token=ODD_VALUES,
    metadata=ODD_VALUES,
    weight=st.integers(min_value=1, max_value=100),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=OPTIONS, call=CALLS)
def test_build_and_serialize_never_fail_and_give_the_wire_shape(
    options: MoesifOptions, call: CapturedCall
) -> None:
    builder = EventBuilder(options)
    try:
        event = builder.encode(call)
    except EventDropped:
        return
    good_call = make_call(transaction_id=TX)
    parsed = strict_loads(serialize_batch([event, builder.encode(good_call)]))
    assert parsed[1] == builder.build(good_call)
    sent = parsed[0]
    expected = sent_the_old_way(builder.build(call))
    if not call.transaction_id:  # a fresh uuid4 per event
        expected["transaction_id"] = sent["transaction_id"]
    assert sent == expected
    assert list(sent) == EVENT_KEYS
    assert list(sent["request"]) == REQUEST_KEYS
    assert list(sent["response"]) == RESPONSE_KEYS
    for side in ("request", "response"):
        part = sent[side]
        assert isinstance(part["time"], str)
        assert isinstance(part["headers"], dict)
        assert all(isinstance(value, str) for value in part["headers"].values())
        assert part["transfer_encoding"] in (None, "json", "base64")
        assert (part["body"] is None) == (part["transfer_encoding"] is None)
    assert sent["response"]["ip_address"] is None
    assert sent["direction"] == call.direction
    assert sent["weight"] == call.weight
    assert isinstance(sent["transaction_id"], str)
    assert sent["transaction_id"]
