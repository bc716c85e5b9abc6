"""The compiled event encoder (`moesif_fast._eventjson`) against the Python path it stands in
for: the same bytes as `EventBuilder.encode` for every call it handles, None (the Python path)
for the others, never a crash or a leaked reference; and MOESIF_FAST_PURE_PYTHON=1 keeps it
out. Fuzzed with hypothesis over hostile calls, a few seconds per property."""

from __future__ import annotations

import base64
import contextlib
import gc
import gzip
import importlib.util
import json
import sys
import uuid
import weakref
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pure_python import printed_forced_and_default

from moesif_fast import event as event_module
from moesif_fast.event import BatchWriter, EventBuilder, EventDropped
from moesif_fast.record import (
    CapturedCall,
    EntityUpdate,
    decode,
    encode_call,
    encode_entity,
    header_columns,
)
from moesif_fast.settings import MoesifOptions

BUILT = importlib.util.find_spec("moesif_fast._eventjson") is not None
compiled_only = pytest.mark.skipif(
    event_module._eventjson is None,
    reason="no compiled path to compare: moesif_fast._eventjson is not built (no compiler at "
           "install time) or MOESIF_FAST_PURE_PYTHON=1",
)

T0_NS = 1_795_510_036_321_000_000  # 2026-11-24T08:47:16.321 UTC
TX = "93889631-9a82-4595-bd6d-f210bf44c915"
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


def make_call(**fields: Any) -> CapturedCall:
    """A CapturedCall of the defaults below and `fields`, request_headers given as pairs."""
    call: dict[str, Any] = {
        "direction": "Incoming", "request_time_ns": T0_NS, "response_time_ns": T0_NS + 10**6,
        "verb": "POST", "uri": "http://api.example.com/echo?x=1", "request_headers": (),
        "remote_addr": "10.9.8.7", "request_body": None, "status": 200, "response_headers": (),
        "response_body": None, "transaction_id": TX, "user_id": None, "company_id": None,
        "session_token": None, "metadata": None, "weight": 1, "blocked_by": None,
    }
    call.update(fields)
    return CapturedCall(**{**call, "request_headers": header_columns(call["request_headers"])})


def jwt(payload: dict[str, Any]) -> str:
    segment = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"hdr.{segment}.sig"


class Builders:
    """One builder per path for the same options; `compiled` is the extension's answer."""

    def __init__(self, options: MoesifOptions) -> None:
        self.fast = EventBuilder(options)
        self.pure = EventBuilder(options)
        self.pure._compiled_encode = self.pure._compiled_encode_into = None
        self.pure.compiled_encode_records = None

    def compiled(self, call: CapturedCall) -> bytes | None:
        assert self.fast._compiled_encode is not None
        return self.fast._compiled_encode(call)


def same_as_python(builders: Builders, call: CapturedCall) -> bytes | None:
    """The compiled text, checked against the Python path: equal bytes when it handles the
    call; when it declines (None), whatever the Python path does. Returns the compiled text.
    Events without a transaction id get the same fresh one from both paths."""
    with mock.patch.object(uuid, "uuid4", lambda: uuid.UUID(int=7)):
        try:
            expected = builders.pure.encode(call)
        except EventDropped:
            expected = None
        except Exception:  # a call decode never makes: the compiled path must decline
            expected = None
        text = builders.compiled(call)
        if text is not None:
            assert text == expected
            assert builders.fast.encode(call) == text
            assert written_into_a_piece(builders.fast, call, len(text)) == text
    return text


def written_into_a_piece(builder: EventBuilder, call: CapturedCall, length: int) -> bytes:
    """The text `encode_into` writes for `call` (`length` bytes) after a prefix at offset 3 of
    a piece with just room for it, checking that nothing else of the piece changes, and that
    where it is one byte short the text comes back as bytes and nothing is written."""
    short = bytearray(b"abc" + b"." * length)
    assert builder._compiled_encode_into(call, short, 3, ord(",")) == builder.encode(call)
    assert short == b"abc" + b"." * length
    piece = bytearray(b"abc" + b"." * (length + 1))
    assert builder._compiled_encode_into(call, piece, 3, ord(",")) == len(piece)
    assert piece[:4] == b"abc,"
    return bytes(piece[4:])


# --- the common calls are handled, byte for byte ----------------------------------------------

META = (
    ("HTTP_HOST", "api.example.com"), ("CONTENT_TYPE", "application/json"),
    ("CONTENT_LENGTH", "68"), ("HTTP_USER_AGENT", "curl/8.0"), ("HTTP_ACCEPT", "*/*"),
    ("HTTP_COOKIE", "a=1; b=2"), ("HTTP_X_CUSTOM", "hidden"),
)
JSON_BODY = b'{"a": 1, "list": [true, null, 2.5, -3e-7, "\xc3\xa9\\u00e9\\ud83d\\ude00"]}\n'


@compiled_only
@pytest.mark.parametrize("options", [
    {}, {"REQUEST_HEADER_MASKS": ["X-Custom", "cookie"], "RESPONSE_HEADER_MASKS": []},
    {"API_VERSION": "1.2.3", "MAX_BODY_SIZE": 5},
    {"AUTHORIZATION_HEADER_NAME": "x-api-key, authorization"},
], ids=["defaults", "header-masks", "api-version", "auth-names"])
@pytest.mark.parametrize("call", [
    make_call(request_headers=META, request_body=JSON_BODY, response_body=b"[1, 2]"),
    make_call(request_headers=META, request_body=b"plain text \xff\x00", response_body=b"x"),
    make_call(request_headers=META + (("HTTP_X_FORWARDED_FOR", "unknown, 203.0.113.9:80"),),
              transaction_id=None, response_headers=(("Content-Type", "text/plain"),
                                                     ("x-moesif-transaction-id", TX))),
    make_call(request_headers=META + (("HTTP_AUTHORIZATION", "Bearer " + jwt({"sub": "u-7"})),),
              request_body=250_000, response_body=-1),
    make_call(request_headers=META + (("HTTP_AUTHORIZATION", "Basic dXNlcjpwdw=="),
                                      ("HTTP_X_MOESIF_TRANSACTION_ID", "client-id"),
                                      ("HTTP_X_\u00df_\u212a", "non-ASCII META key"))),
    make_call(direction="Outgoing", request_headers=(("Content-Type", "application/json"),
                                                     ("Authorization", "Bearer x.y.z")),
              request_body=b'{"q": 1}', response_headers=(("Content-Encoding", "gzip"),),
              response_body=b'{"ok": true}', remote_addr=None),
    make_call(request_headers=META + (("HTTP_X_A", "1"), ("HTTP_X-A", "2"), ("HTTP_X_A", "3"),
                                      ("HTTP_CONTENT_TYPE", "text/plain"),
                                      ("HTTP_X_MOESIF_TRANSACTION_ID", "client-id")),
              response_headers=(("A", "1"), ("a", "2"), ("A", "3"), ("Content-Encoding", "br"),
                                ("CONTENT-ENCODING", "identity")),
              request_body=b"[1]", response_body=b"text"),
    make_call(direction="Outgoing", request_headers=(("Accept", "a"), ("ACCEPT", "b"),
                                                     ("Accept", "c"), ("Cookie", "x"),
                                                     ("X-MOESIF-TRANSACTION-ID", "old")),
              response_headers=(("Set-Cookie", "1"), ("set-cookie", "2")), remote_addr=None),
    make_call(user_id="ü-1", company_id=77, session_token="s\n\t\"\\", blocked_by="rule-1",
              metadata={"plan": "pro", "n": [1, 2**64 - 1, -2**63, 1.5e300, float("nan")],
                        "deep": {"a": {"b": [{"c": None}]}}, "ok": False},
              weight=3, status=418, verb="PATCH", uri="https://h/ü?q=\x01"),
], ids=["json", "base64", "forwarded-ip-new-id", "jwt-and-markers", "basic-and-client-id",
        "outgoing", "repeated-names", "outgoing-repeated-names", "callback-values"])
def test_common_calls_are_encoded_in_c_as_python_does(options: dict[str, Any],
                                                       call: CapturedCall) -> None:
    builders = Builders(MoesifOptions(**options))
    for _ in range(2):  # the first time fills the builder's memos, the second reads them
        assert same_as_python(builders, call) is not None


@compiled_only
def test_body_masks_leave_only_json_bodies_of_their_side_to_python() -> None:
    builders = Builders(MoesifOptions(REQUEST_BODY_MASKS=["password"]))
    assert same_as_python(builders, make_call(request_body=b"text", response_body=b"[1]"))
    assert builders.compiled(make_call(request_body=b'{"password": 1}')) is None


@compiled_only
def test_a_call_from_a_real_record_is_encoded_in_c() -> None:
    fields = tuple(make_call(request_headers=META, request_body=JSON_BODY, response_body=b"hi"))
    call = decode(encode_call(fields))
    assert call is not None
    assert same_as_python(Builders(MoesifOptions()), call) is not None


@compiled_only
@pytest.mark.parametrize(("call", "options"), [
    (make_call(request_body=gzip.compress(b"{}"),
               request_headers=(("HTTP_CONTENT_ENCODING", "gzip"),)), {}),
    (make_call(response_body=b"x", response_headers=(("content-encoding", "x-GZip"),)), {}),
    (make_call(request_body=b'{"password": 1}'), {"REQUEST_BODY_MASKS": ["password"]}),
    (make_call(request_body=b"[1e400]"), {}),
    (make_call(request_body=b'["\\ud800"]'), {}),
    (make_call(request_body=b"{not json"), {}),
    (make_call(metadata={"x": 1e-7}), {}),
    (make_call(metadata=[2**64]), {}),
    (make_call(metadata={1: "non-str key"}), {}),
    (make_call(metadata=b"bytes"), {}),
    (make_call(uri="lone \ud800 surrogate"), {}),
    (make_call(direction="Sideways"), {}),
    (make_call(request_time_ns=2**70), {}),
    (make_call(transaction_id=123), {}),
    (make_call()._replace(request_headers=[["HTTP_A"], ["1"]]), {}),
    (make_call()._replace(response_headers=[["A", "1"]]), {}),
    (make_call(request_headers=tuple((f"HTTP_X_{number}", "v") for number in range(128))), {}),
    (make_call(response_headers=tuple((f"X-{number}", "v") for number in range(129))), {}),
], ids=["gzip-request", "gzip-response", "body-masks", "json-number-overflow",
        "json-lone-surrogate-escape", "bad-json", "negative-exponent-float",
        "int-past-64-bits", "non-str-key", "bytes-value", "surrogate", "unknown-direction",
        "time-out-of-range", "odd-transaction-id", "list-columns", "list-pairs",
        "too-many-request-headers", "too-many-response-headers"])
def test_what_c_leaves_to_python(call: CapturedCall, options: dict[str, Any]) -> None:
    builders = Builders(MoesifOptions(**options))
    assert builders.compiled(call) is None
    same_as_python(builders, call)


@compiled_only
@pytest.mark.parametrize("options", [{}, {"REQUEST_HEADER_MASKS": ["x-1"],
                                          "RESPONSE_HEADER_MASKS": ["X-1"]}])
def test_up_to_128_headers_are_encoded_in_c(options: dict[str, Any]) -> None:
    """Many headers (the transaction header is one more), some names repeated: the search for
    repeated names must find them however the hashes fall."""
    builders = Builders(MoesifOptions(**options))
    names = list(enumerate(f"HTTP_X_{number % 90}" for number in range(127)))
    call = make_call(request_headers=tuple((name, str(number)) for number, name in names),
                     response_headers=tuple((name[5:].lower() if number % 3 else name[5:],
                                             str(number)) for number, name in names))
    for _ in range(2):
        assert same_as_python(builders, call) is not None


@compiled_only
def test_memos_filled_and_emptied_while_encoding() -> None:
    """A memo that fills up is emptied (the builder's, by its Python method; the encoder's own,
    of masked names, in C), also in the middle of a call: the bytes stay Python's."""
    builders = Builders(MoesifOptions(REQUEST_HEADER_MASKS=["x-0"], RESPONSE_HEADER_MASKS=[]))
    for memo in (builders.fast._header_names, builders.fast._user_ids):
        memo.update((f"junk {number}", "x") for number in range(1022))
    for round_number in range(12):
        pairs = tuple((f"HTTP_X_{round_number}_{number}", "v") for number in range(100))
        call = make_call(request_headers=pairs + (("HTTP_AUTHORIZATION", f"Basic {round_number}"),),
                         response_headers=tuple((name[5:], "v") for name, _ in pairs))
        assert same_as_python(builders, call) is not None
    assert len(builders.fast._header_names) < 1024


@compiled_only
def test_deep_values_are_left_to_python_past_the_c_limit() -> None:
    builders = Builders(MoesifOptions())
    for depth, handled in ((120, True), (127, True), (128, False), (300, False), (5000, False)):
        value: Any = 1
        for _ in range(depth):
            value = [value]
        assert (same_as_python(builders, make_call(metadata=value)) is not None) == handled


@compiled_only
def test_encode_sends_the_compiled_text_and_falls_back_on_none() -> None:
    call = make_call(request_body=b"text")
    builders = Builders(MoesifOptions())
    builders.fast._compiled_encode = lambda call: b"compiled"
    assert builders.fast.encode(call) == b"compiled"
    builders.fast._compiled_encode = lambda call: None
    assert builders.fast.encode(call) == builders.pure.encode(call)


@compiled_only
def test_encode_into_falls_back_on_none_and_checks_its_piece() -> None:
    call = make_call(request_body=b"text")
    builders = Builders(MoesifOptions())
    piece = bytearray(b"." * 10_000)
    builders.fast._compiled_encode_into = lambda *arguments: 7
    assert builders.fast.encode_into(call, piece, 0, ord("[")) == 7
    builders.fast._compiled_encode_into = lambda *arguments: None
    assert builders.fast.encode_into(call, piece, 0, ord("[")) == builders.pure.encode(call)
    assert piece == b"." * 10_000
    encode_into = Builders(MoesifOptions()).fast._compiled_encode_into
    assert encode_into(make_call(metadata={b"bytes key": 1}), piece, 0, 0) is None
    for arguments, error in [((bytes(piece), 0, 0), TypeError), ((piece, 0.0, 0), TypeError),
                             ((piece, -1, 0), ValueError), ((piece, 10_001, 0), ValueError),
                             ((piece, 0, 256), ValueError), ((piece, 0, -1), ValueError),
                             ((piece, 2**70, 0), OverflowError)]:
        with pytest.raises(error):
            encode_into(call, *arguments)
    with pytest.raises(TypeError):
        encode_into(call, piece, 0)
    assert piece == b"." * 10_000
    assert encode_into(call, piece, 10_000, 0) == builders.pure.encode(call)  # no room at all


def written_by_add_records(builder: EventBuilder, payloads: list[bytes], tag: int
                           ) -> tuple[bytes, list[int], list[tuple[int, Any]]]:
    """The batch the shipper's loop writes from `payloads` (ring positions 0, 1, ...):
    `add_records` first, `add` for what it leaves; the places marked in order, and each record
    left with what add_records answered for it."""
    writer = BatchWriter(builder)
    pieces: list[bytes] = []
    writer.start(lambda piece: pieces.append(bytes(piece)))
    marked: list[int] = []
    left: list[tuple[int, Any]] = []
    count = len(payloads)
    index = 0
    while True:
        index, decoded = writer.add_records(
            payloads, [7] * count, list(range(count)), index,
            lambda lane, position: marked.append(position), tag)
        if index == count:
            break
        left.append((index, decoded))
        call = decode(payloads[index]) if decoded is NotImplemented else decoded
        if isinstance(call, CapturedCall):
            with contextlib.suppress(EventDropped):
                writer.add(call)
        index += 1
    writer.finish()
    return b"".join(pieces), marked, left


def written_by_add(builder: EventBuilder, payloads: list[bytes]) -> bytes:
    writer = BatchWriter(builder)
    pieces: list[bytes] = []
    writer.start(lambda piece: pieces.append(bytes(piece)))
    for payload in payloads:
        call = decode(payload)
        if isinstance(call, CapturedCall):
            with contextlib.suppress(EventDropped):
                writer.add(call)
    writer.finish()
    return b"".join(pieces)


@compiled_only
def test_add_records_writes_the_batch_add_writes_and_leaves_the_others_to_it() -> None:
    def common(number: int, **fields: Any) -> CapturedCall:
        return make_call(request_headers=META, request_body=JSON_BODY,
                         response_body=b'{"n": %d}' % number, transaction_id=f"t-{number}",
                         **fields)

    entity = encode_entity("user", {"user_id": "u-1"})
    tagged, untagged = common(1)._replace(settings_tag=5), common(2)
    other_tag = common(3)._replace(settings_tag=6)
    dropped = make_call(direction="Sideways")  # the Python path drops it
    unproven = make_call(request_body=b"[1e999]")  # a JSON body C does not prove copyable
    metadata = common(7, metadata={"plan": "pro", "seats": [1, 2]})  # decoded in Python
    too_big = make_call(request_body=b"x" * (event_module.PIECE_BYTES + 10))  # past a piece
    calls = {1: tagged, 2: untagged, 3: other_tag, 5: dropped, 6: unproven, 7: metadata,
             8: too_big}
    payloads = [entity if number == 0 else b"F\x00 not a record" if number == 4
                else encode_call(tuple(calls.get(number) or common(number)))
                for number in range(40)]  # the common ones overflow the piece in between
    builders = Builders(MoesifOptions())
    with mock.patch.object(uuid, "uuid4", lambda: uuid.UUID(int=7)):
        written, marked, left = written_by_add_records(builders.fast, payloads, tag=5)
        expected = written_by_add(builders.pure, payloads)
    assert written == expected
    assert len(json.loads(expected)) == 40 - 3  # not the profile update, garbage, dropped
    assert marked == list(range(40))  # each record once, before it is decoded
    assert [index for index, _ in left] == [0, 3, 4, 5, 6]
    assert [decoded for _, decoded in left] == [
        EntityUpdate("user", {"user_id": "u-1"}), other_tag, None, dropped, unproven]
    with mock.patch.object(uuid, "uuid4", lambda: uuid.UUID(int=7)):  # no compiled encoder:
        assert written_by_add_records(builders.pure, payloads, tag=5) == (  # it leaves them all
            expected, [], [(index, NotImplemented) for index in range(40)])


@compiled_only
def test_add_records_raises_what_mark_or_decode_raise_and_checks_its_arguments() -> None:
    payloads = [encode_call(tuple(make_call(request_body=b"text")))] * 3
    places = [0, 0, 0]
    writer = BatchWriter(EventBuilder(MoesifOptions()))
    writer.start(lambda piece: None)

    def refuse(lane: int, position: int) -> None:
        raise OSError("the ring's header is gone")

    with pytest.raises(OSError):
        writer.add_records(payloads, places, places, 0, refuse, 0)
    decoders = writer._decoders
    for writer._decoders in [(lambda payload: 1 / 0, decoders[1]),
                             (lambda payload: NotImplemented, lambda payload: 1 / 0)]:
        with pytest.raises(ZeroDivisionError):
            writer.add_records(payloads, places, places, 0, max, 0)
    writer._decoders = decoders
    assert writer.count == 0
    for lanes, start in [(tuple(places), 0), (places, -1)]:
        with pytest.raises((ValueError, TypeError)):
            writer.add_records(payloads, lanes, places, start, max, 0)
    with pytest.raises(ValueError):  # fewer positions than records, found at the second:
        writer.add_records(payloads, places, places[:1], 0, max, 0)
    assert writer.count == 0  # nothing of a call that raised is in the batch

    def shrink(lane: int, position: int) -> None:  # callbacks may change the lists
        payloads.pop()
        places.pop()

    assert writer.add_records(payloads, places, [0, 0, 0], 0, shrink, 0) == (
        2, NotImplemented)  # the records it held, written; then the list had ended
    assert (writer.count, len(payloads), places) == (2, 1, [0])


@compiled_only
@pytest.mark.parametrize("error", [ValueError, MemoryError, KeyboardInterrupt])
def test_add_records_leaves_a_call_whose_event_raised_and_raises_what_is_no_exception(
        error: type[BaseException]) -> None:
    """As the shipper's `except Exception` around `add`: the record goes back to the loop,
    whose `add` meets the error again and counts it; a KeyboardInterrupt goes through."""
    def failing_header_name(builder: EventBuilder, meta_key: str) -> str:
        raise error("from a callback of the encoder")

    with mock.patch.object(EventBuilder, "_incoming_header_name", failing_header_name):
        writer = BatchWriter(EventBuilder(MoesifOptions()))  # the encoder binds it now
    writer.start(lambda piece: None)
    call = make_call(request_headers=(("HTTP_X_NEW", "1"),))
    payloads = [encode_call(tuple(call))] * 2
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            writer.add_records(payloads, [0, 0], [0, 1], 0, max, 0)
    else:
        assert writer.add_records(payloads, [0, 0], [0, 1], 0, max, 0) == (0, call)
        with pytest.raises(error):
            writer.add(call)
    assert writer.count == 0


@compiled_only
def test_mask_event_model_uses_the_python_path_only() -> None:
    assert EventBuilder(MoesifOptions(MASK_EVENT_MODEL=lambda event: event))._compiled_encode \
        is None


@compiled_only
def test_no_reference_leaks_and_the_builder_is_collected() -> None:
    call = make_call(request_headers=META + (("HTTP_AUTHORIZATION", "Basic dXNlcjpwdw=="),
                                             ("HTTP_X_REAL_IP", "2001:db8::1"),
                                             ("HTTP_COOKIE", "again")),
                     request_body=JSON_BODY, response_body=b"text", transaction_id=None,
                     metadata={"k": ["v", 1, 2.5]},
                     response_headers=(("A", "b"), ("a", "c"), ("Secret", "d")))
    declined = make_call(metadata={"k": ["v", b"bytes"]}, request_headers=META)
    builder = EventBuilder(MoesifOptions(REQUEST_HEADER_MASKS=["cookie"],
                                         RESPONSE_HEADER_MASKS=["secret"]))
    watched = [value for value in (*call, *call.request_headers[0], *call.request_headers[1],
                                   *call.metadata["k"], *declined.metadata["k"])
               if not isinstance(value, int | type(None))]  # not shared singletons
    for _ in range(3):  # fill the memos first
        builder._compiled_encode(call)
    memos = [dict(builder._header_names), dict(builder._user_ids), dict(builder._addresses)]
    before = [sys.getrefcount(value) for value in watched]
    memo_counts = [[sys.getrefcount(value) for value in memo.values()] for memo in memos]
    for _ in range(1000):
        assert builder._compiled_encode(call) is not None
        assert builder._compiled_encode(declined) is None
    assert [sys.getrefcount(value) for value in watched] == before
    assert [[sys.getrefcount(value) for value in memo.values()] for memo in memos] == memo_counts
    reference = weakref.ref(builder)
    del builder
    gc.collect()
    assert reference() is None


# --- fuzzed against the Python path ---------------------------------------------------------

HOSTILE_TEXT = st.text(max_size=12) | st.text(
    st.sampled_from(["\ud800", "\udfff", "\x00", "\x1f", '"', "\\", "\x7f", "\u00e9", "\u2028",
                     "\U0001f600", "a", "Z", "_", "-", "\u212a", "\u0130", "\u00df"]),
    max_size=8)
META_KEYS = st.sampled_from([
    "HTTP_AUTHORIZATION", "HTTP_X_API_KEY", "HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP",
    "HTTP_X_CLIENT_IP", "HTTP_FORWARDED", "HTTP_CONTENT_ENCODING", "CONTENT_TYPE",
    "Content-Encoding", "CONTENT-ENCODING", "HTTP_X_MOESIF_TRANSACTION_ID", "HTTP_", "",
])
HEADER_VALUES = st.sampled_from([
    "gzip", "GZIP, br", "Bearer " + jwt({"sub": "x"}), "Basic YTpi", "unknown, 1.2.3.4:80",
    "abcd", "2001:db8::1", "", "bearer " + jwt({"sub": ["nested"]}), "g\u0130zip", "br",
])
ODD_HEADER_VALUES = st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2)


def headers(text: st.SearchStrategy[str], most: int) -> st.SearchStrategy[tuple]:
    return st.lists(st.tuples(META_KEYS | text, HEADER_VALUES | text), max_size=most).map(tuple)


NUMBERS = st.sampled_from([
    "0", "-0", "1E2", "1e+2", "0.5e-3", "1e-400", "1e-9999", "1e-10000", "1e300", "1e308",
    "1e309", "9.99e299", "0.00001e310", "123456789012345678901234567890", "1" * 299, "1" * 301,
    "18446744073709551616", "-9223372036854775809", "01", "1.", ".5", "-", "1e", "1e+", "+1",
    "5e-324", "2.5e3", "-0.0E-0",
])
STRINGS = st.sampled_from([
    '"\\ud83d\\ude00"', '"\\uD83D\\uDE00"', '"\\ud800"', '"\\udc00"', '"\\ud800\\u0041"',
    '"\\ud800\\n"', '"\\u00e9\\/\\b\\f\\n\\r\\t"', '"\\x"', '"\\u12"', '"\\u0000"', '"a\tb"',
    '"\x7f"', '"\u00e9"', '"\U0001f600"',
])
LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | HOSTILE_TEXT)
JSON_DOCUMENTS = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(HOSTILE_TEXT, inner, max_size=4), max_leaves=20,
).map(lambda value: value if isinstance(value, list | dict) else [value])


def _written(document: Any, ensure_ascii: bool, indent: int | None, trailing: str) -> bytes:
    return (json.dumps(document, ensure_ascii=ensure_ascii, indent=indent) + trailing).encode(
        "utf-8", "surrogatepass")


def _damaged(body: bytes, position: int, replacement: bytes) -> bytes:
    position %= len(body) + 1
    return body[:position] + replacement + body[position + 1:]


JSON_BODIES = (
    st.builds(_written, JSON_DOCUMENTS, st.booleans(), st.sampled_from([None, 0, 2]),
              st.sampled_from(["", " ", "\r\n\t", "\x0c", "\x00", " x"]))
    | st.lists(NUMBERS | STRINGS | st.sampled_from(["true", "null", "[]", "{}", "nul"]),
               min_size=1, max_size=5).map(lambda items: f"[{', '.join(items)}]".encode())
)
BODIES = (
    st.none() | st.just(b"")
    | st.integers() | st.integers(min_value=2**62)
    | st.binary(max_size=80)
    | JSON_BODIES
    | st.builds(_damaged, JSON_BODIES, st.integers(0, 1 << 12), st.binary(max_size=2)
                | st.sampled_from([b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\xff",
                                   b"\x80", b"\xe2\x82", b"NaN", b"]", b"}", b",", b'"']))
    | st.binary(max_size=60).map(gzip.compress)
)


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


CALLBACK_VALUES = st.recursive(
    LEAVES | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.integers(min_value=-2**63 - 2, max_value=-2**63 + 2) | st.binary(max_size=4)
    | st.sampled_from([1e-5, 1e16, 5e-324, -0.0, float("inf")])
    | st.integers(min_value=1, max_value=3).map(lambda number: number << 15_000)
    | st.sampled_from([100, 126, 127, 128, 200, 260]).map(_nested),
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(HOSTILE_TEXT | st.integers(), inner, max_size=4),
    max_leaves=12,
)
MASKS = st.none() | st.lists(st.sampled_from(
    ["authorization", "Content-Encoding", "x-forwarded-for", "X-MOESIF-TRANSACTION-ID", "",
     "\u00df", "host"]), max_size=3)
TIMES = st.integers(min_value=0, max_value=4 * 10**18)


def options(body_masks: st.SearchStrategy[Any], text: st.SearchStrategy[str],
            ) -> st.SearchStrategy[MoesifOptions]:
    return st.builds(
        MoesifOptions,
        REQUEST_HEADER_MASKS=MASKS, RESPONSE_HEADER_MASKS=MASKS,
        REQUEST_BODY_MASKS=body_masks, RESPONSE_BODY_MASKS=body_masks,
        AUTHORIZATION_HEADER_NAME=st.sampled_from(
            ["authorization", "x-api-key, authorization", ",", "x-moesif-transaction-id"]),
        AUTHORIZATION_USER_ID_FIELD=st.sampled_from(["sub", "SUB", "user_id"]),
        MAX_BODY_SIZE=st.integers(min_value=1, max_value=200) | st.just(2**70),
        API_VERSION=st.none() | text,
    )


def calls(directions: st.SearchStrategy[str], text: st.SearchStrategy[str],
          times: st.SearchStrategy[int],
          bodies: st.SearchStrategy[Any], values: st.SearchStrategy[Any],
          numbers: st.SearchStrategy[int]) -> st.SearchStrategy[CapturedCall]:
    return st.builds(
        CapturedCall,
        direction=directions,
        request_time_ns=times, response_time_ns=times,
        verb=st.sampled_from(["GET", "POST"]) | text,
        uri=text,
        request_headers=headers(text, 8).map(header_columns),
        remote_addr=st.none() | st.sampled_from(["10.0.0.1", "::1"]) | text,
        request_body=bodies,
        status=numbers,
        response_headers=headers(text, 5),
        response_body=bodies,
        transaction_id=st.none() | st.just("") | text,
        user_id=st.none() | values,
        company_id=values, session_token=values, metadata=values,
        weight=numbers,
        blocked_by=st.none() | text,
    )


PLAIN_TEXT = st.text(max_size=12)  # no surrogates
PLAIN_LEAVES = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | PLAIN_TEXT
                | st.integers(-10**9, 10**9).map(lambda number: number / 64)
                | st.sampled_from([0.1, -0.0, 1e16, 1.5e300, float("nan"), float("-inf")]))
PLAIN_VALUES = st.recursive(
    PLAIN_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(PLAIN_TEXT, inner, max_size=4),
    max_leaves=12,
)
PLAIN_BODIES = (
    st.none() | st.integers(0, 10**9) | st.binary(max_size=80)
    | st.builds(_written, PLAIN_VALUES.filter(lambda value: isinstance(value, list | dict)),
                st.booleans(), st.sampled_from([None, 2]), st.just(""))
)
# Calls of every kind the compiled path handles, and calls of every kind it may decline.
CALLS = (
    st.tuples(options(st.none(), PLAIN_TEXT),
              calls(st.sampled_from(["Incoming", "Outgoing"]), PLAIN_TEXT, TIMES, PLAIN_BODIES,
                    PLAIN_VALUES, st.integers(100, 599)))
    | st.tuples(options(st.none() | st.just(["a"]), HOSTILE_TEXT),
                calls(st.sampled_from(["Incoming", "Outgoing"]) | HOSTILE_TEXT, HOSTILE_TEXT,
                      TIMES | st.integers(), BODIES, CALLBACK_VALUES, st.integers()))
)


@compiled_only
@FUZZ
@given(options_and_call=CALLS)
def test_fuzzed_calls_give_the_python_bytes_or_none(
    options_and_call: tuple[MoesifOptions, CapturedCall],
) -> None:
    options, call = options_and_call
    same_as_python(Builders(options), call)


@compiled_only
@FUZZ
@given(body=BODIES, side=st.sampled_from(["request_body", "response_body"]),
       direction=st.sampled_from(["Incoming", "Outgoing"]))
def test_fuzzed_bodies_give_the_python_bytes_or_none(body: Any, side: str,
                                                     direction: str) -> None:
    """Bodies alone, so that the JSON check meets many more of them. A body the compiled path
    copies is one orjson accepts."""
    builders = Builders(MoesifOptions())
    text = same_as_python(builders, make_call(direction=direction, **{side: body}))
    if text is not None and isinstance(body, bytes) and body[:1] in (b"{", b"["):
        orjson.loads(body)


@compiled_only
@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from([True, False]) | st.none() | HOSTILE_TEXT
                                | st.integers() | st.binary(max_size=3) | ODD_HEADER_VALUES,
                                st.text(max_size=3) | ODD_HEADER_VALUES), max_size=4),
       shape=st.sampled_from(["columns", "pairs", "lists", "short"]))
def test_calls_decode_never_makes_are_declined_or_equal(pairs: list[tuple[Any, Any]],
                                                        shape: str) -> None:
    """Headers of the wrong types or shapes: no crash, and never other bytes than Python's."""
    columns: Any = header_columns(pairs)
    if shape == "pairs":
        columns = tuple(pairs)
    elif shape == "lists":
        columns = [list(columns[0]), list(columns[1])]
    elif shape == "short":
        columns = (columns[0],)
    call = make_call()._replace(request_headers=columns, response_headers=tuple(pairs))
    same_as_python(Builders(MoesifOptions()), call)


@compiled_only
def test_random_records_decoded_then_encoded() -> None:
    """Whatever decode accepts from random bytes after a valid record's first bytes: no crash,
    and the Python bytes or None."""
    import random

    generator = random.Random(15)
    builders = Builders(MoesifOptions())
    record = encode_call(tuple(make_call(request_headers=META, request_body=JSON_BODY)))
    for _ in range(3000):
        cut = generator.randrange(1, len(record))
        mutated = bytearray(record)
        for _ in range(generator.randrange(1, 4)):
            mutated[generator.randrange(1, len(mutated))] = generator.randrange(256)
        for payload in (bytes(mutated), record[:cut]):
            call = decode(payload)
            if call is not None:
                same_as_python(builders, call)


# --- switching ------------------------------------------------------------------------------

PROBE = (
    "import sys; from moesif_fast import event; from moesif_fast.settings import MoesifOptions;"
    "print(event._eventjson is None, 'moesif_fast._eventjson' in sys.modules,"
    " event.EventBuilder(MoesifOptions())._compiled_encode is None)"
)


@pytest.mark.skipif(not BUILT, reason="moesif_fast._eventjson is not built")
def test_pure_python_environment_variable() -> None:
    assert printed_forced_and_default(PROBE) == (["True", "False", "True"],
                                                 ["False", "True", "False"])
