"""Outgoing capture (CAPTURE_OUTGOING_REQUESTS): record every call a worker makes through
`requests` as an "Outgoing" call in the event ring.

`enable(options)` replaces `requests.Session.send`. Every call goes through it: the module
functions (`requests.get`, ...) build a Session per call, Sessions created before `enable` look
the method up on the class, and subclasses that override `send` call it through `super()`.
The replacement calls the original unchanged; once it returns, it copies the call into a
compact record (`record.py`) and appends it to this process's lane of the ring, in the caller's
thread, with no thread, lock wait or network I/O of its own. The shipper builds the event from
it (`event.py`: header and body masks, body decoding, 6-digit times).

Why `Session.send` and not `HTTPAdapter.send`: the session is known there (so a session can be
marked internal), the call's `stream` choice is known and a non-streamed body has been read by
requests itself (the adapter sees the response before requests reads its body, so capturing
there would mean reading it ourselves), adapters other than HTTPAdapter are covered, and the
redirect chain is visible, so one application call makes one record, as in the reference.

Rules:

- One record per call the application makes, from the final request and response: redirect
  hops, and calls made while one is in progress in the same thread or task (from a response
  hook or from the *_OUTGOING callbacks) are part of it, not records of their own. A context
  variable carries that state, so greenlets and asyncio tasks each have their own.
- A call that raises (connection error, timeout, too many redirects) raises the same exception
  to the caller and makes no record: there is no response to describe (the reference does
  the same).
- SKIP_OUTGOING is asked first. The callbacks get `(final PreparedRequest, Response)`; one that
  raises is treated as returning None. Their results go into the record as they are, or as
  plain JSON types when MessagePack cannot carry them.
- Bodies (LOG_BODY_OUTGOING): the request body when it is bytes-like or text (encoded as UTF-8,
  as urllib3 sends it); an upload from a file or an iterator is recorded as None, never read.
  The response body only when the response is not streamed (`stream=True` on the call or the
  session): requests has then read it already, as the application received it (with any
  Content-Encoding decoded). A streamed response is never touched. Bodies larger than
  MAX_BODY_SIZE are recorded as their size.
- The URI is the final URL without any `user:password@` (requests sends it as Basic auth and
  leaves it in the URL). There is no transaction id: none was sent with the request.
- Never captured: calls to the collector (URLs under `options.base_uri`). The shipper's
  transport does not use `requests` at all: it sends with urllib3 and never comes here.
- Capture never raises into the caller and never changes what it gets: the same Response
  object, a streamed body unread. A failed capture is counted (`capture_errors()`) and logged
  at most once a minute.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from .record import Body, encode_call_safely, header_columns
from .settings import MoesifOptions, call_user_function
from .sink import EventSink

logger = logging.getLogger("moesif_fast")

ERROR_LOG_INTERVAL = 60.0  # seconds between two logged capture errors in one process

SendFunction = Callable[..., requests.Response]

_time_ns = time.time_ns
_inside_call: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "moesif_fast_inside_outgoing_call", default=False
)
_state_lock = threading.Lock()
_capture: _OutgoingCapture | None = None  # None: calls pass straight through
_original_send: SendFunction = requests.Session.send  # what `_send` calls; set when installed
_installed = False  # `_send` is in the chain of requests.Session.send


def enable(options: MoesifOptions) -> None:
    """Capture outgoing `requests` calls with `options` (the latest call's options win).
    Idempotent and thread-safe: `requests.Session.send` is replaced once, and `_send` never
    ends up in its own chain."""
    global _capture, _original_send, _installed
    with _state_lock:
        if _capture is None or _capture.options != options:
            _capture = _OutgoingCapture(options)
        current_send = vars(requests.Session)["send"]
        # Also when another library put back the original that we had replaced.
        if not _installed or current_send is _original_send:
            _original_send = current_send
            requests.Session.send = _send  # type: ignore[method-assign]
            _installed = True


def disable() -> None:
    """Stop capturing and put the original `requests.Session.send` back. If something replaced
    `send` after us and still calls ours, ours stays in its chain and passes calls through."""
    global _capture, _installed
    with _state_lock:
        _capture = None
        if _installed and vars(requests.Session)["send"] is _send:
            requests.Session.send = _original_send  # type: ignore[method-assign]
            _installed = False


def is_enabled() -> bool:
    """Whether outgoing calls are being captured in this process."""
    return _capture is not None


def capture_errors() -> int:
    """How many calls this process failed to record since capture was last (re)configured."""
    capture = _capture
    return capture.errors if capture is not None else 0


def _send(session: requests.Session, request: requests.PreparedRequest,
          **send_options: Any) -> requests.Response:
    """`requests.Session.send` while capture is installed (see the module docstring)."""
    capture = _capture
    if capture is None or _inside_call.get() or not capture.wants(request):
        return _original_send(session, request, **send_options)
    token = _inside_call.set(True)
    try:
        request_time_ns = _time_ns()
        response = _original_send(session, request, **send_options)
        capture.record(session, request, response, send_options, request_time_ns)
        return response
    finally:
        _inside_call.reset(token)


class _OutgoingCapture:
    """Records calls for one set of options. Safe to share between threads."""

    def __init__(self, options: MoesifOptions) -> None:
        self.options = options
        self.errors = 0
        self._sink = EventSink(options)
        self._collector_prefix = options.base_uri + "/"
        self._max_body_size = options.MAX_BODY_SIZE
        self._next_error_log = 0.0

    def wants(self, request: requests.PreparedRequest) -> bool:
        """False for a call that is never captured: one to the collector."""
        try:
            return not request.url.startswith(self._collector_prefix)
        except Exception:  # not a PreparedRequest with a URL: the original send will say
            return False

    def record(self, session: requests.Session, request: requests.PreparedRequest,
               response: requests.Response, send_options: dict[str, Any],
               request_time_ns: int) -> None:
        """Append the record of a call that returned `response`. Never raises."""
        response_time_ns = _time_ns()
        try:
            self._record(session, request, response, send_options, request_time_ns,
                         response_time_ns)
        except Exception:
            self._failed()

    def _record(self, session: requests.Session, request: requests.PreparedRequest,
                response: requests.Response, send_options: dict[str, Any],
                request_time_ns: int, response_time_ns: int) -> None:
        options = self.options
        final_request = response.request or request  # after redirects
        if options.SKIP_OUTGOING and self._callback(options.SKIP_OUTGOING, final_request,
                                                    response):
            return
        request_body = response_body = None
        if options.LOG_BODY_OUTGOING:
            request_body = _request_body(final_request.body, self._max_body_size)
            streamed = send_options.get("stream", session.stream)
            if not streamed:  # requests has read it: reading it here reads nothing more
                response_body = _sized(response.content, self._max_body_size)
        method = final_request.method or ""
        url = _without_credentials(final_request.url or "")
        fields = (
            "Outgoing", request_time_ns, response_time_ns, method, url,
            header_columns(_header_pairs(final_request.headers)), None, request_body,
            response.status_code, _header_pairs(response.headers), response_body, None,
            options.IDENTIFY_USER_OUTGOING and self._callback(
                options.IDENTIFY_USER_OUTGOING, final_request, response),
            options.IDENTIFY_COMPANY_OUTGOING and self._callback(
                options.IDENTIFY_COMPANY_OUTGOING, final_request, response),
            options.GET_SESSION_TOKEN_OUTGOING and self._callback(
                options.GET_SESSION_TOKEN_OUTGOING, final_request, response),
            options.GET_METADATA_OUTGOING and self._callback(
                options.GET_METADATA_OUTGOING, final_request, response),
            1, None, options.settings_tag,
        )
        written = self._sink.append(encode_call_safely(fields))
        if options.LOCAL_DEBUG:  # never headers, bodies or the query string: they hold secrets
            logger.info("moesif_fast: outgoing %s %s -> %s, %s", method,
                        url.partition("?")[0].partition("#")[0], response.status_code,
                        "queued" if written else "DROPPED (ring full)")

    def _callback(self, callback: Callable[..., Any], *args: object) -> Any:
        return call_user_function(self.options, callback, *args)

    def _failed(self) -> None:
        self.errors += 1
        now = time.monotonic()
        if now >= self._next_error_log:
            self._next_error_log = now + ERROR_LOG_INTERVAL
            logger.warning("moesif_fast: capturing an outgoing call failed (%d so far in this "
                           "process); the caller got its response unchanged", self.errors,
                           exc_info=True)


def _request_body(body: object, limit: int) -> Body:
    """The body as it went on the wire (its size when over `limit`), or None for a file or an
    iterator (read while sending; reading it here would take it from the caller)."""
    if body is None:
        return None
    if type(body) is bytes:
        return _sized(body, limit)
    if isinstance(body, str):
        return _sized(body.encode(), limit)
    if isinstance(body, bytes | bytearray | memoryview):
        return _sized(bytes(body), limit)
    return None


def _sized(content: bytes | None, limit: int) -> Body:
    if not content:
        return None
    return content if len(content) <= limit else len(content)


def _header_pairs(headers: Mapping[Any, Any]) -> tuple[tuple[str, str], ...]:
    """(name, value) pairs with real names; values given as bytes become text."""
    store = getattr(headers, "_store", None)  # CaseInsensitiveDict: {lower: (name, value)}
    # 5x cheaper than .items(), which looks every name up again through lower().
    pairs = tuple(store.values()) if isinstance(store, dict) else tuple(headers.items())
    for name, value in pairs:
        if type(name) is not str or type(value) is not str:
            return tuple((_header_text(name), _header_text(value)) for name, value in pairs)
    return pairs


def _header_text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")  # the bytes as they went on the wire
    return str(value)


def _without_credentials(url: str) -> str:
    if "@" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


