"""HTTP to the Moesif collector: each request retried until it lands, is refused, or time is up.

`CollectorTransport` is the only code in moesif_fast that talks to the network. It owns one
`requests.Session` (built in the shipper process, after any fork) and the retry loop; urllib3's
own retries are off, so that every wait goes through the caller's deadline and stop event.

Retry policy of `post` and `get_json`:

- 200–208 delivers. A 3xx is a permanent failure whose error names the Location: redirects are
  never followed, because requests turns a redirected POST into a GET and the payload is lost.
  408, 429 and 5xx are retried. Any other status is permanent: resending cannot help.
- Connection errors, timeouts, resets and truncated responses are retried. A read timeout or a
  reset after the request went out may follow a delivery: the collector can then receive a
  payload twice, which we prefer to losing it.
- The wait before retry n is full jitter: uniform(0, min(max_backoff, 0.5 s × 2^(n-1))).
  A Retry-After header (delta-seconds or HTTP-date) on a retried status raises that wait to at
  least what it asks. No wait exceeds max_backoff, not even for a huge Retry-After: an exhausted
  quota is then probed once per max_backoff per sending thread, and delivery resumes within
  max_backoff of the quota's reset rather than hours later.
- Waits are `stop.wait(...)`, so setting `stop` ends a wait at once. No attempt starts once `stop`
  is set or `give_up_at` (a `time.monotonic()` deadline) has passed, a wait that would reach
  `give_up_at` is not begun, and each attempt's connect and read timeouts are cut to the time left.
- Failures never raise: the caller gets an `Outcome`. Permanent refusals and give-ups are logged
  at WARNING on the "moesif_fast.shipper" logger, failed attempts that are retried at DEBUG.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

logger = logging.getLogger("moesif_fast.shipper")

FIRST_BACKOFF_CEILING = 0.5  # seconds; the ceiling doubles after each failed attempt
BODY_SNIPPET_CHARS = 200  # how much of a failed response's body goes into errors and logs
JSON_CONTENT_TYPE = "application/json; charset=utf-8"

_RETRYABLE_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
_SLASH_RUNS = re.compile(r"/{2,}")
_RETRY_AFTER_PARSER = Retry(0)  # used only for its Retry-After parsing


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


class CollectorTransport:
    """Requests to one Moesif collector base URI; safe to use from `pool_size` threads at once.

    Thread safety: the session is configured in `__init__` and never changed afterwards; per-call
    headers go with each request; urllib3's connection pool is thread-safe and, when all
    `pool_size` connections are busy, makes a caller wait for one instead of opening more; the
    cookie jar, the only session state that requests would change, refuses every cookie (the
    collector needs none), so requests never iterate it while another thread fills it.
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
        gzip_level: int = 1,
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
        self._gzip_level = gzip_level
        self._session = requests.Session()
        self._session.moesif_fast_internal = True  # never captured (outgoing.py)
        # Proxies from the environment (HTTPS_PROXY, NO_PROXY...), read once: with trust_env
        # requests re-reads the whole environment on every request (a third of the
        # shipper's CPU at small batches).
        self._session.proxies = requests.utils.get_environ_proxies(base_uri)
        self._session.trust_env = False
        self._session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        self._session.headers.update(
            {"X-Moesif-Application-Id": application_id, "User-Agent": user_agent}
        )
        adapter = HTTPAdapter(
            pool_maxsize=pool_size, pool_block=True, max_retries=Retry(0, read=False)
        )
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def post(
        self,
        path: str,
        payload: bytes,
        *,
        compress: bool,
        give_up_at: float | None,
        stop: threading.Event,
    ) -> Outcome:
        """POST serialized JSON `payload` to `path` ("/v1/events/batch"), gzipped if `compress`.

        Retries by the module's policy until the payload is delivered or refused for good, the
        next wait would pass `give_up_at` (a `time.monotonic()` deadline; None: no deadline), or
        `stop` is set.
        """
        headers = {"Content-Type": JSON_CONTENT_TYPE}
        if compress:
            payload = gzip.compress(payload, compresslevel=self._gzip_level, mtime=0)
            headers["Content-Encoding"] = "gzip"
        outcome, _ = self._exchange("POST", path, payload, headers, give_up_at, stop)
        return outcome

    def get_json(
        self, path: str, *, give_up_at: float | None, stop: threading.Event
    ) -> tuple[Outcome, object | None]:
        """GET `path` ("/v1/config", "/v1/rules") by `post`'s policy; a 2xx brings the parsed body.

        The body is None when the request failed or the 2xx body is not JSON.
        """
        outcome, response = self._exchange("GET", path, None, {}, give_up_at, stop)
        if response is None:
            return outcome, None
        try:
            return outcome, json.loads(response.content)
        except ValueError:
            return outcome, None

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def _url(self, path: str) -> str:
        return self._origin + _SLASH_RUNS.sub("/", f"{self._path_prefix}/{path}")

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        give_up_at: float | None,
        stop: threading.Event,
    ) -> tuple[Outcome, requests.Response | None]:
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
            attempts += 1
            timeouts = self._timeouts(time_left)
            try:
                response = self._session.request(
                    method, url, data=body, headers=headers, timeout=timeouts,
                    allow_redirects=False,
                )
            except _RETRYABLE_NETWORK_ERRORS as error:
                last_failure = _Failure(None, _describe_network_error(error, timeouts), True)
            except requests.RequestException as error:
                last_failure = _Failure(None, f"invalid request: {error}", False)
            else:
                if 200 <= response.status_code <= 208:
                    return _delivered(response, attempts), response
                last_failure = _http_failure(response)
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

    def _timeouts(self, time_left: float | None) -> tuple[float, float]:
        if time_left is None:
            return self._connect_timeout, self._read_timeout
        return min(self._connect_timeout, time_left), min(self._read_timeout, time_left)


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


def _delivered(response: requests.Response, attempts: int) -> Outcome:
    return Outcome(
        delivered=True,
        permanent=False,
        status=response.status_code,
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


def _http_failure(response: requests.Response) -> _Failure:
    status = response.status_code
    if 300 <= status < 400:
        location = response.headers.get("Location")
        return _Failure(
            status,
            f"HTTP {status} redirect to {location!r} not followed; "
            "set the base URI to the collector's final address",
            retryable=False,
        )
    snippet = " ".join(
        response.content[:BODY_SNIPPET_CHARS].decode("utf-8", errors="replace").split()
    )
    error = f"HTTP {status} {response.reason}" + (f": {snippet}" if snippet else "")
    if status in (408, 429) or 500 <= status <= 599:
        return _Failure(status, error, retryable=True, retry_after=_retry_after_seconds(response))
    return _Failure(status, error, retryable=False)


def _retry_after_seconds(response: requests.Response) -> float | None:
    """Seconds asked for by a Retry-After header; None if absent or unreadable."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return _RETRY_AFTER_PARSER.parse_retry_after(value)
    except (InvalidHeader, ValueError):  # ValueError: an HTTP-date beyond datetime's range
        return None


def _describe_network_error(
    error: requests.RequestException, timeouts: tuple[float, float]
) -> str:
    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {timeouts[0]:.3g} s"
    if isinstance(error, requests.ReadTimeout):
        return f"no response within {timeouts[1]:.3g} s"
    root: BaseException = error
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    return f"{type(root).__name__}: {root}"
