"""Turn a `CapturedCall` into the Moesif event, as an object or as its JSON text, and JSON
events into a batch.

Runs in the shipper process (the middleware borrows the header rules: `wire_headers`,
`client_ip`, `user_id_from_headers`). The worker recorded raw facts (`moesif_fast.record`); this
module applies everything moesifdjango does between capture and the wire (reference §1.4, §2.2
to §2.10): header naming and masks, the transaction-id header, body decoding and body masks,
the client IP, the user id from the Authorization header, time formatting and MASK_EVENT_MODEL.
Where the reference has a bug (§7), the behaviour here is the corrected one: an unusable
X-Forwarded-For falls through to the next header (W9), URL-safe JWT payloads decode (W12), the
Authorization header is read before header masks (W12), header masks also apply to outgoing
calls (W20), gzip bodies are decompressed with a size cap (W16), and one value JSON cannot carry
changes only its own event, never the batch (W9).

What the shipper sends is `EventBuilder.encode`: the event's JSON text, written by orjson (C:
3 to 8 times the speed of the standard library on these events). A JSON body that nothing may
change (no body masks on its side, no MASK_EVENT_MODEL) is copied into that text as the client
sent it, once orjson has accepted it as JSON that the standard parser accepts too (see
`_is_copyable_json`): the copy parses to the value `build` puts in the event, without the cost
of building and encoding that value again. The text is written around the body, never
searched, so no body content can move or fake a field. An event orjson cannot write (a callback
returned a set, bytes, an integer past 64 bits...) is written as `build` makes it, by the
standard library.

`encode` first asks the compiled extension `moesif_fast._eventjson` (docs/compiled.md), when it
is built: it writes the same bytes in C for the common calls and answers None for the others,
which go the Python way below. MOESIF_FAST_PURE_PYTHON=1 (read at import) leaves it unused.
"""

from __future__ import annotations

import binascii
import datetime
import decimal
import ipaddress
import json
import math
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import orjson

from . import compiled
from .record import FIELD_COUNT, Body, CapturedCall, compiled_decode, decode_in_python
from .settings import MoesifOptions

_eventjson = compiled("_eventjson")

INCOMING = "Incoming"
OUTGOING = "Outgoing"
TRANSACTION_HEADER = "X-MOESIF-TRANSACTION-ID"
"""The request-header key carrying the transaction id; upper case even when masks lowercase
the other keys (reference §2.7)."""

# Client-IP headers in the reference's order of precedence (§2.4), as incoming wire names.
_IP_HEADERS = (
    "X-CLIENT-IP",
    "X-FORWARDED-FOR",
    "CF-CONNECTING-IP",
    "TRUE-CLIENT-IP",
    "X-REAL-IP",
    "X-CLUSTER-CLIENT-IP",
    "X-FORWARDED",
    "FORWARDED-FOR",
    "FORWARDED",
)
_FORWARDED_FOR = "X-FORWARDED-FOR"

_REQUEST_KEYS = ("time", "uri", "verb", "headers", "api_version", "ip_address", "body",
                 "transfer_encoding")
_RESPONSE_KEYS = ("time", "status", "headers", "body", "ip_address", "transfer_encoding")
_EVENT_TAIL_KEYS = ("session_token", "tags", "user_id", "company_id", "metadata", "direction",
                    "weight", "blocked_by", "transaction_id")

_NS_PER_SECOND = 1_000_000_000
PIECE_BYTES = 32 << 10  # the most of a batch `BatchWriter` hands over at a time: ISA-L, fed pieces
# of up to 32 KiB, writes the same bytes as for the whole batch; larger ones cost it up to a
# third of its compression ratio (48 to 128 KiB, measured), smaller ones more calls
_MILLISECONDS = tuple(f"{millisecond:03d}" for millisecond in range(1000))
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_JSON_STARTS = (b"{", b"[")
_OPENING_BRACKET, _COMMA = b"[,"
_MAX_NESTING = 256
"""Containers nested deeper than this are replaced by a marker when an event has to be made
JSON-safe; JSON itself (and the stack) could not carry much more."""
_CACHE_ENTRIES = 1024
"""Bound of each per-builder memo (header names, user id per token, address per IP header)."""
_MISSING = object()

_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False).encode
_JSON_WHITESPACE = " \t\n\r"
_MAX_COPIED_CONTAINERS = 900
"""A JSON body is copied only when it holds fewer "[" and "{" than this, so that it cannot nest
deeper than the standard parser goes (it fails near sys.getrecursionlimit(), 1000; orjson goes
to 1024): whatever parses the batch, copying never turns an event into one it cannot read."""


class EventDropped(Exception):
    """The event must not be sent. `reason` is a short fixed phrase to count drops by; the
    message adds the detail, and `__cause__` holds the original exception if there was one."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class EventBuilder:
    """Builds Moesif events for one set of options. Everything that depends only on the
    options is worked out once here. Safe to share between threads."""

    def __init__(self, options: MoesifOptions) -> None:
        self._api_version = options.API_VERSION
        self._request_header_masks = _lowercase_set(options.REQUEST_HEADER_MASKS)
        self._response_header_masks = _lowercase_set(options.RESPONSE_HEADER_MASKS)
        self._request_body_decoder = _body_decoder(options.REQUEST_BODY_MASKS)
        self._response_body_decoder = _body_decoder(options.RESPONSE_BODY_MASKS)
        # Where `encode` copies JSON bodies as they were sent: nothing may change them.
        self._copy_request_body = not options.REQUEST_BODY_MASKS
        self._copy_response_body = not options.RESPONSE_BODY_MASKS
        self._authorization_headers = tuple(
            name.strip().upper()
            for name in options.AUTHORIZATION_HEADER_NAME.split(",")
            if name.strip()
        )
        self._user_id_field = options.AUTHORIZATION_USER_ID_FIELD.lower()
        self._mask_event_model = options.MASK_EVENT_MODEL
        self._max_body_size = options.MAX_BODY_SIZE
        # (second since the epoch, its "YYYY-MM-DDTHH:MM:SS" text): consecutive times mostly
        # share their second. One tuple, so that threads never see half an update.
        self._formatted_second: tuple[int, str] = (0, "1970-01-01T00:00:00")
        # Memos of pure functions of header text, which repeats from request to request.
        self._header_names: dict[str, str] = {}
        self._user_ids: dict[str, str | None] = {}
        self._addresses: dict[tuple[str, str], str | None] = {}
        encoder = self._compiled_encoder()
        self._compiled_encode = None if encoder is None else encoder.encode
        self._compiled_encode_into = None if encoder is None else encoder.encode_into
        self.compiled_encode_records = None if encoder is None else encoder.encode_records
        """The extension's `encode_records` for these options (see `BatchWriter.add_records`),
        None when there is none to use."""

    def _compiled_encoder(self) -> Any:
        """The extension's Encoder for these options, None when there is none to use (not
        built, forced off, or MASK_EVENT_MODEL set: the callback needs the Python event)."""
        if _eventjson is None or self._mask_event_model is not None:
            return None
        return _eventjson.Encoder(
            field_count=FIELD_COUNT,
            api_version=self._api_version,
            request_header_masks=self._request_header_masks,
            response_header_masks=self._response_header_masks,
            copy_request_body=self._copy_request_body,
            copy_response_body=self._copy_response_body,
            authorization_headers=self._authorization_headers,
            ip_headers=_IP_HEADERS,
            transaction_header=TRANSACTION_HEADER,
            max_body_size=self._max_body_size,
            header_names=self._header_names,
            user_ids=self._user_ids,
            addresses=self._addresses,
            incoming_header_name=self._incoming_header_name,
            user_id_from_headers=self.user_id_from_headers,
            client_ip=self.client_ip,
            new_transaction_id=_new_transaction_id,
        )

    def build(self, call: CapturedCall) -> dict[str, Any]:
        """The event for `call`, keys in wire order. Raises EventDropped when it must not be
        sent (MASK_EVENT_MODEL failed, unknown direction, a time out of range)."""
        event = self._event(call, copy=False)
        if self._mask_event_model is None:
            return event
        return self._apply_mask_event_model(event)

    def encode(self, call: CapturedCall) -> bytes:
        """`build(call)` as JSON text, always valid: compact UTF-8, copied JSON bodies as the
        client sent them (see the module docstring). A value JSON cannot carry changes only this
        event (`_json_safe`). Raises EventDropped as `build` does."""
        if self._compiled_encode is not None:
            text = self._compiled_encode(call)
            if text is not None:
                return text
        return self._encode_in_python(call)

    def encode_into(self, call: CapturedCall, piece: bytearray, offset: int, prefix: int
                    ) -> int | bytes:
        """The byte `prefix` and `encode(call)` written into `piece` at `offset` by the compiled
        encoder, answering the offset after them; `encode(call)` itself where they do not fit
        or the call takes the Python path. `piece` is never resized. Raises as encode does,
        with nothing written."""
        if self._compiled_encode_into is not None:
            written = self._compiled_encode_into(call, piece, offset, prefix)
            if written is not None:
                return written
        return self._encode_in_python(call)

    def _encode_in_python(self, call: CapturedCall) -> bytes:
        if self._mask_event_model is not None:
            return _serialize_event(self.build(call))
        event = self._event(call, copy=True)
        try:
            return orjson.dumps(event)
        except orjson.JSONEncodeError:
            return _serialize_event(self._event(call, copy=False))

    def _event(self, call: CapturedCall, copy: bool) -> dict[str, Any]:
        """The event for `call` (before MASK_EVENT_MODEL), keys in wire order; with `copy`,
        JSON bodies nothing may change are orjson fragments of the body as sent."""
        (direction, request_time_ns, response_time_ns, verb, uri, (names, values), remote_addr,
         raw_request_body, status, raw_response_headers, raw_response_body, transaction_id,
         user_id, company_id, session_token, metadata, weight, blocked_by, _) = call
        if direction == INCOMING:
            incoming = True
            headers = self.wire_headers(zip(names, values, strict=True))
        elif direction == OUTGOING:
            incoming = False
            headers = dict(zip(names, values, strict=True))
        else:
            raise EventDropped("unknown direction", repr(direction))

        request_headers = _apply_header_masks(headers, self._request_header_masks)
        if transaction_id:
            request_headers[TRANSACTION_HEADER] = transaction_id
        response_headers = _apply_header_masks(
            dict(raw_response_headers), self._response_header_masks
        )
        request_body, request_encoding = self._body(
            raw_request_body, request_headers, self._request_body_decoder, "request",
            copy and self._copy_request_body,
        )
        response_body, response_encoding = self._body(
            raw_response_body, response_headers, self._response_body_decoder, "response",
            copy and self._copy_response_body,
            decoded=not incoming,  # requests has undone Content-Encoding already
        )
        if user_id is None and incoming:
            user_id = self.user_id_from_headers(headers)
        return {
            "request": {
                "time": self._format_time(request_time_ns, incoming),
                "uri": uri,
                "verb": verb,
                "headers": request_headers,
                "api_version": self._api_version,
                "ip_address": self.client_ip(headers, remote_addr) if incoming else None,
                "body": request_body,
                "transfer_encoding": request_encoding,
            },
            "response": {
                "time": self._format_time(response_time_ns, incoming),
                "status": status,
                "headers": response_headers,
                "body": response_body,
                "ip_address": None,
                "transfer_encoding": response_encoding,
            },
            "session_token": session_token,
            "tags": None,
            "user_id": user_id,
            "company_id": company_id,
            "metadata": metadata,
            "direction": direction,
            "weight": weight,
            "blocked_by": blocked_by,
            "transaction_id": transaction_id or _new_transaction_id(),
        }

    def _format_time(self, time_ns: int, incoming: bool) -> str:
        """UTC, no zone: 3 fractional digits for incoming calls, 6 for outgoing (§1.4)."""
        second, fraction_ns = divmod(time_ns, _NS_PER_SECOND)
        cached_second, text = self._formatted_second
        if second != cached_second:
            try:
                text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            except (OverflowError, OSError, ValueError) as exc:
                raise EventDropped("time out of range", str(time_ns)) from exc
            self._formatted_second = (second, text)
        if incoming:
            return f"{text}.{_MILLISECONDS[fraction_ns // 1_000_000]}"
        return f"{text}.{fraction_ns // 1_000:06d}"

    def _body(
        self, raw: Body, headers: dict[str, str], decoder: json.JSONDecoder, side: str,
        copy: bool, decoded: bool = False,
    ) -> tuple[Any, str | None]:
        """(body, transfer_encoding) for a captured body, per reference §2.2; with `copy`, a
        JSON body `_is_copyable_json` accepts is an orjson fragment of the body as sent.
        `decoded`: the bytes are already free of their Content-Encoding (an outgoing
        response)."""
        if type(raw) is int:
            return self._not_captured(
                f"{side} body of {raw} bytes not captured: it is larger than MAX_BODY_SIZE"
            )
        if not raw:
            return None, None
        if not decoded and "gzip" in _header_value(headers, "content-encoding").lower():
            try:
                decompressed = _gunzip(raw, self._max_body_size)
            except zlib.error:
                return _base64_body(raw)
            if decompressed is None:
                return self._not_captured(
                    f"{side} body not captured: it decompresses to more than MAX_BODY_SIZE"
                )
            return _base64_body(decompressed) if decompressed else (None, None)
        if raw[:1] in _JSON_STARTS:
            if copy and _is_copyable_json(raw):
                return orjson.Fragment(raw), "json"
            try:
                return _parse_json(decoder, raw.decode()), "json"
            except (ValueError, RecursionError):
                pass
        return _base64_body(raw)

    def _not_captured(self, why: str) -> tuple[dict[str, str], str]:
        return {"msg": f"{why} ({self._max_body_size} bytes)"}, "json"

    def wire_headers(self, meta_headers: Iterable[tuple[str, Any]]) -> dict[str, Any]:
        """Incoming request headers by the names the reference sends (§2.3), from META keys.
        The middleware uses this (with client_ip and user_id_from_headers) for governance and
        sampling facts, so they follow exactly the rules of the event."""
        names = self._header_names
        return {(names.get(key) or self._incoming_header_name(key)): value
                for key, value in meta_headers}

    def _incoming_header_name(self, meta_key: str) -> str:
        """WSGI META key → header name as the reference sends it: HTTP_X_API_KEY → X-API-KEY."""
        name = meta_key[5:] if meta_key.startswith("HTTP_") else meta_key
        name = name.replace("_", "-").upper()
        _remember(self._header_names, meta_key, name)
        return name

    def user_id_from_headers(self, headers: dict[str, str]) -> str | None:
        """The user id in the first configured authorization header that has a value (§2.6)."""
        for name in self._authorization_headers:
            token = headers.get(name)
            if token:
                user_id = self._user_ids.get(token, _MISSING)
                if user_id is _MISSING:
                    user_id = _user_id_from_token(token, self._user_id_field)
                    _remember(self._user_ids, token, user_id)
                return user_id
        return None

    def client_ip(self, headers: dict[str, str], remote_addr: str | None) -> str | None:
        """The first client-IP header holding a valid address (§2.4), else REMOTE_ADDR. A header
        with no valid address falls through to the next one (the reference's W9 bug fixed)."""
        if headers.keys().isdisjoint(_IP_HEADERS):  # the usual case, in one C-level look
            return remote_addr
        for name in _IP_HEADERS:
            value = headers.get(name)
            if not value:
                continue
            key = (name, value)
            address = self._addresses.get(key, _MISSING)
            if address is _MISSING:
                address = _address_in_header(name, value)
                _remember(self._addresses, key, address)
            if address:
                return address
        return remote_addr

    def _apply_mask_event_model(self, event: dict[str, Any]) -> dict[str, Any]:
        """Hand the callback an object with the reference model's attribute names and read the
        event back from what it returns. It may also return a dict of the event's shape."""
        model = SimpleNamespace(**event)
        model.request = SimpleNamespace(**event["request"])
        model.response = SimpleNamespace(**event["response"])
        try:
            returned = self._mask_event_model(model)
        except Exception as exc:
            raise EventDropped("MASK_EVENT_MODEL raised", type(exc).__name__) from exc
        try:
            event = _event_from_model(returned)
        except Exception as exc:
            raise EventDropped(
                "MASK_EVENT_MODEL returned no event", type(returned).__name__
            ) from exc
        problem = _shape_problem(event)
        if problem:  # the collector would refuse the whole batch for it (W9): drop this one
            raise EventDropped("MASK_EVENT_MODEL returned an invalid event", problem)
        return event


def _new_transaction_id() -> str:
    return str(uuid.uuid4())


class BatchWriter:
    """Writes a batch: the JSON array of events the collector takes, handed to `consume` (a
    compressor's) in pieces of at most PIECE_BYTES, each as soon as it is full. Events are
    written straight into one piece of memory, reused from piece to piece and from batch to
    batch, so an event is never a bytes object of its own nor copied again to be joined, and
    each piece is compressed while still in the CPU's caches. (Joining a whole batch instead
    cost the shipper ~3 µs per event in page faults; keeping each event as bytes and joining
    them in pieces when the batch closed, 5 to 8 % more for encode and gzip, warm.) An event
    larger than a piece is handed over on its own. For one thread at a time."""

    def __init__(self, builder: EventBuilder) -> None:
        self._encode_into = builder.encode_into
        self._encode_records = builder.compiled_encode_records
        self._decoders = (compiled_decode or decode_in_python, decode_in_python)
        self._piece = bytearray(PIECE_BYTES)
        self._view = memoryview(self._piece)  # also keeps the piece from ever being resized
        self._consume: Callable[[bytes | memoryview], object] | None = None
        self._length = 0
        self.count = 0

    def start(self, consume: Callable[[bytes | memoryview], object]) -> None:
        """Begin a batch whose pieces go to `consume`; one left unfinished is forgotten."""
        self._consume = consume
        self._length = 0
        self.count = 0

    def add(self, call: CapturedCall) -> None:
        """Append the event of `call`. Raises EventDropped (or what `encode` raises for a call
        of the wrong shape) with nothing written."""
        prefix = _COMMA if self.count else _OPENING_BRACKET
        written = self._encode_into(call, self._piece, self._length, prefix)
        if type(written) is int:
            self._length = written
            self.count += 1
        else:
            self._add(prefix, written)

    def add_records(self, payloads: list[bytes], lanes: list[int], positions: list[int],
                    start: int, mark: Callable[[int, int], object], settings_tag: int
                    ) -> tuple[int, object]:
        """Append the events of the records from `payloads[start]` on, all in C, up to the
        first record it leaves to the caller; answers that record's index (`len(payloads)`
        when none is left) and what `record.decode` answers for it. Before decoding each
        record it calls `mark(lanes[i], positions[i])`. It leaves a record that does not decode
        to a call of settings tag `settings_tag` or 0, or whose event the compiled encoder does
        not write (the caller's `add` then writes it, or raises what the Python path raises).
        Without the compiled encoder it leaves the first, undecoded: (start, NotImplemented).
        Raises what `mark` or the decoders raise; nothing it wrote in that call is then part of
        the batch. One C call for the common records of a batch, where a loop over them in
        Python cost the shipper about a fifth of its CPU under load."""
        if self._encode_records is None:
            return start, NotImplemented
        decode, otherwise = self._decoders
        while True:
            index, self._length, self.count, decoded, text = self._encode_records(
                payloads, lanes, positions, start, mark, decode, otherwise, settings_tag,
                self._piece, self._length, self.count)
            if text is None:
                return index, decoded
            self._add(_COMMA if self.count else _OPENING_BRACKET, text)  # it did not fit
            start = index + 1

    def finish(self) -> None:
        """Close the array ("[]" without events) and hand over what is left of it."""
        closing = b"]" if self.count else b"[]"
        if self._length + len(closing) > PIECE_BYTES:
            self._flush()
        self._piece[self._length:self._length + len(closing)] = closing
        self._length += len(closing)
        self._flush()
        self._consume = None

    def _add(self, prefix: int, text: bytes) -> None:
        if self._length + 1 + len(text) > PIECE_BYTES:
            self._flush()
        if 1 + len(text) > PIECE_BYTES:
            self._consume(bytes((prefix,)) + text)
        else:
            end = self._length + 1 + len(text)
            self._piece[self._length] = prefix
            self._piece[self._length + 1:end] = text
            self._length = end
        self.count += 1

    def _flush(self) -> None:
        if self._length:
            self._consume(self._view[:self._length])
            self._length = 0


def serialize_batch(events: list[bytes]) -> bytes:
    """The JSON array of events encoded by `EventBuilder.encode`, whole: what `BatchWriter`
    writes in pieces, and what the collector reads once it gunzips."""
    return b"[" + b",".join(events) + b"]"


def _serialize_event(event: dict[str, Any]) -> bytes:
    """`event` as compact ASCII JSON; if it holds a value JSON cannot carry, a JSON-safe copy
    of it (`_json_safe`)."""
    try:
        return _ENCODE(event).encode()
    except (TypeError, ValueError, RecursionError):
        return _ENCODE(_json_safe(event, 0, set())).encode()


def json_safe(value: Any) -> Any:
    """A copy of `value` that JSON can carry (see _json_safe); the worker uses it too."""
    return _json_safe(value, 0, set())


def _shape_problem(event: dict[str, Any]) -> str | None:
    """What makes `event` not of the §1.4 shape in the fields the collector checks, or None."""
    request, response = event["request"], event["response"]
    for where, part in (("request", request), ("response", response)):
        if not isinstance(part["time"], str):
            return f"{where}.time is not a string"
        headers = part["headers"]
        if not (isinstance(headers, dict) and all(
                isinstance(name, str) and isinstance(value, str)
                for name, value in headers.items())):
            return f"{where}.headers is not a map of strings"
    if not (isinstance(request["uri"], str) and isinstance(request["verb"], str)):
        return "request.uri or request.verb is not a string"
    if type(response["status"]) is not int:
        return "response.status is not an integer"
    if not isinstance(event["transaction_id"], str | None):
        return "transaction_id is not a string"
    return None


def _json_safe(value: Any, depth: int, on_path: set[int]) -> Any:
    """A copy of `value` that JSON can carry: datetime, date and time → isoformat; Decimal →
    its exact decimal text (null when not finite); bytes → UTF-8 text, else base64; NaN and
    ±Infinity → null; tuples and sets → lists; non-string keys and other objects → str();
    integers too long for decimal text → hex; a cycle or nesting deeper than _MAX_NESTING →
    a marker string."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        try:
            int.__repr__(value)
        except ValueError:
            return hex(value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list | tuple | set | frozenset):
        if depth >= _MAX_NESTING:
            return f"<nested deeper than {_MAX_NESTING} levels: left out>"
        if id(value) in on_path:
            return "<circular reference>"
        on_path.add(id(value))
        try:
            if isinstance(value, dict):
                return {
                    key if isinstance(key, str) else _text(key): _json_safe(
                        item, depth + 1, on_path
                    )
                    for key, item in value.items()
                }
            return [_json_safe(item, depth + 1, on_path) for item in value]
        finally:
            on_path.discard(id(value))
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return _base64(value)
    return _text(value)


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _event_from_model(model: Any) -> dict[str, Any]:
    request = _field(model, "request")
    response = _field(model, "response")
    event = {
        "request": {name: _field(request, name) for name in _REQUEST_KEYS},
        "response": {name: _field(response, name) for name in _RESPONSE_KEYS},
    }
    for name in _EVENT_TAIL_KEYS:
        event[name] = _field(model, name)
    return event


def _field(source: Any, name: str) -> Any:
    return source[name] if isinstance(source, dict) else getattr(source, name)


def _lowercase_set(names: list[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(name.lower() for name in names)


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


def _apply_header_masks(
    headers: dict[str, str], masks: frozenset[str] | None
) -> dict[str, str]:
    """No mask list: unchanged. A list, even empty: every key lowercased, masked names removed
    (§2.3)."""
    if masks is None:
        return headers
    masked = {}
    for name, value in headers.items():
        lowercase_name = name.lower()
        if lowercase_name not in masks:
            masked[lowercase_name] = value
    return masked


def _header_value(headers: dict[str, str], lowercase_name: str) -> str:
    if lowercase_name not in "\n".join(headers).lower():  # mostly: one C-level look
        return ""
    for name, value in headers.items():
        if name.lower() == lowercase_name:
            return value
    return ""


def _base64(data: bytes | bytearray | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _base64_body(data: bytes) -> tuple[str, str]:
    return _base64(data), "base64"


def _gunzip(data: bytes, limit: int) -> bytes | None:
    """The decompressed content of one or more gzip members, None when it exceeds `limit`
    bytes (decompression stops there). Raises zlib.error for data that is not complete gzip."""
    pieces = []
    room = limit
    while data:
        decompressor = zlib.decompressobj(_GZIP_WBITS)
        piece = decompressor.decompress(data, room + 1)
        if len(piece) > room:
            return None
        if not decompressor.eof:
            raise zlib.error("truncated gzip member")
        pieces.append(piece)
        room -= len(piece)
        data = decompressor.unused_data
    return b"".join(pieces)


def _body_decoder(masks: list[str] | None) -> json.JSONDecoder:
    """A JSON decoder that removes the keys in `masks` (exact, case-sensitive) from every object
    at any depth as it parses, and rejects NaN/Infinity literals: such a body is not JSON and is
    sent as base64, unchanged."""
    if not masks:
        return json.JSONDecoder(parse_constant=_reject_constant)
    mask_set = frozenset(masks)

    def remove_masked_keys(document: dict[str, Any]) -> dict[str, Any]:
        for key in mask_set:
            document.pop(key, None)
        return document

    return json.JSONDecoder(parse_constant=_reject_constant, object_hook=remove_masked_keys)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_copyable_json(data: bytes) -> bool:
    """Whether `data` is a JSON document that can go into the event as it is: orjson accepts it
    (orjson accepts no document the standard parser, `_body_decoder(None)`, refuses; it
    refuses a few the standard parser takes, such as lone surrogate escapes, which are then
    parsed and written again) and it cannot nest too deep (`_MAX_COPIED_CONTAINERS`)."""
    if data.count(b"[") + data.count(b"{") >= _MAX_COPIED_CONTAINERS:
        return False
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _parse_json(decoder: json.JSONDecoder, text: str) -> Any:
    """`decoder.decode(text)` for a text that starts with its value (no leading whitespace),
    without its two regular-expression calls. Raises ValueError."""
    value, end = decoder.raw_decode(text)
    if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
        raise ValueError(f"extra data at char {end}")
    return value


def _address_in_header(name: str, value: str) -> str | None:
    if name == _FORWARDED_FOR:
        return _first_forwarded_address(value)
    address = value.strip()
    return address if _is_ip(address) else None


def _first_forwarded_address(value: str) -> str | None:
    """The left-most valid address in an X-Forwarded-For list; `a.b.c.d:port` counts as its
    address, IPv6 literals are taken whole."""
    for element in value.split(","):
        element = element.strip()
        if element.count(":") == 1:
            host = element.partition(":")[0]
            if _is_ip(host):
                return host
        if _is_ip(element):
            return element
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _user_id_from_token(token: str, field: str) -> str | None:
    """The user id carried by an Authorization-style header value (§2.6), with the scheme
    matched case-insensitively and payloads in either base64 alphabet. Never raises."""
    token = token.split(",", 1)[0].strip()
    words = token.split(None, 1)
    if not words:
        return None
    scheme = words[0].lower()
    rest = words[1].strip() if len(words) == 2 else ""
    if scheme == "bearer":
        parts = rest.split(".")
        return _jwt_field(parts[1], field) if len(parts) >= 3 and parts[1] else None
    if scheme == "basic":
        try:
            credentials = _lenient_b64decode(rest).decode()
        except ValueError:
            return None
        return credentials.split(":", 1)[0].strip() or None
    parts = token.split(".")
    return _jwt_field(parts[1] if len(parts) > 1 and parts[1] else token, field)


def _jwt_field(encoded_payload: str, field: str) -> str | None:
    """`field` (lowercase) of a base64 JSON object with keys compared case-insensitively, as a
    string; None when anything does not fit."""
    try:
        payload = json.loads(_lenient_b64decode(encoded_payload).decode())
        if not isinstance(payload, dict):
            return None
        value = {key.lower(): item for key, item in payload.items()}.get(field)
        if value is None:
            return None
        return (value if isinstance(value, str) else json.dumps(value)) or None
    except (ValueError, RecursionError):
        return None


def _lenient_b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional. Raises ValueError."""
    text = text.strip().replace("-", "+").replace("_", "/")
    return binascii.a2b_base64(text + "=" * (-len(text) % 4))
