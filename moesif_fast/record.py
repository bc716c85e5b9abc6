"""The compact record a worker appends to the ring for one captured API call.

The worker copies what it needs out of the live request and response into a plain tuple and
packs it with MessagePack: no JSON, no base64, no header renaming in the request. The shipper
unpacks it into a `CapturedCall` and builds the Moesif event from it (`moesif_fast.event`).

Payload layout: one kind byte, then

- b"F" (an API call): one MessagePack array of the `CapturedCall` fields in order. The request
  headers are two arrays (names, values), not a pair per header: the worker builds no tuple per
  header, and two joins check them in the shipper.
- b"V" (a user, company or subscription update, see `entities.py`): one MessagePack array
  [kind, profile map] with the profile already in wire shape.

Strings are UTF-8 (lone surrogates pass, as marshal let them), bytes are MessagePack bin, and
an integer outside MessagePack's 64 bits is ext type 1 (its signed little-endian bytes). No
other ext type is read; the timestamp ext (-1) reads as an int. The kind byte carries the
record version, so a mixed deployment drops and counts records it cannot read (b"E", the
previous version's, without a settings tag; b"D" and b"U", marshal records) instead of
misreading them.

Trust: the ring file is mode 0600 and owned by the server's user, but the shipper treats its
bytes as untrusted. `decode` never raises and never builds anything but None, bools, ints,
floats, str, bytes, lists, tuples and dicts: MessagePack has no code objects and no
constructors. Every length in a record is bounded by the record's own size (`_unpack`), so a
lying length is refused before anything is allocated for it, and the unpacker is not recursive
(it refuses nesting past 1024 arrays and maps), so no record can exhaust the C stack. A bad
record is None: the shipper counts it as undecodable. (The previous decoder, marshal, could be
crashed by crafted bytes: issue #12. A record that still crashes or hangs two shippers in
a row is skipped by the next one: see `ringbuffer.reader`.)

The one callback result a worker packs that cannot be decoded: one nested exactly 1024
containers deep (the packer takes 1025 levels with the record's own array, the unpacker 1024);
the record is counted as undecodable. Deeper ones are made JSON-safe (at most 256 levels).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from itertools import chain, product
from operator import itemgetter
from types import NoneType
from typing import Any, NamedTuple

import msgpack
from msgpack import unpackb as _unpackb

from . import compiled

_recorddecode = compiled("_recorddecode")
_recordpack = compiled("_recordpack")

CALL_V4 = b"F"
ENTITY_V2 = b"V"
ENTITY_KINDS = ("user", "company", "subscription")

Body = bytes | int | None
"""A captured body: the bytes, None when there is none (or LOG_BODY is off), or an int (the
body's size in bytes) when it was larger than the capture limit and left out."""


class CapturedCall(NamedTuple):
    """One API call as captured in the worker. Field order is the wire order of the record."""

    direction: str  # "Incoming" | "Outgoing"
    request_time_ns: int  # time.time_ns() when the request entered the middleware
    response_time_ns: int  # time.time_ns() when the view chain returned
    verb: str  # request method, upper case
    uri: str  # scheme://host/full_path?query
    request_headers: tuple[tuple[str, ...], tuple[str, ...]]
    """(names, values). Incoming: WSGI META keys as Django has them (HTTP_X_API_KEY,
    CONTENT_TYPE, CONTENT_LENGTH) with their string values. Outgoing: real header names."""
    remote_addr: str | None  # REMOTE_ADDR (incoming) or None
    request_body: Body
    status: int
    response_headers: tuple[tuple[str, str], ...]  # names as the application set them
    response_body: Body  # None also for streaming and file responses
    transaction_id: str | None  # the X-Moesif-Transaction-Id sent on the response
    user_id: Any  # from IDENTIFY_USER or request.user; None → the shipper reads the auth header
    company_id: Any
    session_token: Any
    metadata: Any
    """The callback results (user_id … metadata) arrive as plain data: dicts, lists (for the
    worker's lists and tuples alike; all tuples when some dict has one as a key), str,
    bytes, numbers, bools and None; anything else was made JSON-safe in the worker."""
    weight: int  # sampling weight (1 = sample rate 100)
    blocked_by: str | None  # the governance rule that blocked the request, if one did
    settings_tag: int = 0
    """MoesifOptions.settings_tag of the worker that captured the call (never 0); 0 in a
    record made without settings (tests, benchmarks): sent under the shipper's settings."""


FIELD_COUNT = len(CapturedCall._fields)
compiled_decode = None if _recorddecode is None else _recorddecode.Decoder(CapturedCall).decode
"""The compiled `decode` of the common CALL_V4 record (docs/compiled.md): the same CapturedCall,
or NotImplemented for any payload it leaves to the Python path; None when not in use."""
_TYPED_FIELDS = itemgetter(*range(12), 16, 17, 18)
"""The fields whose type is fixed (all but the callback results user_id … metadata)."""
_FIELD_TYPES = {
    array: frozenset(
        (str, int, int, str, str, array, remote_addr, request_body, int, array, response_body,
         transaction_id, int, blocked_by, int)
        for remote_addr, transaction_id, blocked_by in product((str, NoneType), repeat=3)
        for request_body, response_body in product((bytes, int, NoneType), repeat=2))
    for array in (list, tuple)
}
"""Every allowed tuple of the types of `_TYPED_FIELDS`, for a record unpacked with its arrays
as lists and as tuples: one set lookup checks a record."""
_LIST_FIELD_TYPES = _FIELD_TYPES[list]
_new_tuple = tuple.__new__
_ARRAYS = (list, tuple)
_PAIR_LENGTH = frozenset((2,))

_EXT_BIG_INT = 1
"""Ext type of an int outside MessagePack's range (-2**63 to 2**64 - 1): signed little-endian."""
_PACK_BUFFER = 16 << 10  # initial bytes of each thread's packer buffer (it grows as needed)
_UNPACKABLE = (TypeError, ValueError, OverflowError)  # what a Packer raises for a value


def _pack_extension(value: object) -> msgpack.ExtType:
    """The packer's `default`, called only for values MessagePack cannot pack by itself: an
    int past 64 bits becomes ext type 1; anything else is refused (TypeError)."""
    if isinstance(value, int):
        return msgpack.ExtType(_EXT_BIG_INT, int.to_bytes(
            value, (value.bit_length() + 8) // 8, "little", signed=True))
    raise TypeError(f"can not serialize {type(value).__name__!r} object")


class _Packers(threading.local):
    """Each thread's packers. A Packer keeps its buffer between calls (cheaper than packb's
    new one each time) and must not be shared by threads: its own code runs Python code
    (a dict subclass's items(), `default`) during which another thread could pack."""

    def __init__(self) -> None:
        self.pack = msgpack.Packer(default=_pack_extension, buf_size=_PACK_BUFFER).pack
        self._lenient: Any = None

    @property
    def pack_lenient(self) -> Any:
        """`pack`, with lone surrogates in strings written as marshal wrote them."""
        if self._lenient is None:
            self._lenient = msgpack.Packer(default=_pack_extension,
                                           unicode_errors="surrogatepass",
                                           buf_size=_PACK_BUFFER).pack
        return self._lenient


_packers = _Packers()
_compiled_pack = None if _recordpack is None else _recordpack.pack_call
"""The compiled `encode_call` of plain values (docs/compiled.md): the same bytes, or None for
any value it leaves to the Python path; None when not in use."""


def encode_call(fields: tuple) -> bytes:
    """Pack a plain tuple in `CapturedCall` field order. Raises TypeError, ValueError or
    OverflowError for values MessagePack cannot carry; the caller makes callback results safe
    first (`encode_call_safely`)."""
    if _compiled_pack is not None:
        payload = _compiled_pack(fields)
        if payload is not None:
            return payload
    return CALL_V4 + _packers.pack(fields)


def encode_call_safely(fields: tuple) -> bytes:
    """`encode_call`, making request header values strings (flattened as `decode` does) and
    callback results (user, company, session token, metadata) plain JSON types, as the
    shipper would, when MessagePack refuses them (sets, datetimes, Decimals, objects from a
    WSGI server or a callback). A string with a lone surrogate is carried as it is."""
    try:
        return encode_call(fields)
    except UnicodeEncodeError:  # a lone surrogate (a ValueError too: caught below otherwise)
        try:
            return CALL_V4 + _packers.pack_lenient(fields)
        except _UNPACKABLE:
            pass
    except _UNPACKABLE:  # TypeError: a type it has no form for; ValueError: nested too deep,
        pass  # too large; OverflowError: an int no form holds (none: ext type 1 takes them)
    from .event import json_safe  # event imports this module

    names, values = fields[5]
    request_headers = (tuple(map(str, names)), tuple(map(_flat, values)))
    callback_results = tuple(json_safe(value) for value in fields[12:16])
    return CALL_V4 + _packers.pack_lenient(fields[:5] + (request_headers,) + fields[6:12]
                                           + callback_results + fields[16:])


def header_columns(pairs: Iterable[tuple[str, Any]]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """(names, values) of (name, value) pairs: request headers as a `CapturedCall` holds
    them."""
    pairs = tuple(pairs)
    return tuple(name for name, _ in pairs), tuple(value for _, value in pairs)


def encode_entity(kind: str, profile: dict) -> bytes:
    """Pack one profile update (`kind` in ENTITY_KINDS, `profile` in wire shape)."""
    return ENTITY_V2 + _packers.pack_lenient((kind, profile))


def decode(payload: bytes) -> CapturedCall | EntityUpdate | None:
    """The record in `payload`, or None when it is not a well-formed record of a known kind.
    Never raises, whatever the bytes. (Inline, with C-level passes over the headers: this runs
    for every record in the shipper.)

    Limits: `unpackb` bounds every length by the size of its input (a str, bin or ext by it,
    an array's items by it, a map's by half of it; documented, and tested in test_record.py),
    so a lying length is refused before anything is allocated for it. The one amplification
    left: an array's item slots are allocated when its header is read, so arrays nested up to
    1024 deep that each claim as many items as the payload has bytes reserve up to 8 KiB per
    payload byte (calloc'ed, mostly never touched: +75 MB of RSS for a 1 MB record, measured),
    freed when the record is refused.

    The compiled decoder, when in use, answers first for the common call record."""
    if compiled_decode is not None:
        call = compiled_decode(payload)
        if call is not NotImplemented:
            return call
    return decode_in_python(payload)


def decode_in_python(payload: bytes) -> CapturedCall | EntityUpdate | None:
    """`decode` without the compiled decoder: the reference, and the way of every record the
    compiled decoder leaves."""
    kind = payload[:1]
    if kind == CALL_V4:
        try:
            fields = _unpackb(payload[1:], strict_map_key=False, unicode_errors="surrogatepass",
                              timestamp=2, ext_hook=_read_extension)
        except TypeError:  # unhashable: an array (a tuple the worker packed) as a dict key
            return _call_of_tuples(_unpack_tuples(payload))
        except Exception:  # not one well-formed object: ValueError and its subclasses
            return None
        if (type(fields) is not list or len(fields) != FIELD_COUNT
                or tuple(map(type, _TYPED_FIELDS(fields))) not in _LIST_FIELD_TYPES):
            return None
        pairs = fields[9]
        try:
            names, values = fields[5]  # ValueError unless two columns
            if type(names) is not list or type(values) is not list \
                    or len(names) != len(values):
                return None
            "".join(names)  # TypeError unless every name is a string
            "".join(chain.from_iterable(pairs))  # TypeError unless pairs of strings,
            if not set(map(list.__len__, pairs)) <= _PAIR_LENGTH:  # of two, and arrays
                return None
        except (TypeError, ValueError):
            return None
        fields[9] = tuple(map(tuple, pairs))
        try:
            "".join(values)  # the common case: every value is a string already
            fields[5] = (tuple(names), tuple(values))
        except TypeError:
            values = _flat_values(values)
            if values is None:
                return None
            fields[5] = (tuple(names), values)
        return _new_tuple(CapturedCall, fields)  # CapturedCall._make without its checks
    if kind == ENTITY_V2:
        try:
            fields = _unpackb(payload[1:], strict_map_key=False, unicode_errors="surrogatepass",
                              timestamp=2, ext_hook=_read_extension)
        except TypeError:
            fields = _unpack_tuples(payload)
        except Exception:
            return None
        if (type(fields) in _ARRAYS and len(fields) == 2 and type(fields[0]) is str
                and fields[0] in ENTITY_KINDS and type(fields[1]) is dict):
            return EntityUpdate(*fields)
    return None


class EntityUpdate(NamedTuple):
    kind: str  # "user" | "company" | "subscription"
    profile: dict[str, Any]


def _read_extension(code: int, data: bytes) -> int:
    """The unpacker's ext_hook: ext type 1 is a big int; any other type is refused."""
    if code == _EXT_BIG_INT:
        return int.from_bytes(data, "little", signed=True)
    raise ValueError(f"unknown ext type {code}")


def _unpack_tuples(payload: bytes) -> Any:
    """The MessagePack object after the kind byte with its arrays as tuples, or None when the
    bytes are not one well-formed object. (`decode` unpacks arrays as lists, which fails for
    a record whose callback results hold a dict with a tuple key.)"""
    try:
        return _unpackb(payload[1:], use_list=False, strict_map_key=False,
                        unicode_errors="surrogatepass", timestamp=2, ext_hook=_read_extension)
    except Exception:
        return None


def _call_of_tuples(fields: Any) -> CapturedCall | None:
    """`decode`'s checks, for a record unpacked with its arrays as tuples."""
    if (type(fields) is not tuple or len(fields) != FIELD_COUNT
            or tuple(map(type, _TYPED_FIELDS(fields))) not in _FIELD_TYPES[tuple]):
        return None
    pairs = fields[9]
    try:
        names, values = fields[5]
        if type(names) is not tuple or type(values) is not tuple or len(names) != len(values):
            return None
        "".join(names)
        "".join(chain.from_iterable(pairs))
        if not set(map(tuple.__len__, pairs)) <= _PAIR_LENGTH:
            return None
    except (TypeError, ValueError):
        return None
    try:
        "".join(values)
    except TypeError:
        values = _flat_values(values)
        if values is None:
            return None
        fields = fields[:5] + ((names, values),) + fields[6:]
    return _new_tuple(CapturedCall, fields)


def _flat_values(values: list | tuple) -> tuple[str, ...] | None:
    """Request header values flattened to strings as the reference does (None → "", other
    values → JSON: a WSGI server or an earlier middleware may put non-string values in META,
    and the worker copies them as they are); None when one cannot be written."""
    try:
        return tuple(map(_flat, values))
    except (RecursionError, ValueError):  # nested too deep to write, an int too long for text
        return None


def _flat(value: object) -> str:
    if type(value) is str:
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
