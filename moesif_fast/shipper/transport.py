"""HTTP to the Moesif collector: each request retried until it lands, is refused, or time is up.

`CollectorTransport` is the only code in moesif_fast that talks to the network. It sends with
urllib3 directly rather than through requests (which is built on it): a POST of 60 kB takes
about 250 µs of CPU instead of 460, and the shipper shares the CPU with the web workers. It
owns one urllib3 pool manager (built in the shipper process, after any fork) and the retry
loop; urllib3's own retries and redirects are off, so that every wait goes through the
caller's deadline and stop event. Without a proxy, requests go straight to the collector's
connection pool, taken from the manager once (the manager would parse each URL and look its
pool up again), with the headers and the timeout built once: a POST of 110 kB gzipped then runs
about 16% fewer instructions outside gzip.

Connections (as they were with requests):

- Keep-alive connections to the collector, at most `pool_size`; every response is read whole,
  so that its connection goes back to the pool. No cookies are kept.
- The proxy comes from the environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY, or their
  lowercase forms), read once when the transport is built and chosen by requests' own rules.
  An HTTP(S) proxy tunnels https:// (CONNECT) and forwards http://, with Basic auth from its
  `user:password@`; a socks:// proxy needs PySocks (`requests[socks]`). A proxy that cannot be
  used makes every request a permanent failure ("invalid request").
- Certificates, of the collector and of an https:// proxy, are verified against certifi's CA
  bundle (the bundle requests uses).
- Every request carries X-Moesif-Application-Id, User-Agent and Accept-Encoding (what urllib3
  can decode: gzip, deflate...); a POST adds Content-Type, and Content-Encoding when gzipped.
- Batches of events are gzipped by the shipper's loop in a `GzipStream` (ISA-L, `isal`, when
  installed, else zlib, both at level 1; standard gzip either way), piece by piece as they are
  written, so that the batch is never held whole uncompressed; `post(..., gzipped=True)` sends
  them with Content-Encoding: gzip, and a retry resends the same bytes.
- `outgoing.py` captures calls made through `requests` only, so these are never captured.

Retry policy of `post` and `get_json`:

- 200–208 delivers. A 3xx is a permanent failure whose error names the Location: redirects are
  never followed, since a client may turn a redirected POST into a GET, losing the payload, and
  the base URI should name the collector's final address. 408, 429 and 5xx are retried. Any
  other status is permanent: resending cannot help.
- Connection errors, timeouts, resets and truncated responses are retried. A read timeout or a
  reset after the request went out may follow a delivery: the collector can then receive a
  payload twice, which we prefer to losing it.
- The wait before retry n is full jitter: uniform(0, min(max_backoff, 0.5 s × 2^(n-1))).
  A Retry-After header (delta-seconds or HTTP-date) on a retried status raises that wait to at
  least what it asks. No wait exceeds max_backoff, not even for a huge Retry-After: an exhausted
  quota is then probed once per max_backoff per sending thread, and delivery resumes within
  max_backoff of the quota's reset rather than hours later.
- `stop` is a `Stop`: waits are `stop.wait(...)`, so setting it ends a wait at once, and it
  counts the attempts on the wire, so that the ring stage spools only a batch no POST of which
  can still arrive. No attempt starts once `stop` is set or `give_up_at` (a `time.monotonic()`
  deadline) has passed, a wait that would reach `give_up_at` is not begun, and each attempt's
  connect and read timeouts are cut to the time left.
- Failures never raise: the caller gets an `Outcome`. Permanent refusals and give-ups are logged
  at WARNING on the "moesif_fast.shipper" logger, failed attempts that are retried at DEBUG.
  Every failed attempt is also counted in `failed_attempts`, with the latest in `last_failure`,
  so that the shipper can report an outage while requests are still being retried.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi
from requests.utils import (
    get_auth_from_url,
    get_environ_proxies,
    prepend_scheme_if_needed,
    select_proxy,
)
from urllib3 import (
    BaseHTTPResponse,
    HTTPConnectionPool,
    PoolManager,
    ProxyManager,
    Timeout,
    make_headers,
)
from urllib3.exceptions import (
    ConnectTimeoutError,
    InvalidHeader,
    LocationValueError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import parse_url
from urllib3.util.retry import Retry
from urllib3.util.ssl_ import create_urllib3_context

try:  # ISA-L writes the same gzip as zlib with 5 to 12 times less CPU (bench_gzip.py)
    from isal import isal_zlib
except ImportError:
    isal_zlib = None

logger = logging.getLogger("moesif_fast.shipper")

FIRST_BACKOFF_CEILING = 0.5  # seconds; the ceiling doubles after each failed attempt
BODY_SNIPPET_CHARS = 200  # how much of a failed response's body goes into errors and logs
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip container, as zlib and ISA-L take it

_SLASH_RUNS = re.compile(r"/{2,}")
_RETRY_AFTER_PARSER = Retry(0)  # used only for its Retry-After parsing
_NO_RETRIES = Retry(False, redirect=False)  # what urllib3 makes of retries=False, made once


class GzipStream:
    """One gzip member (mtime 0: the same bytes for the same data), written piece by piece.
    `compressor`: a level-1 compression object, `new_zlib_compressor()` or
    `new_isal_compressor()`; by default ISA-L's where `isal` is installed."""

    def __init__(self, compressor: Any = None) -> None:
        self._compressor = compressor or new_compressor()
        self._parts: list[bytes] = []

    def write(self, piece: bytes | memoryview) -> None:
        """Compress `piece` (read now: its memory may be reused once this returns)."""
        self._parts.append(self._compressor.compress(piece))

    def finish(self) -> bytes:
        """The gzip bytes of everything written."""
        self._parts.append(self._compressor.flush())
        return b"".join(self._parts)


def new_zlib_compressor() -> Any:
    return zlib.compressobj(1, zlib.DEFLATED, GZIP_WBITS)


def new_isal_compressor() -> Any:
    """Needs `isal`."""
    return isal_zlib.compressobj(1, isal_zlib.DEFLATED, GZIP_WBITS)


new_compressor = new_zlib_compressor if isal_zlib is None else new_isal_compressor


@dataclass(frozen=True)
class Outcome:
    """The result of one `post` or `get_json` call, with everything the caller needs to count."""

    delivered: bool  # a 200–208 arrived
    permanent: bool  # resending cannot help: 4xx other than 408/429, 3xx, or an invalid request
    status: int | None  # HTTP status of the last attempt, None if it got no response
    attempts: int  # requests started; 0 if stopped or past the deadline before the first
    error: str | None  # short reason of the last failure, None when delivered
    config_etag: str | None = None  # X-Moesif-Config-ETag of the 2xx response
    rules_tag: str | None = None  # X-Moesif-Rules-Tag of the 2xx response


@dataclass(frozen=True)
class _Failure:
    """One failed attempt: why, and what it means for the next one."""

    status: int | None
    error: str
    retryable: bool
    retry_after: float | None = None


class Stop(threading.Event):
    """Tells a request to stop retrying, and knows whether one of its attempts is on the wire.

    `set()` (the deadline, a settings restart) stops the requests between attempts; an attempt
    on the wire goes on and may still deliver. The ring stage, before it spools a batch, must
    know that nothing of it can arrive any more (else the batch arrives twice): it takes
    `sending_lock`, goes on only when `on_wire` is 0, and sets the stop while holding the lock,
    which no attempt can then start under."""

    def __init__(self) -> None:
        super().__init__()
        self.sending_lock = threading.Lock()
        self.on_wire = 0  # attempts being sent or answered now (under sending_lock)


class CollectorTransport:
    """Requests to one Moesif collector base URI; safe to use from `pool_size` threads at once.

    Thread safety: the pool manager, the collector's pool, the headers and the default timeout
    are set in `__init__` and never changed afterwards, but by `close` (urllib3 does not change
    the headers nor the timeout it is given: it clones the timeout); the memo of request targets
    is only added to, the same value for a key. urllib3's pool manager and connection pools are
    thread-safe and, when all `pool_size` connections are busy, make a caller wait for one
    instead of opening more.
    """

    def __init__(
        self,
        base_uri: str,
        application_id: str,
        *,
        user_agent: str,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_backoff: float = 30.0,
        pool_size: int = 4,
    ) -> None:
        parts = urlsplit(base_uri)
        is_plain_http_url = parts.scheme in ("http", "https") and parts.netloc
        if not is_plain_http_url or parts.query or parts.fragment:
            raise ValueError(
                f"Moesif base URI {base_uri!r} is not an http:// or https:// URL without query "
                "or fragment, such as 'https://api.moesif.net'."
            )
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._path_prefix = parts.path
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_backoff = max_backoff
        self._headers = {
            "X-Moesif-Application-Id": application_id,
            "User-Agent": user_agent,
            "Accept-Encoding": make_headers(accept_encoding=True)["accept-encoding"],
        }
        plain = {**self._headers, "Content-Type": JSON_CONTENT_TYPE}
        self._post_headers = {False: plain, True: {**plain, "Content-Encoding": "gzip"}}
        self._full_timeout = Timeout(connect=connect_timeout, read=read_timeout)
        self.failed_attempts = 0  # attempts that failed, retried or not (for the shipper's log)
        self.last_failure: str | None = None  # the latest: "POST /v1/events/batch: HTTP 503"
        self._failures_lock = threading.Lock()
        self._pool_manager: PoolManager | None = None
        self._unusable_proxy: str | None = None  # why the environment's proxy cannot be used
        try:
            self._pool_manager = _pool_manager(base_uri, pool_size)
        except ValueError as error:  # an ftp:// proxy, socks:// without PySocks...
            self._unusable_proxy = f"the proxy set in the environment cannot be used: {error}"
        self._pool: HTTPConnectionPool | None = None
        """The collector's connection pool when no proxy is used: requests go to it directly,
        without the pool manager's parsing of each URL and lookup of its pool (what
        `PoolManager.urlopen` does before calling the same pool's `urlopen`)."""
        if type(self._pool_manager) is PoolManager:
            self._pool = self._pool_manager.connection_from_url(self._origin)
        self._targets: dict[str, str] = {}  # URL: its request target (`_target`), memo

    def post(
        self,
        path: str,
        payload: bytes,
        *,
        gzipped: bool,
        give_up_at: float | None,
        stop: Stop,
    ) -> Outcome:
        """POST serialized JSON `payload` to `path` ("/v1/events/batch"); `gzipped`: it is
        gzip (`GzipStream`), sent with Content-Encoding: gzip.

        Retries by the module's policy until the payload is delivered or refused for good, the
        next wait would pass `give_up_at` (a `time.monotonic()` deadline; None: no deadline), or
        `stop` is set.
        """
        outcome, _ = self._exchange(
            "POST", path, payload, self._post_headers[gzipped], give_up_at, stop
        )
        return outcome

    def get_json(
        self, path: str, *, give_up_at: float | None, stop: Stop
    ) -> tuple[Outcome, object | None]:
        """GET `path` ("/v1/config", "/v1/rules") by `post`'s policy; a 2xx brings the parsed body.

        The body is None when the request failed or the 2xx body is not JSON.
        """
        outcome, response = self._exchange("GET", path, None, self._headers, give_up_at, stop)
        if response is None:
            return outcome, None
        try:
            return outcome, json.loads(response.data)
        except ValueError:
            return outcome, None

    def close(self) -> None:
        """Close the pooled connections. Requests made afterwards open new ones."""
        self._pool = None  # urllib3 closes a pool's connections when it is dropped, as clear()
        # drops the manager's (a request under way finishes on its connection first)
        if self._pool_manager is not None:
            self._pool_manager.clear()

    def _url(self, path: str) -> str:
        return self._origin + _SLASH_RUNS.sub("/", f"{self._path_prefix}/{path}")

    def _target(self, url: str) -> str:
        """The request target (path and query) of `url` as `PoolManager.urlopen` sends it
        when no proxy is used; raises LocationValueError for a URL urllib3 cannot send to."""
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = parse_url(url).request_uri
        return target

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        give_up_at: float | None,
        stop: Stop,
    ) -> tuple[Outcome, BaseHTTPResponse | None]:
        """Run the retry loop; the response comes back only when delivered."""
        url = self._url(path)
        attempts = 0
        last_failure: _Failure | None = None
        backoff_ceiling = min(self._max_backoff, FIRST_BACKOFF_CEILING)
        while True:
            time_left = None if give_up_at is None else give_up_at - time.monotonic()
            if stop.is_set() or (time_left is not None and time_left <= 0):
                reason = "stop requested" if stop.is_set() else "deadline reached"
                return _give_up(method, url, attempts, last_failure, reason), None
            with stop.sending_lock:  # no attempt starts while the ring stage spools the batch
                if stop.is_set():
                    return _give_up(method, url, attempts, last_failure, "stop requested"), None
                stop.on_wire += 1
            attempts += 1
            try:
                response = self._attempt(method, url, body, headers, time_left)
            finally:
                with stop.sending_lock:
                    stop.on_wire -= 1
            if isinstance(response, _Failure):
                last_failure = response
            elif 200 <= response.status <= 208:
                return _delivered(response, attempts), response
            else:
                last_failure = _http_failure(response)
            with self._failures_lock:
                self.failed_attempts += 1
                self.last_failure = f"{method} {path}: {last_failure.error}"
            if not last_failure.retryable:
                logger.warning(
                    "Moesif collector: %s %s refused for good: %s", method, url, last_failure.error
                )
                return _not_delivered(last_failure, attempts, permanent=True), None
            wait = random.uniform(0, backoff_ceiling)
            backoff_ceiling = min(self._max_backoff, backoff_ceiling * 2)
            if last_failure.retry_after is not None:
                wait = min(self._max_backoff, max(wait, last_failure.retry_after))
            if give_up_at is not None and time.monotonic() + wait >= give_up_at:
                return _give_up(method, url, attempts, last_failure, "deadline reached"), None
            logger.debug(
                "Moesif collector: %s %s attempt %d failed (%s); retrying in %.2f s",
                method, url, attempts, last_failure.error, wait,
            )
            stop.wait(wait)

    def _attempt(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        time_left: float | None,
    ) -> BaseHTTPResponse | _Failure:
        """Send once; the response is read whole (its connection goes back to the pool)."""
        if self._pool_manager is None:
            return _Failure(None, f"invalid request: {self._unusable_proxy}", retryable=False)
        timeouts = self._timeouts(time_left)
        timeout = self._full_timeout if time_left is None \
            else Timeout(connect=timeouts[0], read=timeouts[1])
        try:
            pool = self._pool
            if pool is not None:
                return pool.urlopen(
                    method, self._target(url), body=body, headers=headers, retries=_NO_RETRIES,
                    redirect=False, assert_same_host=False, timeout=timeout,
                    preload_content=True,
                )
            return self._pool_manager.urlopen(
                method, url, redirect=False, body=body, headers=headers, timeout=timeout,
                retries=_NO_RETRIES, preload_content=True,
            )
        except LocationValueError as error:  # a URL urllib3 cannot send to
            return _Failure(None, f"invalid request: {error}", retryable=False)
        except (Urllib3Error, OSError) as error:
            return _Failure(None, _describe_network_error(error, timeouts), retryable=True)
        except ValueError as error:  # a header value http.client refuses to send
            return _Failure(None, f"invalid request: {error}", retryable=False)

    def _timeouts(self, time_left: float | None) -> tuple[float, float]:
        if time_left is None:
            return self._connect_timeout, self._read_timeout
        return min(self._connect_timeout, time_left), min(self._read_timeout, time_left)


def _pool_manager(base_uri: str, pool_size: int) -> PoolManager:
    """A pool manager for `base_uri`, through the proxy the environment names for it, if any.

    Proxy selection and URL handling are requests' (`HTTPAdapter.proxy_manager_for`).
    """
    ssl_context = create_urllib3_context()  # verifies certificates and host names
    ssl_context.load_verify_locations(certifi.where())
    options: dict[str, Any] = {"maxsize": pool_size, "block": True, "ssl_context": ssl_context}
    proxy = select_proxy(base_uri, get_environ_proxies(base_uri))
    if not proxy:
        return PoolManager(**options)
    proxy = prepend_scheme_if_needed(proxy, "http")
    if not parse_url(proxy).host:
        raise ValueError("its URL has no host")
    username, password = get_auth_from_url(proxy)
    if proxy.lower().startswith("socks"):
        try:
            from urllib3.contrib.socks import SOCKSProxyManager
        except ImportError as error:
            raise ValueError("socks:// needs PySocks (pip install 'requests[socks]')") from error
        return SOCKSProxyManager(proxy, username, password, **options)
    return ProxyManager(
        proxy,
        proxy_headers=make_headers(proxy_basic_auth=f"{username}:{password}") if username else None,
        proxy_ssl_context=ssl_context,
        **options,
    )


def _give_up(
    method: str, url: str, attempts: int, last_failure: _Failure | None, reason: str
) -> Outcome:
    if last_failure is None:
        last_failure = _Failure(None, f"{reason} before the first attempt", True)
    logger.warning(
        "Moesif collector: gave up on %s %s after %d attempt(s), %s: %s",
        method, url, attempts, reason, last_failure.error,
    )
    return _not_delivered(last_failure, attempts, permanent=False)


def _delivered(response: BaseHTTPResponse, attempts: int) -> Outcome:
    return Outcome(
        delivered=True,
        permanent=False,
        status=response.status,
        attempts=attempts,
        error=None,
        config_etag=response.headers.get("X-Moesif-Config-ETag"),
        rules_tag=response.headers.get("X-Moesif-Rules-Tag"),
    )


def _not_delivered(failure: _Failure, attempts: int, *, permanent: bool) -> Outcome:
    return Outcome(
        delivered=False,
        permanent=permanent,
        status=failure.status,
        attempts=attempts,
        error=failure.error,
    )


def _http_failure(response: BaseHTTPResponse) -> _Failure:
    status = response.status
    if 300 <= status < 400:
        location = response.headers.get("Location")
        return _Failure(
            status,
            f"HTTP {status} redirect to {location!r} not followed; "
            "set the base URI to the collector's final address",
            retryable=False,
        )
    snippet = " ".join(
        response.data[:BODY_SNIPPET_CHARS].decode("utf-8", errors="replace").split()
    )
    error = f"HTTP {status} {response.reason}" + (f": {snippet}" if snippet else "")
    if status in (408, 429) or 500 <= status <= 599:
        return _Failure(status, error, retryable=True, retry_after=_retry_after_seconds(response))
    return _Failure(status, error, retryable=False)


def _retry_after_seconds(response: BaseHTTPResponse) -> float | None:
    """Seconds asked for by a Retry-After header; None if absent or unreadable."""
    try:
        return _RETRY_AFTER_PARSER.get_retry_after(response)
    except (InvalidHeader, ValueError):  # ValueError: an HTTP-date beyond datetime's range
        return None


def _describe_network_error(error: Exception, timeouts: tuple[float, float]) -> str:
    if isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError):
        return f"no connection within {timeouts[0]:.3g} s"
    if isinstance(error, ReadTimeoutError):
        return f"no response within {timeouts[1]:.3g} s"
    root: BaseException = error
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    return f"{type(root).__name__}: {root}"
