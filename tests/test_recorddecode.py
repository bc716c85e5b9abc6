"""The compiled record decoder (`moesif_fast._recorddecode`) against the Python path it stands
in for: the same CapturedCall as `record.decode` for every common call record, NotImplemented
(the Python path) for the others, never a crash or a leaked reference; and
MOESIF_FAST_PURE_PYTHON=1 keeps it out. Fuzzed with hypothesis, a few seconds in all."""

from __future__ import annotations

import gc
import importlib.util
import random
import struct
import sys
import tracemalloc
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pure_python import printed_forced_and_default

from moesif_fast import record
from moesif_fast.record import (
    CALL_V4,
    CapturedCall,
    EntityUpdate,
    decode,
    encode_call,
    encode_call_safely,
    encode_entity,
    header_columns,
)

BUILT = importlib.util.find_spec("moesif_fast._recorddecode") is not None
compiled_only = pytest.mark.skipif(
    record.compiled_decode is None,
    reason="no compiled path to compare: moesif_fast._recorddecode is not built (no compiler "
           "at install time) or MOESIF_FAST_PURE_PYTHON=1",
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

T0_NS = 1_795_510_036_321_000_000
TX = "93889631-9a82-4595-bd6d-f210bf44c915"
META = (
    ("HTTP_HOST", "api.example.com"), ("CONTENT_TYPE", "application/json"),
    ("CONTENT_LENGTH", "68"), ("HTTP_USER_AGENT", "curl/8.0"), ("HTTP_ACCEPT", "*/*"),
    ("HTTP_COOKIE", "a=1; b=2"), ("HTTP_X_CUSTOM", "hidden"),
)


def make_fields(**fields: Any) -> tuple:
    """A record's fields in wire order: the defaults below and `fields`, request_headers given
    as pairs."""
    call: dict[str, Any] = {
        "direction": "Incoming", "request_time_ns": T0_NS, "response_time_ns": T0_NS + 10**6,
        "verb": "POST", "uri": "http://api.example.com/echo?x=1", "request_headers": META,
        "remote_addr": "10.9.8.7", "request_body": b'{"a": 1}', "status": 201,
        "response_headers": (("Content-Type", "application/json"),
                             ("x-moesif-transaction-id", TX)),
        "response_body": b"[]", "transaction_id": TX, "user_id": None, "company_id": None,
        "session_token": None, "metadata": None, "weight": 1, "blocked_by": None,
        "settings_tag": 0x5E77_1265,
    }
    call.update(fields)
    call["request_headers"] = header_columns(call["request_headers"])
    return tuple(call[name] for name in CapturedCall._fields)


def packed(fields: Any) -> bytes:
    """A call record packed by msgpack itself: for tests that edit its bytes."""
    return CALL_V4 + msgpack.packb(fields)


WELL_FORMED = packed(make_fields())


def compiled(payload: Any) -> Any:
    """The extension's own answer: a CapturedCall, or NotImplemented."""
    assert record.compiled_decode is not None
    return record.compiled_decode(payload)


def python_decode(payload: Any) -> Any:
    """`record.decode` with the compiled decoder out of the way: the reference."""
    with mock.patch.object(record, "compiled_decode", None):
        return decode(payload)


def exact(value: Any) -> Any:
    """`value` as something that compares equal only to the same types and values (True is not
    1, a tuple is not a list, floats by their bits so that NaN equals itself)."""
    kind = type(value)
    if kind is float:
        return kind, struct.pack("<d", value)
    if kind in (tuple, list, CapturedCall, EntityUpdate):
        return kind, tuple(map(exact, value))
    if kind is dict:
        return kind, tuple((exact(key), exact(item)) for key, item in value.items())
    return kind, value


def same_as_python(payload: Any) -> Any:
    """The compiled answer, checked against the Python path whenever it is not NotImplemented.
    Returns the compiled answer."""
    answer = compiled(payload)
    if answer is not NotImplemented:
        assert type(answer) is CapturedCall
        assert exact(answer) == exact(python_decode(payload))
        assert exact(decode(payload)) == exact(answer)
    return answer


# --- the common records are decoded in C ------------------------------------------------------

COMMON = [
    make_fields(),
    make_fields(request_body=None, response_body=None, transaction_id=None, remote_addr=None),
    make_fields(request_body=250_000, response_body=-1, status=599, weight=100),
    make_fields(direction="Outgoing", request_headers=(("Content-Type", "text/plain"),),
                remote_addr=None, request_body=b"r" * 300, response_body=bytes(range(256)) * 300),
    make_fields(request_headers=(), response_headers=(), blocked_by="rule 7", settings_tag=0),
    make_fields(user_id="u-7", company_id=12, session_token=True, metadata=2.5),
    make_fields(user_id=-1, company_id=False, session_token=-(2**63), metadata=2**64 - 1),
    make_fields(user_id=float("nan"), company_id=-0.0, session_token=float("inf"),
                metadata="é \u212a \U0001f600"),
    make_fields(uri="http://h/" + "x" * 40, verb="P" * 300, direction="d" * 70_000),
    make_fields(request_headers=[(f"HTTP_X_{number}", f"v {number}") for number in range(40)],
                response_headers=[(f"h{number}", "") for number in range(20)]),
    make_fields(request_time_ns=0, response_time_ns=2**64 - 1, status=-32, weight=-129,
                settings_tag=-(2**31) - 1),
    make_fields(request_time_ns=127, response_time_ns=128, status=255, weight=256,
                settings_tag=65_536),
    make_fields(user_id=-33, company_id=-40_000, session_token=-(2**31), metadata=-128),
    make_fields(uri="http://h/\ud800", transaction_id="\udfff", metadata="\ud83d"),
]


@compiled_only
@pytest.mark.parametrize("fields", COMMON)
def test_a_common_record_is_decoded_in_c_to_the_python_call(fields: tuple) -> None:
    payload = encode_call_safely(fields)
    answer = same_as_python(payload)
    assert answer is not NotImplemented
    assert exact(answer) == exact(CapturedCall(*fields)._replace(
        request_headers=tuple(map(tuple, fields[5])),
        response_headers=tuple(map(tuple, fields[9]))))


@compiled_only
def test_arrays_packed_as_lists_or_with_wider_headers_decode_the_same() -> None:
    fields = make_fields()
    as_lists = list(fields)
    as_lists[5] = [list(fields[5][0]), list(fields[5][1])]
    as_lists[9] = [list(pair) for pair in fields[9]]
    call = compiled(WELL_FORMED)
    assert exact(compiled(packed(as_lists))) == exact(call)
    assert WELL_FORMED[1:4] == b"\xdc\x00\x13"  # array 16 of 19 fields
    as_array32 = same_as_python(CALL_V4 + b"\xdd\x00\x00\x00\x13" + WELL_FORMED[4:])
    assert exact(as_array32) == exact(call)


@compiled_only
@pytest.mark.parametrize("value", [
    b"\xca" + struct.pack(">f", 1.5), b"\xca\x7f\xc0\x00\x01", b"\xca\xff\x80\x00\x00",
    b"\xca\x00\x00\x00\x01", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x2a",
    b"\xcf" + bytes(7) + b"\x05", b"\xd3" + b"\xff" * 8, b"\xd2\x00\x00\x00\x07",
    b"\xd1\x80\x00", b"\xd0\x80", b"\xcc\x00", b"\xd9\x02ab", b"\xdb\x00\x00\x00\x00",
], ids=["float32", "float32-nan-payload", "float32-minus-infinity", "float32-denormal",
        "float64-nan-payload", "uint64-of-5", "int64-of-minus-1", "int32-of-7", "int16-min",
        "int8-min", "uint8-of-0", "str8-of-2", "str32-empty"])
def test_any_encoding_of_a_callback_result_decodes_as_python_does(value: bytes) -> None:
    """Floats by their bits, and ints and strings in wider forms than the packer writes."""
    callback_results = b"\xc0\xc0\xc0\xc0\x01\xc0"  # user_id ... metadata, weight, blocked_by
    assert WELL_FORMED.count(callback_results) == 1
    for at in range(4):
        edited = callback_results[:at] + value + callback_results[at + 1:]
        assert same_as_python(WELL_FORMED.replace(callback_results, edited)) \
            is not NotImplemented


@compiled_only
def test_short_strings_are_shared_between_records_and_still_decode_as_python_does() -> None:
    """The decoder's cache of short ASCII strings: equal bytes give the same str; strings that
    share a slot, non-ASCII ones and longer ones each decode to their own value."""
    first, second = compiled(WELL_FORMED), compiled(WELL_FORMED)
    assert first.request_headers[0][0] is second.request_headers[0][0]
    assert first.direction is second.direction
    names = ([f"HTTP_X_{number}" for number in range(3000)]
             + ["é" * 10, "\ud800" * 3, "x" * 64, "y" * 65, "ab", "a", ""])
    payload = encode_call_safely(make_fields(
        request_headers=[(name, name.lower()) for name in names],
        response_headers=[(name[::-1], name) for name in names]))
    for _ in range(2):
        assert same_as_python(payload) is not NotImplemented
        assert exact(compiled(WELL_FORMED)) == exact(python_decode(WELL_FORMED))


@compiled_only
def test_a_dropped_decoder_releases_its_strings() -> None:
    decoder = type(record.compiled_decode.__self__)(CapturedCall)
    call = decoder.decode(encode_call(make_fields(request_headers=[("HTTP_X_DROPPED", "v")])))
    name = call.request_headers[0][0]
    del call
    held = sys.getrefcount(name)
    del decoder
    assert sys.getrefcount(name) == held - 1


@compiled_only
def test_a_decoded_call_is_left_out_of_the_garbage_collector() -> None:
    """It holds only strings, numbers, bytes, None and tuples of strings: no cycle to find."""
    call = compiled(WELL_FORMED)
    assert not any(map(gc.is_tracked, (call, call.request_headers, *call.request_headers,
                                       call.response_headers, *call.response_headers)))


@compiled_only
def test_record_decode_asks_the_compiled_decoder_first() -> None:
    payload = encode_call(make_fields())
    with mock.patch.object(record, "compiled_decode",
                           mock.Mock(wraps=record.compiled_decode)) as spy:
        call = decode(payload)
    spy.assert_called_once_with(payload)
    assert exact(call) == exact(python_decode(payload))


@compiled_only
def test_the_decoder_takes_only_a_record_type_of_the_right_shape() -> None:
    decoder_type = type(record.compiled_decode.__self__)
    with pytest.raises(TypeError):
        decoder_type(dict)
    with pytest.raises(ValueError):
        decoder_type(EntityUpdate)
    assert decoder_type.__new__(decoder_type).decode(encode_call(make_fields())) \
        is NotImplemented


# --- what it leaves to Python ----------------------------------------------------------------

def declined(payload: Any) -> Any:
    """Asserts the compiled decoder declines `payload`; returns the Python answer."""
    assert compiled(payload) is NotImplemented
    return python_decode(payload)


@compiled_only
@pytest.mark.parametrize("value", [
    {"plan": "pro"}, ["a", 1], [], b"bytes", 2**64, -(2**63) - 1, {(1, 2): "tuple key"},
], ids=["map", "array", "empty-array", "bin", "big-int", "big-negative-int", "tuple-key"])
@pytest.mark.parametrize("field", [12, 13, 14, 15])
def test_a_callback_result_of_another_type_is_left_to_python(field: int, value: Any) -> None:
    fields = list(make_fields())
    fields[field] = value
    call = declined(encode_call_safely(tuple(fields)))
    assert call is not None and call[field] == value


@compiled_only
@pytest.mark.parametrize("value", [None, 7, True, 2.5, ["a"], {"a": 1}])
def test_a_request_header_value_that_is_not_a_string_is_left_to_python(value: Any) -> None:
    fields = list(make_fields())
    fields[5] = (("HTTP_X_A", "HTTP_X_B"), ("a", value))
    call = declined(encode_call(tuple(fields)))
    assert call is not None and call.request_headers[1][0] == "a"


@compiled_only
def test_an_ext_type_is_left_to_python() -> None:
    timestamp = b"\xd6\xff" + struct.pack(">I", 1_700_000_000)  # msgpack's ext type -1
    record_bytes = packed(make_fields(weight=100))
    weight = b"\xc0\x64\xc0\xce"  # metadata None, weight 100, blocked_by None, settings_tag
    assert record_bytes.count(weight) == 1

    def with_weight(value: bytes) -> bytes:
        return record_bytes.replace(weight, b"\xc0" + value + b"\xc0\xce")

    assert declined(with_weight(timestamp)).weight == 1_700_000_000 * 10**9
    assert declined(encode_call(make_fields(weight=2**70))).weight == 2**70  # ext type 1
    assert declined(with_weight(b"\xd4\x05\x00")) is None  # an unknown ext type


@compiled_only
def test_an_entity_record_is_left_to_python() -> None:
    update = declined(encode_entity("user", {"user_id": "u"}))
    assert update == EntityUpdate("user", {"user_id": "u"})


@compiled_only
@pytest.mark.parametrize("payload", [
    pytest.param(b"", id="empty"),
    pytest.param(b"F", id="kind-byte-alone"),
    pytest.param(b"E" + WELL_FORMED[1:], id="previous-version"),
    pytest.param(WELL_FORMED[:-1], id="truncated"),
    pytest.param(WELL_FORMED + b"\xc0", id="trailing-byte"),
    pytest.param(encode_call(make_fields()[:18]), id="18-fields"),
    pytest.param(encode_call(make_fields() + (None,)), id="20-fields"),
    pytest.param(encode_call(make_fields(status=True)), id="bool-status"),
    pytest.param(encode_call(make_fields(status=200.0)), id="float-status"),
    pytest.param(encode_call(make_fields(verb=b"POST")), id="bin-verb"),
    pytest.param(encode_call(make_fields(request_body="text")), id="str-body"),
    pytest.param(encode_call(make_fields(remote_addr=1)), id="int-remote-addr"),
    pytest.param(encode_call(make_fields()[:5] + ((("A",), ()),) + make_fields()[6:]),
                 id="header-columns-of-two-lengths"),
    pytest.param(encode_call(make_fields()[:5] + ((("A",),),) + make_fields()[6:]),
                 id="one-header-column"),
    pytest.param(encode_call(make_fields()[:5] + ((1,), ("a",)) + make_fields()[6:]),
                 id="int-header-name"),
    pytest.param(encode_call(make_fields(response_headers=(("a", "b", "c"),))), id="triple"),
    pytest.param(encode_call(make_fields(response_headers=(("a", 1),))), id="int-value"),
    pytest.param(encode_call(make_fields(response_headers=("ab",))), id="str-pair"),
    pytest.param(encode_call(make_fields(response_headers={"a": "b"})), id="map-headers"),
    pytest.param(WELL_FORMED.replace(b"POST", b"PO\xc3\x28"), id="invalid-utf8"),
    pytest.param(WELL_FORMED.replace(b"\xa4POST", b"\xc1"), id="unused-type-byte"),
    pytest.param(WELL_FORMED.replace(b"\xa4POST", b"\x80"), id="map-verb"),
])
def test_a_malformed_or_unexpected_record_is_left_to_python(payload: bytes) -> None:
    declined(payload)


@compiled_only
@pytest.mark.parametrize("convert", [bytearray, memoryview], ids=["bytearray", "memoryview"])
def test_a_payload_that_is_not_bytes_is_left_to_python(convert: Any) -> None:
    declined(convert(WELL_FORMED))


def fields_up_to(count: int) -> bytes:
    """The start of a record: the kind byte, the array header, the first `count` fields."""
    return CALL_V4 + b"\xdc\x00\x13" + b"".join(map(msgpack.packb, make_fields()[:count]))


@compiled_only
@pytest.mark.parametrize("start", [
    fields_up_to(0) + b"\xdb\xff\xff\xff\xff", fields_up_to(0) + b"\xda\xff\xff",
    fields_up_to(0) + b"\xd9\xff", fields_up_to(5) + b"\x92\xdd\xff\xff\xff\xff",
    fields_up_to(5) + b"\x92\xdc\xff\xff", fields_up_to(5) + b"\x92\xdd\x00\x00\x0f\xa0",
    fields_up_to(7) + b"\xc6\xff\xff\xff\xff", fields_up_to(7) + b"\xc5\xff\xff",
    fields_up_to(9) + b"\xdd\xff\xff\xff\xff", CALL_V4 + b"\xdd\xff\xff\xff\xff",
], ids=["str32", "str16", "str8", "array32", "array16", "array-of-as-many-as-bytes", "bin32",
        "bin16", "response-headers", "record"])
def test_a_lying_length_is_declined_before_anything_is_allocated(start: bytes) -> None:
    """Lengths past the end decline at once; an array claiming one item per byte left costs
    one pointer per byte at most."""
    payload = start + b"\x00" * 4_000
    tracemalloc.start()
    try:
        assert compiled(payload) is NotImplemented
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * len(payload), peak


# --- fuzzing -----------------------------------------------------------------------------------

TEXT = st.text(max_size=8) | st.sampled_from(["\ud800", "é\udfff", "x" * 40, "y" * 300])
INTS = (st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 127, 128, -32, -33, 255, 256,
                                                             2**16, 2**32, -(2**31) - 1]))
SCALARS = st.none() | st.booleans() | INTS | st.floats() | TEXT
CALLBACK_VALUES = SCALARS | st.binary(max_size=4) | st.integers() | st.lists(SCALARS, max_size=2) \
    | st.dictionaries(TEXT, SCALARS, max_size=2)
BODIES = st.none() | st.binary(max_size=40) | INTS
FIELDS = st.builds(
    make_fields,
    direction=st.sampled_from(["Incoming", "Outgoing"]) | TEXT,
    request_time_ns=INTS, response_time_ns=INTS, verb=TEXT, uri=TEXT,
    request_headers=st.lists(st.tuples(TEXT, TEXT | st.none() | st.integers()), max_size=20),
    remote_addr=st.none() | TEXT, request_body=BODIES, status=INTS,
    response_headers=st.lists(st.tuples(TEXT, TEXT), max_size=18), response_body=BODIES,
    transaction_id=st.none() | TEXT, user_id=CALLBACK_VALUES, company_id=CALLBACK_VALUES,
    session_token=CALLBACK_VALUES, metadata=CALLBACK_VALUES, weight=INTS,
    blocked_by=st.none() | TEXT, settings_tag=INTS,
)


@compiled_only
@FUZZ
@given(fields=FIELDS)
def test_fuzzed_records_decode_to_the_python_call(fields: tuple) -> None:
    """Random valid fields: the compiled call equals Python's; declined only for the
    documented reasons."""
    answer = same_as_python(encode_call_safely(fields))
    if all(type(value) is str for value in fields[5][1]) \
            and all(map(is_common_callback_result, fields[12:16])):
        assert answer is not NotImplemented


def is_common_callback_result(value: Any) -> bool:
    """A callback result the compiled decoder reads: None, bool, float, str, a 64-bit int."""
    if type(value) is int:
        return -(2**63) <= value < 2**64
    return value is None or type(value) in (bool, float, str)


@compiled_only
@FUZZ
@given(rest=st.binary(max_size=300))
def test_random_bytes_are_declined_or_decoded_as_python_does(rest: bytes) -> None:
    same_as_python(CALL_V4 + rest)
    same_as_python(CALL_V4 + b"\xdc\x00\x13" + rest)


@st.composite
def damaged_records(draw: st.DrawFn) -> bytes:
    """A valid record with a few bytes overwritten, inserted or deleted, or cut short."""
    data = bytearray(encode_call_safely(draw(FIELDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        if len(data) < 2:
            break
        at = draw(st.integers(min_value=1, max_value=len(data) - 1))
        how = draw(st.sampled_from(["byte", "flip", "truncate", "insert", "delete"]))
        if how == "byte":
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif how == "flip":
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif how == "truncate":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=5))
        else:
            del data[at:at + draw(st.integers(min_value=1, max_value=5))]
    return bytes(data)


@compiled_only
@FUZZ
@given(payload=damaged_records())
def test_damaged_records_are_declined_or_decoded_as_python_does(payload: bytes) -> None:
    same_as_python(payload)


@compiled_only
def test_many_single_byte_changes_are_declined_or_decoded_as_python_does() -> None:
    """Every offset of a common record, overwritten with random bytes and cut there."""
    generator = random.Random(7)
    payload = encode_call(make_fields(user_id="u", company_id=3, metadata=1.5))
    answered = 0
    for at in range(1, len(payload)):
        for _ in range(8):
            mutated = bytearray(payload)
            mutated[at] = generator.randrange(256)
            answered += same_as_python(bytes(mutated)) is not NotImplemented
        same_as_python(payload[:at])
    assert answered > len(payload)  # many changes leave a record of another value


# --- reference counts and memory ---------------------------------------------------------------

@compiled_only
def test_reference_counts_and_memory_are_stable() -> None:
    payloads = [encode_call_safely(fields) for fields in COMMON]
    declined_payloads = [encode_call(make_fields(metadata={"a": 1})), WELL_FORMED[:-3],
                         WELL_FORMED.replace(b"POST", b"PO\xc3\x28")]
    shared = [CapturedCall, None, True, False, 1, *payloads, *declined_payloads]

    def run() -> None:
        for _ in range(300):
            for payload in payloads:
                assert compiled(payload) is not NotImplemented
            for payload in declined_payloads:
                assert compiled(payload) is NotImplemented

    run()
    gc.collect()
    before = [sys.getrefcount(item) for item in shared]
    tracemalloc.start()
    try:
        run()
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(item) for item in shared] == before
    assert grown < 10_000, grown


# --- switching ---------------------------------------------------------------------------------

PROBE = (
    "import sys; from moesif_fast import record;"
    "print(record.compiled_decode is None, 'moesif_fast._recorddecode' in sys.modules)"
)


@pytest.mark.skipif(not BUILT, reason="moesif_fast._recorddecode is not built")
def test_pure_python_environment_variable() -> None:
    assert printed_forced_and_default(PROBE) == (["True", "False"], ["False", "True"])
