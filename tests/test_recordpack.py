"""The compiled record packer (`_recordpack.pack_call`) against msgpack's Packer, the reference:
whenever it answers, the bytes are the Python path's; whatever it declines, `encode_call` still
packs as before."""

from __future__ import annotations

import enum
import math
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pure_python import printed_forced_and_default

from moesif_fast import PURE_PYTHON, record
from moesif_fast.record import CALL_V4, decode, encode_call, encode_call_safely, header_columns

pytestmark = pytest.mark.skipif(record._compiled_pack is None,
                                reason="the compiled packer is not built or forced off")
pack_call = record._compiled_pack


def python_pack(fields: tuple) -> bytes:
    return CALL_V4 + record._packers.pack(fields)


def a_call(number: int = 1, **changes: object) -> tuple:
    now = time.time_ns()
    body = b'{"user": "ada", "note": "' + b"x" * 900 + b'"}'
    fields = dict(
        direction="Incoming", request_time_ns=now, response_time_ns=now + 1_500_000,
        verb="POST", uri=f"https://api.example.com/v1/items?page={number}",
        request_headers=header_columns((("HTTP_HOST", "api.example.com"),
                                        ("HTTP_USER_AGENT", "curl/8.5"),
                                        ("HTTP_AUTHORIZATION", "Bearer abc.def.ghi"),
                                        ("HTTP_X_NAME", "Zoë ✓"), ("CONTENT_TYPE", "text/plain"))),
        remote_addr="203.0.113.9", request_body=body, status=201,
        response_headers=(("Content-Type", "application/json"),
                          ("x-moesif-transaction-id", "8c6b5a1e-0000-4000-a000-000000000001")),
        response_body=body, transaction_id="8c6b5a1e-0000-4000-a000-000000000001",
        user_id="ada", company_id=None, session_token=None,
        metadata={"plan": "pro", "seats": 12, "ratio": 0.25, "tags": ["a", "b"]},
        weight=1, blocked_by=None, settings_tag=(1 << 63) + 5)
    fields.update(changes)
    return tuple(fields.values())


def test_a_whole_call_is_packed_in_c_as_msgpack_packs_it_and_decodes() -> None:
    fields = a_call()
    payload = pack_call(fields)
    assert payload is not None and payload == python_pack(fields) == encode_call(fields)
    assert decode(payload) == decode(python_pack(fields)) is not None


BOUNDARY_VALUES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63,
    0.0, -0.0, 1.5, 1e308, math.inf, -math.inf, math.nan, True, False, None,
    "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "é" * 200, "✓" * 30_000, "x" * 70_000,
    b"", b"a" * 255, b"a" * 256, b"b" * 65535, b"b" * 65536,
    (), [], tuple(range(15)), tuple(range(16)), list(range(65536)),
    {}, {f"k{n}": n for n in range(15)}, {f"k{n}": n for n in range(16)},
    {n: [n, {"x": None}] for n in range(40)}, {(1, 2): "a tuple as a key"},
]


@pytest.mark.parametrize("value", BOUNDARY_VALUES, ids=lambda value: repr(value)[:40])
def test_every_size_class_and_type_matches_msgpack(value: object) -> None:
    fields = a_call(metadata=value)
    assert pack_call(fields) == python_pack(fields)


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


DECLINED = [2**64, -2**63 - 1, "lone \ud800 surrogate", {"key": "\udfff"}, Color.RED,
            Text("a str subclass"), bytearray(b"x"), {1, 2}, object(), 1j,
            nested(80)]


@pytest.mark.parametrize("value", DECLINED, ids=lambda value: type(value).__name__)
def test_values_left_to_python_are_declined_and_packed_as_before(value: object) -> None:
    fields = a_call(user_id=value)
    assert pack_call(fields) is None
    try:
        expected = python_pack(fields)
    except (TypeError, ValueError, OverflowError) as error:
        with pytest.raises(type(error)):
            encode_call(fields)
    else:
        assert encode_call(fields) == expected
    assert decode(encode_call_safely(fields)) is not None


def test_fields_in_a_list_pack_as_in_a_tuple() -> None:
    fields = a_call()
    assert pack_call(list(fields)) == pack_call(fields) == python_pack(list(fields))


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**65), st.floats(),
                    st.text(), st.binary(max_size=300))
VALUES = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=20), st.lists(children, max_size=20).map(tuple),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-200, 200)), children,
                    max_size=20)), max_leaves=60)


@settings(max_examples=400, deadline=None)
@given(user_id=VALUES, metadata=VALUES, text=st.text(), number=st.integers(-2**63, 2**64 - 1))
def test_random_values_pack_as_msgpack_packs_them(user_id: object, metadata: object,
                                                  text: str, number: int) -> None:
    fields = a_call(user_id=user_id, metadata=metadata, verb=text, status=number)
    payload = pack_call(fields)
    try:
        expected = python_pack(fields)
    except (TypeError, ValueError, OverflowError):
        assert payload is None  # the Python path refuses it: the C one must not answer
        return
    assert payload is None or payload == expected


def test_reference_counts_are_unchanged_by_packing() -> None:
    fields = a_call()
    items = [item for item in (*fields, *fields[5], *fields[5][0], *fields[15].values())
             if item is not None and type(item) not in (bool, int)]  # not shared elsewhere
    before = [sys.getrefcount(item) for item in items]
    for _ in range(2_000):
        pack_call(fields)
        pack_call(a_call(user_id=2**64))  # declined half-way through
    assert [sys.getrefcount(item) for item in items] == before


@pytest.mark.skipif(PURE_PYTHON, reason="this whole run is pure Python already")
def test_pure_python_leaves_the_extension_unimported() -> None:
    probe = ("import sys; from moesif_fast import record; "
             "print(record._compiled_pack is None, 'moesif_fast._recordpack' in sys.modules)")
    assert printed_forced_and_default(probe) == (["True", "False"], ["False", "True"])
