"""The compact record a worker appends to the ring for one captured API call.

The worker copies what it needs out of the live request and response into a plain tuple and
marshals it: no JSON, no base64, no header renaming in the request. The shipper unmarshals it
into a `CapturedCall` and builds the Moesif event from it (`moesif_fast.event`).

Payload layout: one kind byte, then marshal data: for b"C" (an API call) the tuple of the
`CapturedCall` fields in order; for b"U" (a user, company or subscription update, see
`entities.py`) the tuple (kind, profile dict) with the profile already in wire shape.
Workers and the shipper run the same interpreter and package version (the shipper is started
from the same environment), so marshal's format is shared; the kind byte carries the
record version, so a mixed deployment drops and counts records it cannot read instead of
misreading them.

Trust: the ring file is mode 0600 and owned by the server's user; `decode` still never raises
on bad bytes, it returns None and the caller counts the record as undecodable.
"""

from __future__ import annotations

import json
import marshal
from typing import Any, NamedTuple

CALL_V1 = b"C"
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
    request_headers: tuple[tuple[str, str], ...]
    """Incoming: WSGI META keys as Django has them (HTTP_X_API_KEY, CONTENT_TYPE,
    CONTENT_LENGTH) with their string values. Outgoing: real header names."""
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


def encode_call(fields: tuple) -> bytes:
    """Pack a plain tuple in `CapturedCall` field order. Raises ValueError for values marshal
    cannot carry; the caller (the middleware) makes callback results safe first."""
    return CALL_V1 + marshal.dumps(fields)


def encode_call_safely(fields: tuple) -> bytes:
    """`encode_call`, making header values strings and callback results (user, company,
    session token, metadata) plain JSON types, as the shipper would, when marshal refuses
    them (datetimes, Decimals, objects from a WSGI server or a callback)."""
    try:
        return encode_call(fields)
    except ValueError:
        from .event import json_safe  # event imports this module

        request_headers = tuple((str(name), str(value)) for name, value in fields[5])
        callback_results = tuple(json_safe(value) for value in fields[12:16])
        return encode_call(fields[:5] + (request_headers,) + fields[6:12] + callback_results
                           + fields[16:])


def encode_entity(kind: str, profile: dict) -> bytes:
    """Pack one profile update (`kind` in ENTITY_KINDS, `profile` in wire shape)."""
    return ENTITY_V1 + marshal.dumps((kind, profile))


def decode(payload: bytes) -> CapturedCall | EntityUpdate | None:
    """The record in `payload`, or None when it is not a well-formed record of a known kind."""
    if payload[:1] == ENTITY_V1:
        return _decode_entity(payload)
    if payload[:1] != CALL_V1:
        return None
    try:
        fields = marshal.loads(payload[1:])
    except (ValueError, EOFError, TypeError):
        return None
    if type(fields) is not tuple or len(fields) != FIELD_COUNT:
        return None
    call = CapturedCall._make(fields)
    request_headers = _header_pairs(call.request_headers)
    if request_headers is None:
        return None
    if request_headers is not call.request_headers:
        call = call._replace(request_headers=request_headers)
    if not (
        isinstance(call.direction, str)
        and type(call.request_time_ns) is int
        and type(call.response_time_ns) is int
        and isinstance(call.verb, str)
        and isinstance(call.uri, str)
        and _is_pairs(call.response_headers)
        and type(call.status) is int
        and type(call.weight) is int
        and (call.remote_addr is None or type(call.remote_addr) is str)
        and (call.transaction_id is None or type(call.transaction_id) is str)
        and (call.blocked_by is None or type(call.blocked_by) is str)
        and _is_body(call.request_body)
        and _is_body(call.response_body)
    ):
        return None
    return call


class EntityUpdate(NamedTuple):
    kind: str  # "user" | "company" | "subscription"
    profile: dict[str, Any]


def _decode_entity(payload: bytes) -> EntityUpdate | None:
    try:
        fields = marshal.loads(payload[1:])
    except (ValueError, EOFError, TypeError):
        return None
    if (type(fields) is tuple and len(fields) == 2 and fields[0] in ENTITY_KINDS
            and type(fields[1]) is dict):
        return EntityUpdate(*fields)
    return None


def _is_body(value: object) -> bool:
    return value is None or type(value) in (bytes, int)


def _header_pairs(value: object) -> tuple[tuple[str, str], ...] | None:
    """Request headers with string values, as the reference flattens them (None → "", other
    values → JSON), or None when they are not (name, value) pairs. A WSGI server or an earlier
    middleware may put non-string values in META; the worker copies them as they are.
    (Checked with C-level map/set: this runs for every record in the shipper.)"""
    if type(value) is not tuple:
        return None
    if not value:
        return value
    if set(map(type, value)) != {tuple} or set(map(len, value)) != {2}:
        return None
    names, values = zip(*value, strict=True)
    if set(map(type, names)) != {str}:
        return None
    if set(map(type, values)) == {str}:
        return value
    return tuple((name, _flat(header)) for name, header in value)


def _flat(value: object) -> str:
    if type(value) is str:
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _is_pairs(value: object) -> bool:
    return type(value) is tuple and (not value or _header_pairs(value) is value)
