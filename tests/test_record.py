"""The ring record (`moesif_fast.record`): what a worker packs, what the shipper decodes.

A record comes from shared memory, so `decode` must never raise, never build anything but plain
data and never return a malformed call, whatever the bytes (fuzzed here, in this process and in
a subprocess that a crash would kill); a valid record must give back what the worker captured,
and the event built from it must be the one the marshal records of the previous version gave.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import enum
import json
import marshal
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any

import msgpack
import pytest
from event_shape import EVENT_KEYS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moesif_fast.event import EventBuilder, EventDropped, json_safe, serialize_batch
from moesif_fast.record import (
    CALL_V4,
    ENTITY_KINDS,
    ENTITY_V2,
    CapturedCall,
    EntityUpdate,
    decode,
    encode_call,
    encode_call_safely,
    encode_entity,
    header_columns,
)
from moesif_fast.settings import MoesifOptions

T0_NS = 1_795_510_036_321_000_000  # 2026-11-24T08:47:16.321 UTC
TX = "93889631-9a82-4595-bd6d-f210bf44c915"

RECORD_FIELDS = (
    "Incoming", T0_NS, T0_NS + 1_000_000, "POST", "http://h/p", (("HTTP_X_A",), ("a",)),
    "10.0.0.1",
    b'{"a": 1}', 201, (("Content-Type", "application/json"),), b"[]", TX, "u", 7, None,
    {"m": [1]}, 1, None, 0x5E77_1265,
)


def strict_loads(data: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise AssertionError(f"{name} literal in output")

    return json.loads(data, parse_constant=no_constants)


def with_field(index: int, value: Any) -> tuple:
    return RECORD_FIELDS[:index] + (value,) + RECORD_FIELDS[index + 1:]


def _with(index: int, value: Any) -> bytes:
    return encode_call(with_field(index, value))


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def is_plain(value: Any, depth: int = 0) -> bool:
    """Only the types MessagePack gives back (no objects of other classes, no code)."""
    assert depth < 2000
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return True
    if kind in (list, tuple):
        return all(is_plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(is_plain(key, depth + 1) and is_plain(item, depth + 1)
                   for key, item in value.items())
    return False


def assert_well_formed(record: CapturedCall | EntityUpdate) -> None:
    """What the shipper may rely on in a decoded record (see CapturedCall)."""
    if type(record) is EntityUpdate:
        assert record.kind in ENTITY_KINDS and type(record.profile) is dict
        assert is_plain(record.profile)
        return
    assert type(record) is CapturedCall and len(record) == 19
    assert type(record.settings_tag) is int
    assert type(record.direction) is str and type(record.verb) is str
    assert type(record.uri) is str
    assert type(record.request_time_ns) is int and type(record.response_time_ns) is int
    assert type(record.status) is int and type(record.weight) is int
    names, values = record.request_headers
    assert type(record.request_headers) is tuple and len(record.request_headers) == 2
    assert type(names) is tuple and type(values) is tuple and len(names) == len(values)
    assert all(type(item) is str for item in names + values)
    assert type(record.response_headers) is tuple
    for pair in record.response_headers:
        assert type(pair) is tuple and len(pair) == 2
        assert type(pair[0]) is str and type(pair[1]) is str
    for optional in (record.remote_addr, record.transaction_id, record.blocked_by):
        assert optional is None or type(optional) is str
    for body in (record.request_body, record.response_body):
        assert body is None or type(body) in (bytes, int)
    for result in (record.user_id, record.company_id, record.session_token, record.metadata):
        assert is_plain(result)


# --- valid records ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, 1_234, b"", b"{}", bytes(range(256)) * 40])
def test_a_record_decodes_to_its_call(body: bytes | int | None) -> None:
    fields = RECORD_FIELDS[:7] + (body,) + RECORD_FIELDS[8:10] + (body,) + RECORD_FIELDS[11:]
    payload = encode_call(fields)
    assert payload[:1] == CALL_V4 == b"F"
    assert decode(payload) == CapturedCall(*fields)


def test_request_header_values_that_are_not_strings_are_flattened() -> None:
    headers = header_columns((("HTTP_X_A", 5), ("HTTP_X_B", None), ("HTTP_X_C", [1, "x"]),
                              ("HTTP_X_D", "d"), ("HTTP_X_E", 2**70)))
    call = decode(encode_call(with_field(5, headers)))
    assert call.request_headers == (("HTTP_X_A", "HTTP_X_B", "HTTP_X_C", "HTTP_X_D", "HTTP_X_E"),
                                    ("5", "", '[1, "x"]', "d", str(2**70)))


def test_a_header_value_nested_too_deep_to_write_is_not_decoded() -> None:
    deep: Any = []
    for _ in range(1_015):  # deeper than JSON (or repr) can write, not than the record carries
        deep = [deep]
    assert decode(_with(5, (("HTTP_X_A",), (deep,)))) is None


def test_a_header_value_too_long_to_write_as_text_is_not_decoded() -> None:
    """A 10,000-digit int (ext type 1) cannot be written as JSON or text: the record is
    refused, not a ValueError out of decode (marshal records could raise here)."""
    assert decode(_with(5, (("HTTP_X_A",), (10**10_000,)))) is None


class Level(enum.IntEnum):
    GOLD = 3


class Text(str):
    pass


Pair = namedtuple("Pair", "left right")


@pytest.mark.parametrize(("value", "arrives_as"), [
    pytest.param({"tags": ["a", "b"], "n": 1}, {"tags": ["a", "b"], "n": 1}, id="lists-stay"),
    pytest.param(("a", ("b",)), ["a", ["b"]], id="tuples-as-lists"),
    pytest.param({"k": b"\x00\xff"}, {"k": b"\x00\xff"}, id="bytes"),
    pytest.param({1: "one", None: 0, 1.5: True}, {1: "one", None: 0, 1.5: True},
                 id="non-string-keys"),
    pytest.param({(1, 2): [3]}, {(1, 2): (3,)}, id="tuple-keys-arrays-as-tuples"),
    pytest.param([2**64, -2**63 - 1, 2**200, -(2**300), 2**64 - 1, -2**63],
                 [2**64, -2**63 - 1, 2**200, -(2**300), 2**64 - 1, -2**63], id="big-ints"),
    pytest.param("x\ud800y", "x\ud800y", id="lone-surrogate"),
    pytest.param(float("-inf"), float("-inf"), id="infinity"),
    pytest.param(Level.GOLD, 3, id="int-subclass"),
    pytest.param(Text("t"), "t", id="str-subclass"),
    pytest.param(OrderedDict(a=1), {"a": 1}, id="dict-subclass"),
    pytest.param(Pair(1, 2), [1, 2], id="namedtuple"),
    pytest.param({"s": {1, 2}}, {"s": [1, 2]}, id="set-made-json-safe"),
    pytest.param(datetime.date(2026, 1, 2), "2026-01-02", id="date-made-json-safe"),
    pytest.param([decimal.Decimal("1.50"), 1 + 2j], ["1.50", "(1+2j)"],
                 id="decimal-and-complex-made-json-safe"),
])
def test_callback_results_arrive_as_plain_data(value: Any, arrives_as: Any) -> None:
    call = decode(encode_call_safely(with_field(15, value)))
    assert call is not None
    assert call.metadata == arrives_as
    assert type(call.metadata) is type(arrives_as)
    assert call[:15] == CapturedCall(*RECORD_FIELDS)[:15]


def test_values_only_json_safe_can_carry_make_every_callback_result_json_safe() -> None:
    """As before (marshal): one value the record cannot carry makes the four callback results
    and the request header values plain JSON, the rest of the record is untouched."""
    moment = datetime.datetime(2026, 11, 24, 9, 0, tzinfo=datetime.timezone.utc)
    fields = with_field(5, (("HTTP_X_WHEN", "HTTP_X_N"), (moment, 5)))
    fields = fields[:12] + ((1, 2), {True: "yes"}, None, {"when": moment}) + fields[16:]
    call = decode(encode_call_safely(fields))
    assert call.request_headers == (("HTTP_X_WHEN", "HTTP_X_N"), (str(moment), "5"))
    assert (call.user_id, call.company_id, call.session_token, call.metadata) == (
        [1, 2], {"True": "yes"}, None, {"when": moment.isoformat()})
    assert call[:5] + call[6:12] + call[16:] == fields[:5] + fields[6:12] + fields[16:]


def test_a_value_nothing_can_carry_still_raises_for_the_caller() -> None:
    """The middleware counts a capture that fails: a fixed field of a type no record has."""
    with pytest.raises((TypeError, ValueError)):
        encode_call_safely(with_field(8, object()))


def test_threads_packing_at_once_never_mix_their_records() -> None:
    """A packer runs Python code while it packs (here a dict subclass's items(), which lets
    other threads run): each thread needs its own, or the records come out mixed."""

    class Yielding(dict):
        def items(self) -> Any:
            threading.Event().wait(0.0001)  # give the other threads the interpreter
            return super().items()

    failures: list[str] = []

    def pack_many(number: int) -> None:
        for count in range(60):
            metadata = Yielding(thread=number, count=count, pad="x" * (number * 50))
            call = decode(encode_call_safely(with_field(15, metadata)))
            if call is None or call.metadata != dict(metadata):
                failures.append(f"thread {number}, record {count}: {call!r:.200}")

    threads = [threading.Thread(target=pack_many, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize("kind", ENTITY_KINDS)
def test_an_entity_update_decodes_to_its_profile(kind: str) -> None:
    profile = {"user_id": "u\ud800", "metadata": {"tags": ["a"], "big": 2**80, "n": None}}
    payload = encode_entity(kind, profile)
    assert payload[:1] == ENTITY_V2 == b"V"
    assert decode(payload) == EntityUpdate(kind, profile)


# --- records that are not well formed ------------------------------------------------------

WELL_FORMED = encode_call(RECORD_FIELDS)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"F", id="kind-only"),
        pytest.param(b"X" + WELL_FORMED[1:], id="unknown-kind"),
        pytest.param(b"C" + marshal.dumps(RECORD_FIELDS[:7]), id="an-older-call-kind"),
        pytest.param(b"D" + marshal.dumps(RECORD_FIELDS), id="the-marshal-call-kind"),
        pytest.param(b"D" + WELL_FORMED[1:], id="this-record-under-the-marshal-kind"),
        pytest.param(b"U" + marshal.dumps(("user", {"user_id": "u"})),
                     id="the-marshal-entity-kind"),
        pytest.param(b"V" + WELL_FORMED[1:], id="a-call-as-an-entity"),
        pytest.param(WELL_FORMED[:-3], id="truncated"),
        pytest.param(WELL_FORMED + b"\x00", id="extra-bytes"),
        pytest.param(CALL_V4 + b"\xc1garbage", id="not-msgpack"),
        pytest.param(CALL_V4 + marshal.dumps(RECORD_FIELDS), id="marshal-data"),
        pytest.param(CALL_V4 + _packed(dict(enumerate(RECORD_FIELDS))), id="a-map"),
        pytest.param(CALL_V4 + _packed("text"), id="a-string"),
        pytest.param(encode_call(RECORD_FIELDS[:-1]), id="too-few-fields"),
        pytest.param(encode_call((*RECORD_FIELDS, None)), id="too-many-fields"),
        pytest.param(_with(0, b"Incoming"), id="direction-bytes"),
        pytest.param(_with(1, True), id="time-bool"),
        pytest.param(_with(2, 1.5), id="time-float"),
        pytest.param(_with(4, None), id="uri-none"),
        pytest.param(_with(5, (("HTTP_X_A", "a"),)), id="request-headers-as-pairs"),
        pytest.param(_with(5, "HTTP_X_A"), id="request-headers-a-string"),
        pytest.param(_with(5, {"HTTP_X_A": "a"}), id="request-headers-a-map"),
        pytest.param(_with(5, (("HTTP_X_A", "HTTP_X_B"), ("a",))),
                     id="request-header-columns-of-two-lengths"),
        pytest.param(_with(5, (("HTTP_X_A",), ("a",), ("b",))), id="request-header-three-columns"),
        pytest.param(_with(5, ((5,), ("a",))), id="request-header-name-int"),
        pytest.param(_with(5, ("HTTP_X_A", ("a",))), id="request-header-names-a-string"),
        pytest.param(_with(6, 10), id="remote-addr-int"),
        pytest.param(_with(7, 1.5), id="body-float"),
        pytest.param(_with(7, "text"), id="body-str"),
        pytest.param(_with(8, "200"), id="status-str"),
        pytest.param(_with(8, False), id="status-bool"),
        pytest.param(_with(9, (("Content-Type", 5),)), id="response-header-value-int"),
        pytest.param(_with(9, ((None, "x"),)), id="response-header-name-none"),
        pytest.param(_with(9, (("a",),)), id="response-header-one-item"),
        pytest.param(_with(9, (("a", "b", "c"),)), id="response-header-three-items"),
        pytest.param(_with(9, ("ab",)), id="response-header-a-two-letter-string"),
        pytest.param(_with(9, ({"a": "b"},)), id="response-header-a-map"),
        pytest.param(_with(10, ["x"]), id="response-body-list"),
        pytest.param(_with(11, 5), id="transaction-id-int"),
        pytest.param(_with(16, "1"), id="weight-str"),
        pytest.param(_with(17, b"rule"), id="blocked-by-bytes"),
        pytest.param(CALL_V4 + WELL_FORMED[1:-1] + b"\xc7\x01\x05x",
                     id="an-unknown-ext-type"),
        pytest.param(CALL_V4 + _packed([*RECORD_FIELDS[:15], {msgpack.ExtType(7, b""): 1},
                                        *RECORD_FIELDS[16:]]), id="an-unknown-ext-as-key"),
        pytest.param(CALL_V4 + _packed([*RECORD_FIELDS[:15], {"k": 1}, *RECORD_FIELDS[16:]])
                     .replace(b"\x81\xa1k", b"\x81\x81\xa1k\x01", 1), id="a-map-as-key"),
        pytest.param(ENTITY_V2 + _packed(["admin", {"user_id": "u"}]), id="entity-unknown-kind"),
        pytest.param(ENTITY_V2 + _packed(["user", ["user_id", "u"]]), id="entity-profile-list"),
        pytest.param(ENTITY_V2 + _packed([b"user", {}]), id="entity-kind-bytes"),
        pytest.param(ENTITY_V2 + _packed(["user", {}, None]), id="entity-three-items"),
    ],
)
def test_a_malformed_record_is_not_decoded(payload: bytes) -> None:
    assert decode(payload) is None


def test_arrays_the_worker_packed_as_lists_are_as_good_as_tuples() -> None:
    """MessagePack has one array type: lists where the worker has tuples decode the same."""
    as_lists = encode_call([*RECORD_FIELDS[:5], [["HTTP_X_A"], ["a"]], *RECORD_FIELDS[6:9],
                            [["Content-Type", "application/json"]], *RECORD_FIELDS[10:]])
    assert decode(as_lists) == decode(WELL_FORMED) == CapturedCall(*RECORD_FIELDS)


@pytest.mark.parametrize("header", [
    pytest.param(b"\xdd\xff\xff\xff\xff", id="array-of-2**32-1-items"),
    pytest.param(b"\xdf\xff\xff\xff\xff", id="map-of-2**32-1-pairs"),
    pytest.param(b"\xdb\xff\xff\xff\xff", id="str-of-4-GiB"),
    pytest.param(b"\xc6\xff\xff\xff\xff", id="bin-of-4-GiB"),
    pytest.param(b"\xc9\xff\xff\xff\xff\x01", id="ext-of-4-GiB"),
    pytest.param(b"\xdc\x00\x12\xdd\x00\x10\x00\x00", id="a-field-of-a-million-items"),
])
def test_a_lying_length_allocates_no_more_than_the_record(header: bytes) -> None:
    payload = CALL_V4 + header + b"\x00" * 4_000
    tracemalloc.start()
    try:
        assert decode(payload) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(payload), peak


def test_a_timestamp_ext_reads_as_an_int_not_an_object() -> None:
    timestamp = b"\xd6\xff" + struct.pack(">I", 1_700_000_000)  # msgpack's ext type -1
    packed = _packed([*RECORD_FIELDS[:15], "@", *RECORD_FIELDS[16:]])
    call = decode(CALL_V4 + packed.replace(b"\xa1@", timestamp, 1))
    assert call is not None and call.metadata == 1_700_000_000 * 10**9
    assert decode(CALL_V4 + packed.replace(b"\xa1@", b"\xd5\xff\x00\x00", 1)) is None


# --- fuzzing ---------------------------------------------------------------------------------

PLAIN_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
    | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=2),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.integers(min_value=0, max_value=len(RECORD_FIELDS) - 1),
                               PLAIN_VALUES, min_size=1, max_size=3))
def test_a_record_with_any_fields_is_rejected_or_gives_an_event_of_the_wire_shape(
    changes: dict[int, Any],
) -> None:
    fields = tuple(changes.get(index, value) for index, value in enumerate(RECORD_FIELDS))
    call = decode(encode_call(fields))
    if call is None:
        return
    assert_well_formed(call)
    builder = EventBuilder(MoesifOptions())
    try:
        event = strict_loads(serialize_batch([builder.encode(call)]))[0]
    except EventDropped:
        return
    assert list(event) == EVENT_KEYS
    for side in ("request", "response"):
        assert isinstance(event[side]["time"], str)
        headers = event[side]["headers"]
        assert all(isinstance(value, str) for value in headers.values())
    assert all(isinstance(event["request"][key], str) for key in ("uri", "verb"))
    assert type(event["response"]["status"]) is int
    assert type(event["weight"]) is int
    assert isinstance(event["transaction_id"], str)


def _valid_payloads() -> list[bytes]:
    big_headers = header_columns((f"HTTP_X_{number}", f"value {number}") for number in range(15))
    return [
        WELL_FORMED,
        encode_call_safely(with_field(5, big_headers)[:15] + (
            {"tags": ["a", "b"], "n": 2**70, (1, 2): b"\xff", "s": "\ud800"},)
            + RECORD_FIELDS[16:]),
        encode_call(with_field(7, b'{"k": "' + b"v" * 300 + b'"}')),
        encode_entity("company", {"company_id": "c", "metadata": {"a": [1, 2.5, None]}}),
    ]


VALID_PAYLOADS = _valid_payloads()
MSGPACK_LENGTH_MARKERS = [0xdc, 0xdd, 0xde, 0xdf, 0xc4, 0xc5, 0xc6, 0xd9, 0xda, 0xdb, 0xc7, 0xc8,
                          0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0x9f, 0x8f, 0xbf, 0xcf, 0xd3, 0xcb]


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid record with a few changes: bit flips, byte and length-header overwrites,
    truncations, insertions and deletions."""
    data = bytearray(draw(st.sampled_from(VALID_PAYLOADS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if len(data) < 2:
            break
        at = draw(st.integers(min_value=1, max_value=len(data) - 1))  # the kind byte stays
        how = draw(st.sampled_from(["flip", "byte", "length", "truncate", "insert", "delete"]))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif how == "byte":
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif how == "length":  # a length header claiming anything at all
            data[at:at + 5] = bytes([draw(st.sampled_from(MSGPACK_LENGTH_MARKERS))]) + draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                 b"\x00\x01\x00\x00", st_bytes4(draw)]))
        elif how == "truncate":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw(st.integers(min_value=1, max_value=16))]
    return bytes(data)


def st_bytes4(draw: st.DrawFn) -> bytes:
    return draw(st.binary(min_size=4, max_size=4))


def decode_and_build(payload: bytes) -> None:
    """What the shipper does with a ring record: must not raise but EventDropped."""
    record = decode(payload)
    if record is None:
        return
    assert_well_formed(record)
    if type(record) is CapturedCall:
        with contextlib.suppress(EventDropped):
            strict_loads(EventBuilder(MoesifOptions()).encode(record))


@settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([CALL_V4, ENTITY_V2]), rest=st.binary(max_size=300))
@example(kind=CALL_V4, rest=b"\xdc\x00\x12" + b"\xc0" * 18)
@example(kind=CALL_V4, rest=b"\x91" * 2000)
def test_any_bytes_after_a_kind_byte_decode_to_none_or_a_well_formed_record(
        kind: bytes, rest: bytes) -> None:
    decode_and_build(kind + rest)


@settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=mutated_payloads())
def test_damaged_records_decode_to_none_or_a_well_formed_record(payload: bytes) -> None:
    decode_and_build(payload)


FUZZ_SCRIPT = """
import random, sys
sys.path[:0] = sys.argv[3:]
from test_record import VALID_PAYLOADS, MSGPACK_LENGTH_MARKERS, decode_and_build
from moesif_fast.record import CALL_V4, ENTITY_V2
rng = random.Random(int(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    if rng.random() < 0.3:
        payload = rng.choice([CALL_V4, ENTITY_V2]) + rng.randbytes(rng.randrange(64))
    else:
        data = bytearray(rng.choice(VALID_PAYLOADS))
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(1, max(2, len(data)))
            how = rng.randrange(5)
            if how == 0:
                data[at:at + 1] = bytes([rng.randrange(256)])
            elif how == 1:
                data[at:at + 5] = bytes([rng.choice(MSGPACK_LENGTH_MARKERS)]) + rng.randbytes(4)
            elif how == 2:
                del data[at:]
            elif how == 3:
                data[at:at] = rng.randbytes(rng.randrange(1, 9))
            else:
                del data[at:at + rng.randrange(1, 17)]
        payload = bytes(data)
    decode_and_build(payload)
print("ok")
"""


def test_decoding_damaged_records_never_crashes_the_interpreter() -> None:
    """The marshal decoder could be crashed (SIGSEGV) by a 99-byte record: here 30,000 random
    damaged records are decoded in a process of their own, which such a crash would kill."""
    tests = str(Path(__file__).parent)
    completed = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, "20261124", "30000", tests],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert (completed.returncode, completed.stdout.strip()) == (0, "ok"), completed.stderr[-3000:]


# --- the events are those of the marshal records ----------------------------------------------

CALLBACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**80)
    | st.floats() | st.text(max_size=5) | st.sampled_from(["\ud800", "a\udfffb"])
    | st.binary(max_size=5) | st.datetimes() | st.decimals(allow_nan=True) | st.uuids()
    | st.complex_numbers(max_magnitude=10),
    lambda children: st.lists(children, max_size=3) | st.tuples(children)
    | st.frozensets(st.integers(), max_size=3) | st.sets(st.text(max_size=2), max_size=2)
    | st.dictionaries(st.text(max_size=4) | st.integers() | st.booleans(), children,
                      max_size=3)
    | st.dictionaries(st.tuples(st.integers()), children, max_size=2),
    max_leaves=8)


def marshal_era_call(fields: tuple) -> CapturedCall:
    """The call the previous version's shipper had for `fields`: the callback results as they
    were when marshal could carry them (its copy differs at most in the order of a set's
    items, which is arbitrary anyway), else made JSON-safe."""
    results = fields[12:16]
    try:
        marshal.dumps(results)
    except ValueError:
        results = tuple(json_safe(value) for value in results)
    return CapturedCall(*fields[:12], *results, *fields[16:])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=CALLBACK_VALUES, company=CALLBACK_VALUES, session=CALLBACK_VALUES,
       metadata=CALLBACK_VALUES)
def test_events_from_callback_results_are_the_ones_marshal_records_gave(
        user: Any, company: Any, session: Any, metadata: Any) -> None:
    fields = RECORD_FIELDS[:12] + (user, company, session, metadata) + RECORD_FIELDS[16:]
    call = decode(encode_call_safely(fields))
    assert call is not None
    assert_well_formed(call)
    builder = EventBuilder(MoesifOptions())
    assert strict_loads(builder.encode(call)) == strict_loads(
        builder.encode(marshal_era_call(fields)))
