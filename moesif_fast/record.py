"""The compact record a worker appends to the ring for one captured API call.

The worker copies what it needs out of the live request and response into a plain tuple and
marshals it: no JSON, no base64, no header renaming in the request. The shipper unmarshals it
into a `CapturedCall` and builds the Moesif event from it (`moesif_fast.event`).

Payload layout: one kind byte, then

- b"D" (an API call): marshal data of the tuple of the `CapturedCall` fields in order. The
  request headers are two tuples (names, values), not a pair per header: the worker builds no
  tuple per header, and two joins check them in the shipper.
- b"U" (a user, company or subscription update, see `entities.py`): marshal data of the tuple
  (kind, profile dict) with the profile already in wire shape.

Workers and the shipper run the same interpreter and package version (the shipper is started
from the same environment), so marshal's format is shared; the kind byte carries the record
version, so a mixed deployment drops and counts records it cannot read (b"C", this layout's
predecessor, among them) instead of misreading them.

Trust: the ring file is mode 0600 and owned by the server's user; `decode` still never raises
on bad bytes, it returns None and the caller counts the record as undecodable.
"""

from __future__ import annotations

import json
import marshal
from collections.abc import Iterable
from itertools import chain, product
from operator import itemgetter
from types import NoneType
from typing import Any, NamedTuple

CALL_V2 = b"D"
ENTITY_V1 = b"U"
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
    weight: int  # sampling weight (1 = sample rate 100)
    blocked_by: str | None  # the governance rule that blocked the request, if one did


FIELD_COUNT = len(CapturedCall._fields)
_TYPED_FIELDS = itemgetter(*range(12), 16, 17)
"""The fields whose type is fixed (all but the callback results user_id … metadata)."""
_FIELD_TYPES = frozenset(
    (str, int, int, str, str, tuple, remote_addr, request_body, int, tuple, response_body,
     transaction_id, int, blocked_by)
    for remote_addr, transaction_id, blocked_by in product((str, NoneType), repeat=3)
    for request_body, response_body in product((bytes, int, NoneType), repeat=2)
)
"""Every allowed tuple of the types of `_TYPED_FIELDS`: one set lookup checks a record."""
_PAIR_LENGTH = frozenset((2,))


def encode_call(fields: tuple) -> bytes:
    """Pack a plain tuple in `CapturedCall` field order. Raises ValueError for values marshal
    cannot carry; the caller makes callback results safe first (`encode_call_safely`)."""
    return CALL_V2 + marshal.dumps(fields)


def encode_call_safely(fields: tuple) -> bytes:
    """`encode_call`, making request header values strings (flattened as `decode` does) and
    callback results (user, company, session token, metadata) plain JSON types, as the
    shipper would, when marshal refuses them (datetimes, Decimals, objects from a WSGI server
    or a callback)."""
    try:
        return encode_call(fields)
    except ValueError:
        from .event import json_safe  # event imports this module

        names, values = fields[5]
        request_headers = (tuple(map(str, names)), tuple(map(_flat, values)))
        callback_results = tuple(json_safe(value) for value in fields[12:16])
        return encode_call(fields[:5] + (request_headers,) + fields[6:12] + callback_results
                           + fields[16:])


def header_columns(pairs: Iterable[tuple[str, Any]]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """(names, values) of (name, value) pairs: request headers as a `CapturedCall` holds
    them."""
    pairs = tuple(pairs)
    return tuple(name for name, _ in pairs), tuple(value for _, value in pairs)


def encode_entity(kind: str, profile: dict) -> bytes:
    """Pack one profile update (`kind` in ENTITY_KINDS, `profile` in wire shape)."""
    return ENTITY_V1 + marshal.dumps((kind, profile))


def decode(payload: bytes) -> CapturedCall | EntityUpdate | None:
    """The record in `payload`, or None when it is not a well-formed record of a known kind."""
    if payload[:1] == ENTITY_V1:
        return _decode_entity(payload)
    if payload[:1] != CALL_V2:
        return None
    try:
        fields = marshal.loads(payload[1:])
    except (ValueError, EOFError, TypeError, MemoryError):  # MemoryError: a damaged length
        return None
    if (type(fields) is not tuple or len(fields) != FIELD_COUNT
            or tuple(map(type, _TYPED_FIELDS(fields))) not in _FIELD_TYPES):
        return None
    request_headers = _request_header_columns(fields[5])
    if request_headers is None or not _are_string_pairs(fields[9]):
        return None
    if request_headers is not fields[5]:  # values flattened to strings
        fields = fields[:5] + (request_headers,) + fields[6:]
    return CapturedCall._make(fields)


class EntityUpdate(NamedTuple):
    kind: str  # "user" | "company" | "subscription"
    profile: dict[str, Any]


def _decode_entity(payload: bytes) -> EntityUpdate | None:
    try:
        fields = marshal.loads(payload[1:])
    except (ValueError, EOFError, TypeError, MemoryError):
        return None
    if (type(fields) is tuple and len(fields) == 2 and fields[0] in ENTITY_KINDS
            and type(fields[1]) is dict):
        return EntityUpdate(*fields)
    return None


def _are_string_pairs(pairs: tuple) -> bool:
    """Whether `pairs` holds only (str, str) tuples. (C-level passes over the pairs: this runs
    for every record in the shipper.)"""
    try:
        "".join(chain.from_iterable(pairs))  # TypeError unless every item is a string
        return set(map(tuple.__len__, pairs)) <= _PAIR_LENGTH  # TypeError unless all tuples
    except TypeError:
        return False


def _request_header_columns(columns: tuple) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The request headers' (names, values) with every value a string, flattened as the
    reference does (None → "", other values → JSON: a WSGI server
    or an earlier middleware may put non-string values in META, and the worker copies them as
    they are); None when the columns are not two tuples of one length with string names, or a
    value cannot be written."""
    if len(columns) != 2:
        return None
    names, values = columns
    if type(names) is not tuple or type(values) is not tuple or len(names) != len(values):
        return None
    try:
        "".join(names)  # TypeError unless every name is a string
    except TypeError:
        return None
    try:
        "".join(values)  # the common case: every value is a string already
        return columns
    except TypeError:
        pass
    try:
        return names, tuple(map(_flat, values))
    except RecursionError:  # nested too deep to write as JSON (marshal carries deeper)
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
