"""MoesifMiddleware: capture each API call in the worker and append it to the event ring.

The hot path copies what only the live request and response can give (headers, raw bodies,
callback results, the transaction id) into a compact record (`record.py`) and appends it to
this worker's lane of the shared ring. Body decoding, masks, JSON and the network all happen in
the shipper process. Nothing here may raise into the application or block a request: a failure
in capture, in a user callback or in the ring is logged (rate-limited) and the response goes
out untouched, except for the `X-Moesif-Transaction-Id` header the reference also adds.

Drop-in for moesifdjango: `moesif_fast.middleware.moesif_middleware` is this class.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import random
import re
import sys
import time
from collections.abc import Callable
from types import CodeType, FunctionType, ModuleType
from typing import Any, NamedTuple

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings as django_settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.functional import SimpleLazyObject
from django.utils.functional import empty as lazy_empty

from . import compiled, entities, outgoing, settings
from .event import EventBuilder
from .policy import FULL_RATE, Policy, RequestFacts, Ruling
from .record import encode_call_safely
from .sink import EventSink

logger = logging.getLogger("moesif_fast")

TRANSACTION_HEADER_META = "HTTP_X_MOESIF_TRANSACTION_ID"
TRANSACTION_HEADER = "x-moesif-transaction-id"  # the reference's (lower-case) response header
MAX_CLIENT_TRANSACTION_ID = 200  # longer client-supplied ids are replaced by a fresh one
MAX_HEADER_KEY_SETS = 256  # distinct META key sets whose header names are remembered
ERROR_LOG_INTERVAL = 60.0  # seconds between two logged capture errors in one process

# The characters django.utils.encoding's escape_uri_path (path) and iri_to_uri (query) never
# quote: urllib's always-safe set plus the `safe` argument each passes to quote().
_is_plain_path = re.compile(r"[A-Za-z0-9_.~/:@&+$,!*'()-]*").fullmatch
_is_plain_query = re.compile(r"[A-Za-z0-9_.~/#%\[\]=:;$&()+,!?*@'-]*").fullmatch
_header_getters: dict[tuple[str, ...], tuple[tuple[str, ...],
                                              Callable[[dict[str, Any]], tuple[Any, ...]]]] = {}
_time_ns = time.time_ns
_random = random.random  # sampling draws: an application's random.seed() replays them
_transaction_ids = random.Random()
"""Transaction ids' own generator: an application seeding `random` must not repeat ids."""
os.register_at_fork(after_in_child=_transaction_ids.seed)  # as `random` does for its own
_getrandbits = _transaction_ids.getrandbits
_BIT_128 = 1 << 128
_NO_NEEDS: frozenset[str] = frozenset()
Gathered = tuple[int, Any, Any, Any, "bytes | int | None", Any, Any, int]
"""What a record needs from after the view, in this order: the response time, the transaction
id, the user id, the company id, the response body (or its size over MAX_BODY_SIZE), the
session token, the metadata and the weight (MoesifMiddleware._gather)."""
_recordpack = compiled("_recordpack")
_compiled_incoming = None if _recordpack is None else _recordpack.pack_incoming
"""The record of an incoming call packed straight from META and the response's header store
(docs/compiled.md): the bytes the Python path packs, or None where it leaves the call to it."""
_compiled_transaction_id = (lambda: None) if _recordpack is None else _recordpack.transaction_id
"""new_transaction_id's ids from a compiled generator of the same kind (seeded from the kernel,
reseeded in a forked child), 9x cheaper; None when it cannot seed: new_transaction_id is used."""


def new_transaction_id() -> str:
    """A random RFC 4122 version-4 UUID string, 4x cheaper than str(uuid.uuid4()): 120 random
    bits with the version nibble fixed to 4 and the variant nibble to a (binary 10xx). hex() of
    the bits with a 129th bit set gives exactly 32 digits after "0x1" without a format spec,
    whose formatter code is otherwise not in the CPU's caches during a request."""
    text = hex(_getrandbits(128) | _BIT_128)[3:]
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-a{text[17:20]}-{text[20:]}"


class MoesifMiddleware:
    """Captures every request/response pair as a Moesif event (see the module docstring)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        options, problems = settings.configured()
        for problem in problems:
            log = logger.error if problem.is_serious() else logger.warning
            log("moesif_fast: %s (%s)%s", problem.msg, problem.id,
                f" Hint: {problem.hint}" if problem.hint else "")
        if options is None:
            logger.error("moesif_fast: MOESIF_MIDDLEWARE is invalid; requests are served "
                         "but not captured.")
        self.options = options
        self._sink = EventSink(options) if options is not None else None
        if options is not None and options.CAPTURE_OUTGOING_REQUESTS:
            outgoing.enable(options)  # never disabled here: another instance may want it
        # Header naming, client IP and Authorization-header user ids, as the shipper does them
        self._builder = EventBuilder(options) if options is not None else None
        self._proxy_ssl_header = bool(django_settings.SECURE_PROXY_SSL_HEADER)
        self._forwarded_host = bool(django_settings.USE_X_FORWARDED_HOST)
        self.capture_errors = 0
        self._next_error_log = 0.0
        self._has_callbacks = options is not None and any(
            getattr(options, name) is not None for name in
            ("SKIP", "IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_SESSION_TOKEN", "GET_METADATA"))
        self._capturer = None
        """_gather and the record's packing in one compiled call, for options without
        callbacks or LOCAL_DEBUG (docs/compiled.md)."""
        if _recordpack is not None and options is not None and not self._has_callbacks \
                and not options.LOCAL_DEBUG:
            self._capturer = _recordpack.Capturer(
                settings_tag=options.settings_tag, log_body=options.LOG_BODY,
                max_body_size=options.MAX_BODY_SIZE, request_scheme=self._proxy_ssl_header,
                forwarded_host=self._forwarded_host,
                transaction_ids=not options.DISABLE_TRANSACTION_ID, response_type=HttpResponse,
                new_transaction_id=new_transaction_id,
                authenticated_user_id=_authenticated_user_id, lazy_type=SimpleLazyObject,
                lazy_empty=lazy_empty, session_auth=_known_session_auth,
                session_kinds=_plain_session_types, session_check=_session_user_is_anonymous)
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if self._is_async:
            return self._acall(request)
        if self._sink is None:
            return self.get_response(request)
        sink = self._sink
        policy = sink.policy()
        capturer = self._capturer
        if policy.captures_all and capturer is not None:  # the common case, in one C call
            request_body = self._request_body(request)
            request_time = _time_ns()
            response = self.get_response(request)
            try:
                gathered = capturer.capture(request, response, request_time, request_body,
                                            None, 1, None, sink.max_record, sink.append)
                if type(gathered) is tuple:  # too large for the ring, or declined by the
                    self._record(request, response, request_time, request_body, None,  # packer
                                 gathered)
            except Exception:
                self._capture_failed()
            return response
        sampled = True if policy.captures_all else _sample_early(policy)
        if policy.captures_all or not policy.governs():  # no governance
            # start() and finish(), without their general cases
            request_body = self._request_body(request) if sampled is not False else None
            request_time = _time_ns()
            response = self.get_response(request)
            try:
                self._capture(request, response, request_time, request_body, None, policy, None,
                              sampled)
            except Exception:
                self._capture_failed()
            return response
        started = self.start(request, read_body=sampled is not False)
        ruling = self._govern(request, policy, None, None)
        blocked = self._blocked(ruling)
        if blocked is not None:
            response = blocked  # the view does not run
        else:
            response = self.get_response(request)
            ruling = self._govern_after(request, response, policy, ruling, None)
            response = _either(self._blocked(ruling), response)
        self.finish(request, response, started, policy=policy, ruling=ruling, sampled=sampled)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        """The same as __call__ under ASGI, with no thread hop unless user callbacks are set:
        those may use the ORM, so they run in Django's sync thread as they would under WSGI.
        The user comes from auser(), as evaluating request.user would query synchronously."""
        if self._sink is None:
            return await self.get_response(request)
        policy = self._sink.policy()
        sampled = _sample_early(policy)
        started = self.start(request, read_body=sampled is not False)
        user = await _resolved_user(request)
        ruling = None
        if policy.governs():
            ruling = await self._in_sync_thread(self._govern, request, policy, None, user)
        blocked = self._blocked(ruling)
        if blocked is not None:
            response = blocked
        else:
            response = await self.get_response(request)
            if policy.governs():
                ruling = await self._in_sync_thread(self._govern_after, request, response,
                                                    policy, ruling, user)
                response = _either(self._blocked(ruling), response)
        await self._in_sync_thread(self.finish, request, response, started, user,
                                   policy=policy, ruling=ruling, sampled=sampled)
        return response

    async def _in_sync_thread(self, function: Callable[..., Any], *args: Any,
                              **kwargs: Any) -> Any:
        if self._has_callbacks:
            return await sync_to_async(function, thread_sensitive=True)(*args, **kwargs)
        return function(*args, **kwargs)

    def start(self, request: HttpRequest, read_body: bool = True
              ) -> tuple[int, bytes | int | None]:
        """Before the view: the request time and (LOG_BODY) the body, read so that the view
        can still read it."""
        body = self._request_body(request) if read_body else None
        return _time_ns(), body

    def finish(self, request: HttpRequest, response: HttpResponseBase,
               started: tuple[int, bytes | int | None], user: Any = None, *,
               policy: Policy | None = None, ruling: Ruling | None = None,
               sampled: bool | None = None) -> None:
        """After the view: capture the call (`sampled`: the sampling decision if it was taken
        before the view, see _sample_early). Never raises."""
        try:
            blocked_by = ruling.block.rule_id if ruling and ruling.block else None
            self._capture(request, response, *started, user,
                          policy or self._sink.policy(), blocked_by, sampled)
        except Exception:
            self._capture_failed()

    # -- governance ------------------------------------------------------------------------

    def _govern(self, request: HttpRequest, policy: Policy, response: HttpResponseBase | None,
                user: Any) -> Ruling | None:
        """The ruling of the rules that can be decided now (before the view when `response`
        is None). A rule that cannot be evaluated is treated as not matching."""
        try:
            facts = self._facts(request, policy.governance_needs(), response, user)
            return policy.govern(facts, after_view=response is not None)
        except Exception:
            self._capture_failed()
            return None

    def _govern_after(self, request: HttpRequest, response: HttpResponseBase, policy: Policy,
                      before: Ruling | None, user: Any) -> Ruling | None:
        """Apply the rules that need the response: a block replaces it; the headers of the
        matched non-blocking rules are added to it."""
        ruling = self._govern(request, policy, response, user) if policy.needs_response() \
            else None
        headers = {**(before.headers if before else {}), **(ruling.headers if ruling else {})}
        if ruling is not None and ruling.block is not None:
            return Ruling(headers, ruling.block)
        try:
            for name, value in headers.items():
                response[name] = value
        except Exception:
            self._capture_failed()
        return Ruling(headers, None) if headers else None

    def _blocked(self, ruling: Ruling | None) -> HttpResponseBase | None:
        """The response a blocking ruling asks for; None when nothing blocks or the rule's
        response cannot be built (then the request goes on as if no rule matched)."""
        if ruling is None or ruling.block is None:
            return None
        try:
            response = HttpResponse(ruling.block.body, status=ruling.block.status)
            for name, value in ruling.headers.items():
                response[name] = value
        except Exception:
            self._capture_failed()
            return None
        return response

    def _facts(self, request: HttpRequest, needs: frozenset[str],
               response: HttpResponseBase | None, user: Any) -> RequestFacts:
        """What the policy needs to know of this request; facts it does not need are left
        empty, so an uninterested policy costs nothing."""
        meta = request.META
        wire = self._builder.wire_headers(zip(*_meta_headers(meta), strict=True)) \
            if needs & {"headers", "ip_address", "user_id"} else {}
        user_id = None
        if "user_id" in needs:
            user_id = (self._user_id(request, response, user)
                       or self._builder.user_id_from_headers(wire))
        company_id = None
        if "company_id" in needs and self.options.IDENTIFY_COMPANY is not None:
            company_id = self._callback(self.options.IDENTIFY_COMPANY, request, response)
        return RequestFacts(
            verb=request.method or "",
            route=request.path,
            ip_address=self._builder.client_ip(wire, meta.get("REMOTE_ADDR"))
            if "ip_address" in needs else None,
            headers={name.lower(): value for name, value in wire.items()}
            if "headers" in needs else {},
            body=_json_body(request) if "body" in needs else None,
            user_id=user_id,
            company_id=company_id,
            status=response.status_code if response is not None else None,
        )

    def _request_body(self, request: HttpRequest) -> bytes | int | None:
        """The raw request body, read before the view (which can still read it), or its size
        when it is larger than MAX_BODY_SIZE (then it is left for the view to stream); None
        without LOG_BODY."""
        if not self.options.LOG_BODY:
            return None
        declared = request.META.get("CONTENT_LENGTH")
        try:
            if not declared:
                if "wsgi.input" in request.META:
                    return None  # WSGI without a length: Django reads no body either
                body = request.body  # ASGI (e.g. chunked): already received in full
                return (len(body) if len(body) > self.options.MAX_BODY_SIZE else body) or None
            size = int(declared)
            if size <= 0:
                return None
            if size > self.options.MAX_BODY_SIZE:
                return size
            return request.body or None
        except Exception:  # RawPostDataException, RequestDataTooBig, a bad length, I/O errors
            return None

    def _capture(self, request: HttpRequest, response: HttpResponseBase, request_time: int,
                 request_body: bytes | int | None, user: Any, policy: Policy,
                 blocked_by: str | None, sampled: bool | None) -> None:
        """Record the call, if SKIP and sampling let it through. `user`: request.user as
        resolved under ASGI (see _acall)."""
        if sampled is False:
            return  # sampled out before the view: no event, so no transaction id to name it
        gathered: Gathered | bool | None
        if sampled and self._capturer is not None:  # kept before the view: the common case
            rate = policy.global_sample_rate
            gathered = self._capturer.capture(
                request, response, request_time, request_body, user,
                1 if rate >= FULL_RATE else Policy.weight(rate), blocked_by,
                self._sink.max_record, self._sink.append)
            if type(gathered) is not tuple:  # appended (or dropped, counted by the ring)
                return
        else:
            gathered = self._gather(request, response, user, policy, sampled)
            if gathered is None:
                return
        self._record(request, response, request_time, request_body, blocked_by, gathered)

    def _gather(self, request: HttpRequest, response: HttpResponseBase, user: Any,
                policy: Policy, sampled: bool | None) -> Gathered | None:
        """What the record needs from after the view (the transaction id, also set on the
        response, the callbacks' and the session's values, the response body); None when SKIP
        or sampling leaves the call out. The compiled Capturer does the same in one call."""
        response_time = _time_ns()
        options = self.options
        if options.SKIP and self._callback(options.SKIP, request, response):
            return None
        meta = request.META
        header_store = getattr(response.headers, "_store", None)  # {lower name: (name, value)}
        transaction_id = None
        if not options.DISABLE_TRANSACTION_ID:
            transaction_id = meta.get(TRANSACTION_HEADER_META)
            if transaction_id and len(transaction_id) <= MAX_CLIENT_TRANSACTION_ID:
                response[TRANSACTION_HEADER] = transaction_id  # the client's: Django checks it
            else:
                transaction_id = _compiled_transaction_id() or new_transaction_id()
                # Ours is plain ASCII, which Django's checks would let through unchanged:
                # written straight into its header store (this layout since Django 3.2), a
                # third of the cost.
                if type(header_store) is dict:
                    header_store[TRANSACTION_HEADER] = (TRANSACTION_HEADER, transaction_id)
                else:
                    response[TRANSACTION_HEADER] = transaction_id
        # The rate depends on the request (decided now) only when it was not decided early.
        needs = policy.sampling_needs() if sampled is None else _NO_NEEDS
        facts = self._facts(request, needs, response, user) if needs else None
        rate = policy.global_sample_rate if facts is None else policy.sample_rate(facts)
        if sampled is None and rate < FULL_RATE and not Policy.keep(rate, _random()):
            return None
        # Ids sampling already needed are reused: a user callback runs once per request.
        user_id = facts.user_id if facts is not None and "user_id" in needs \
            else self._user_id(request, response, user)
        if facts is not None and "company_id" in needs:
            company_id = facts.company_id
        elif options.IDENTIFY_COMPANY is not None:
            company_id = self._callback(options.IDENTIFY_COMPANY, request, response)
        else:
            company_id = None
        method = request.method or ""
        response_body = None  # none for HEAD either: no body goes out on the wire (W22)
        if options.LOG_BODY and isinstance(response, HttpResponse) and method != "HEAD":
            content = response.content
            if content:
                response_body = content if len(content) <= options.MAX_BODY_SIZE \
                    else len(content)
        session_token = self._session_token(request, response)
        metadata = options.GET_METADATA and self._callback(options.GET_METADATA, request,
                                                           response)
        weight = 1 if rate >= FULL_RATE else Policy.weight(rate)
        return (response_time, transaction_id, user_id, company_id, response_body,
                session_token, metadata, weight)

    def _record(self, request: HttpRequest, response: HttpResponseBase, request_time: int,
                request_body: bytes | int | None, blocked_by: str | None,
                gathered: Gathered) -> None:
        """Pack the call's record and append it to the ring."""
        (response_time, transaction_id, user_id, company_id, response_body, session_token,
         metadata, weight) = gathered
        options = self.options
        meta = request.META
        method = request.method or ""
        payload = None
        if _compiled_incoming is not None:  # the common case, straight from META and headers
            payload = _compiled_incoming(
                meta, request.path, request.scheme if self._proxy_ssl_header else None,
                self._forwarded_host, request_time, response_time, method, request_body,
                response.status_code, getattr(response.headers, "_store", None), response_body,
                transaction_id, user_id, company_id, session_token, metadata, weight, blocked_by,
                options.settings_tag)
        if payload is None or len(payload) > self._sink.max_record:
            fields = (
                "Incoming", request_time, response_time, method, self._uri(request),
                _meta_headers(meta), meta.get("REMOTE_ADDR"), request_body,
                response.status_code, _response_headers(response), response_body,
                transaction_id, user_id, company_id, session_token, metadata, weight, blocked_by,
                options.settings_tag)
            payload = encode_call_safely(fields)
            if len(payload) > self._sink.max_record:  # too big for the ring: keep the event,
                fields = fields[:7] + (_size(request_body),) + fields[8:10] + (  # mark bodies
                    _size(response_body),) + fields[11:]
                payload = encode_call_safely(fields)
        written = self._sink.append(payload)
        if options.LOCAL_DEBUG:  # never headers, bodies or the query string: they hold secrets
            logger.info("moesif_fast: %s %s -> %d, %s", request.method, request.path,
                        response.status_code, "queued" if written else "DROPPED (ring full)")

    def _uri(self, request: HttpRequest) -> str:
        """scheme://host/path?query as the reference builds it, with the host the client sent
        (Django's get_host() re-validates ALLOWED_HOSTS on every call: 5 µs, and it raises)."""
        meta = request.META
        scheme = request.scheme if self._proxy_ssl_header \
            else meta.get("wsgi.url_scheme") or request.scheme  # ASGI has no wsgi.url_scheme
        if self._forwarded_host and "HTTP_X_FORWARDED_HOST" in meta:
            host = meta["HTTP_X_FORWARDED_HOST"]
        elif "HTTP_HOST" in meta:
            host = meta["HTTP_HOST"]
        else:
            host = meta.get("SERVER_NAME", "")
            port = str(meta.get("SERVER_PORT", ""))
            if port and port != ("443" if scheme == "https" else "80"):
                host = f"{host}:{port}"
        return f"{scheme}://{host}{_full_path(request)}"

    def _callback(self, callback: Callable[..., Any], *args: object) -> Any:
        return settings.call_user_function(self.options, callback, *args)

    def _user_id(self, request: HttpRequest, response: HttpResponseBase, user: Any) -> Any:
        if self.options.IDENTIFY_USER is not None:
            user_id = self._callback(self.options.IDENTIFY_USER, request, response)
            if user_id:
                return user_id
        try:
            if user is None and _session_user_is_anonymous(request):
                return None  # what evaluating request.user would give, without its work
            # request.user is absent without AuthenticationMiddleware. Under ASGI it arrives
            # resolved by auser(): evaluating the lazy object would query synchronously.
            user = user or getattr(request, "user", None)
        except Exception:
            return None
        return _authenticated_user_id(user)

    def _session_token(self, request: HttpRequest, response: HttpResponseBase) -> Any:
        session = getattr(request, "session", None)  # absent without SessionMiddleware
        key = getattr(session, "session_key", None) if session is not None else None
        if key or self.options.GET_SESSION_TOKEN is None:
            return key
        return self._callback(self.options.GET_SESSION_TOKEN, request, response)

    def _capture_failed(self) -> None:
        self.capture_errors += 1
        now = time.monotonic()
        if now >= self._next_error_log:
            self._next_error_log = now + ERROR_LOG_INTERVAL
            logger.warning("moesif_fast: capturing a request failed (%d so far in this process); "
                           "the response was sent unchanged", self.capture_errors, exc_info=True)


    # Profile updates, callable as in the reference: MoesifMiddleware(None).update_user({...}).
    # They go through the ring and the shipper; sync=True sends now (see moesif_fast.entities).
    update_user = staticmethod(entities.update_user)
    update_users_batch = staticmethod(entities.update_users_batch)
    update_company = staticmethod(entities.update_company)
    update_companies_batch = staticmethod(entities.update_companies_batch)
    update_subscription = staticmethod(entities.update_subscription)
    update_subscriptions_batch = staticmethod(entities.update_subscriptions_batch)


moesif_middleware = MoesifMiddleware


def _response_headers(response: HttpResponseBase) -> tuple[tuple[str, str], ...]:
    store = getattr(response.headers, "_store", None)  # {lower name: (name, value)}
    if isinstance(store, dict):
        return tuple(store.values())
    return tuple((str(name), str(value)) for name, value in response.items())


def _full_path(request: HttpRequest) -> str:
    """request.get_full_path(), without its quoting work when the path and query hold only
    characters it leaves as they are (nearly always: the path is ASCII and the query arrives
    percent-encoded)."""
    path = request.path
    query = request.META.get("QUERY_STRING")
    if _is_plain_path(path) and (not query or _is_plain_query(query)):
        return f"{path}?{query}" if query else path
    return request.get_full_path()


def _meta_headers(meta: dict[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The request headers in META as (names, values): exactly the keys that start with
    "HTTP_", then CONTENT_TYPE and CONTENT_LENGTH. Which keys those are is worked out once per
    distinct set of META keys (clients send the same headers request after request), then read
    with one C-level itemgetter."""
    keys = tuple(meta)
    known = _header_getters.get(keys)
    if known is None:
        known = _header_getter(keys)
        if len(_header_getters) >= MAX_HEADER_KEY_SETS:  # many distinct sets: start over
            _header_getters.clear()
        _header_getters[keys] = known
    names, values = known
    return names, values(meta)


def _header_getter(keys: tuple[str, ...]) -> tuple[tuple[str, ...],
                                                   Callable[[dict[str, Any]], tuple[Any, ...]]]:
    """The header names among `keys` and a function giving their values as a tuple. "`"
    follows "_": a range test is the cheapest exact prefix test (wsgiref servers also put
    os.environ in META)."""
    names = tuple(key for key in keys if "HTTP_" <= key < "HTTP`") + tuple(
        key for key in ("CONTENT_TYPE", "CONTENT_LENGTH") if key in keys)
    if len(names) > 1:
        return names, operator.itemgetter(*names)
    if names:
        name = names[0]
        return names, lambda meta: (meta[name],)
    return names, lambda meta: ()


def _sample_early(policy: Policy) -> bool | None:
    """The sampling decision, when the policy can take it before the view (it has only a
    global rate): a sampled-out request then costs no body read and no capture work. None when
    it depends on the user, company, status... (decided after the view)."""
    if policy.sampling_needs():
        return None
    rate = policy.global_sample_rate
    return rate >= FULL_RATE or Policy.keep(rate, _random())


def _either(blocked: HttpResponseBase | None, response: HttpResponseBase) -> HttpResponseBase:
    """The block response of a rule on the status, if one blocks (the view's response is then
    closed, releasing its files and generators), else the view's response."""
    if blocked is None:
        return response
    with contextlib.suppress(Exception):  # the app's own close() failing must not undo it
        response.close()
    return blocked


class _SessionAuth(NamedTuple):
    """Django's session authentication as this process runs it: the functions evaluating
    `request.user` calls (checked by identity on every use: a test's mock.patch or an app's
    monkeypatch disables the shortcut), and the session class attributes it relies on. The
    compiled Capturer reads these fields by position: keep their order."""

    middleware: ModuleType  # django.contrib.auth.middleware
    auth: ModuleType  # django.contrib.auth
    lazy_user_code: CodeType  # of AuthenticationMiddleware's `lambda: get_user(request)`
    middleware_get_user: Callable[..., Any]
    get_user: Callable[..., Any]
    get_user_session_key: Callable[..., Any]
    get_user_model: Callable[..., Any]
    session_key: str  # SESSION_KEY
    session_base: type  # django.contrib.sessions.backends.base.SessionBase


_session_auth: _SessionAuth | None = None
_session_auth_resolved = False
_plain_session_types: dict[type, bool] = {}  # session class: reads its data as SessionBase


def _authenticated_user_id(user: Any) -> Any:
    """The username of `user` when it is authenticated, else None (the shipper then reads the
    Authorization header)."""
    try:
        if user is not None and user.is_authenticated:
            get_username = getattr(user, "get_username", None)
            return (get_username() if get_username else getattr(user, "username", None)) \
                or None
    except Exception:
        pass
    return None


def _known_session_auth() -> _SessionAuth | None:
    """Django's session authentication functions, resolved on first use (None: never taken)."""
    return _session_auth if _session_auth_resolved else _resolve_session_auth()


def _session_user_is_anonymous(request: HttpRequest) -> bool:
    """True when evaluating `request.user` now would certainly give Django's AnonymousUser
    with no other effect than marking the session accessed (done here, so that
    SessionMiddleware still adds `Vary: Cookie` to the response): request.user is still the
    lazy object Django's AuthenticationMiddleware set, the functions it would call are
    Django's own, and the session holds no user id and has no key to load one with (a client
    that sent no session cookie). The view and other middleware evaluate it later as they
    would have (to the same AnonymousUser); this only saves capture the evaluation: the
    session, the user model lookup, a KeyError and an AnonymousUser (7 to 10 µs in process,
    about 20 µs of a gunicorn worker's CPU under load; tests/test_worker_cost.py checks it
    against the evaluation). False (evaluate it) in any other case, and whenever in doubt."""
    user = request.__dict__.get("user")
    if type(user) is not SimpleLazyObject:
        return False  # no auth middleware, an already real user, or another lazy type
    try:
        state = object.__getattribute__(user, "__dict__")
        setup = state.get("_setupfunc")
        if state.get("_wrapped") is not lazy_empty or hasattr(request, "_cached_user") \
                or getattr(setup, "__code__", None) is None:
            return False  # evaluated already (cheap to read), or not Django's lazy user
        known = _known_session_auth()
        if (known is None or setup.__code__ is not known.lazy_user_code
                or setup.__closure__ is None
                or setup.__closure__[0].cell_contents is not request
                or known.middleware.get_user is not known.middleware_get_user
                or known.auth.get_user is not known.get_user
                or known.auth._get_user_session_key is not known.get_user_session_key
                or known.auth.get_user_model is not known.get_user_model
                or known.session_key != known.auth.SESSION_KEY):
            return False
        session = request.__dict__.get("session")
        kind = type(session)
        plain = _plain_session_types.get(kind)
        if plain is None:
            plain = _plain_session_types[kind] = _reads_as_session_base(kind, known)
        if not plain:
            return False
        data = session.__dict__.get("_session_cache")
        if data is None:
            if session.session_key is not None:
                return False  # the session would be loaded (a query): it may hold a user
        elif type(data) is not dict or known.session_key in data:
            return False
        session.accessed = True  # SessionBase._get_session's one lasting effect here
        return True
    except Exception:
        return False


def _resolve_session_auth() -> _SessionAuth | None:
    """The functions of Django's session authentication, once per process, if they are
    Django's own (their modules are imported already: only AuthenticationMiddleware can have
    set the lazy user checked); None when anything is not as expected: the shortcut is then
    never taken in this process."""
    global _session_auth, _session_auth_resolved
    _session_auth_resolved = True
    try:
        middleware = sys.modules["django.contrib.auth.middleware"]
        auth = sys.modules["django.contrib.auth"]
        sessions = sys.modules["django.contrib.sessions.backends.base"]
        lazy_user_code = next(
            code for code in
            middleware.AuthenticationMiddleware.process_request.__code__.co_consts
            if isinstance(code, CodeType) and code.co_name == "<lambda>")
        functions = (middleware.get_user, auth.get_user, auth._get_user_session_key,
                     auth.get_user_model)
        for function, module in zip(functions, (middleware, auth, auth, auth), strict=False):
            if (type(function) is not FunctionType or function.__module__ != module.__name__
                    or function.__code__.co_filename != module.__file__):
                return None  # replaced (a mock, a wrapper)
        if "get_user" not in lazy_user_code.co_names or lazy_user_code.co_freevars != (
                "request",):
            return None
        auth.get_user_model()  # raises if AUTH_USER_MODEL is not installed
        import django.contrib.auth.models  # noqa: F401 - get_user imports it: it must load
        _session_auth = _SessionAuth(middleware, auth, lazy_user_code, *functions,
                                     auth.SESSION_KEY, sessions.SessionBase)
    except Exception:
        return None
    return _session_auth


def _reads_as_session_base(kind: type, known: _SessionAuth) -> bool:
    """True when `kind` is a session class whose `session[key]` reads its data as
    SessionBase does: the loaded dict, or an empty one (no load) when it has no key."""
    base = known.session_base
    return isinstance(kind, type) and issubclass(kind, base) and all(
        getattr(kind, name, None) is getattr(base, name)
        for name in ("__getitem__", "_session", "_get_session", "session_key"))


async def _resolved_user(request: HttpRequest) -> Any:
    """request.user under ASGI: a user set by a later authentication middleware as it is, the
    lazy session user through auser()."""
    user = request.__dict__.get("user")
    if user is not None and not isinstance(user, SimpleLazyObject):
        return user
    try:
        return await request.auser() if hasattr(request, "auser") else None
    except Exception:
        return None


def _size(body: bytes | int | None) -> int | None:
    return len(body) if isinstance(body, bytes) else body


def _json_body(request: HttpRequest) -> Any:
    """The request body parsed as JSON, for governance conditions on body fields; None when
    there is none or it is not JSON."""
    try:
        return json.loads(request.body) if request.body else None
    except Exception:
        return None


