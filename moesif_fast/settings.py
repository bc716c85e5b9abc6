"""`settings.MOESIF_MIDDLEWARE` → validated `MoesifOptions`, and the Django system checks.

The option names, meanings and defaults are moesifdjango's (see the README's settings table);
the few options this package adds are marked "moesif_fast" below. Validation never raises into
the host application: `problems()` lists what is wrong as Django `CheckMessage`s, the checks
framework reports them at start (`manage.py check`, `runserver`, our gunicorn hooks), and a
middleware with an invalid configuration passes requests through untouched.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from django.core import checks

DEFAULT_BASE_URI = "https://api.moesif.net"
SHM_DIR = "/dev/shm"
DISK_STATE_DIR = "/var/tmp"  # the spool's default home: on disk, kept across reboots

# How EVENT_QUEUE_SIZE becomes bytes when RING_BYTES is not set: this many bytes per event held,
# capped so that the default fits in Docker's default 64 MB /dev/shm next to other users.
RING_BYTES_PER_EVENT = 4096
RING_BYTES_MIN = 4 << 20
RING_BYTES_MAX = 32 << 20

Callback = Callable[..., Any] | None


@dataclass(frozen=True)
class MoesifOptions:
    """Every option read from MOESIF_MIDDLEWARE, with its default."""

    APPLICATION_ID: str | None = None
    BASE_URI: str | None = None
    LOCAL_MOESIF_BASEURL: str | None = None
    LOCAL_DEBUG: bool = False
    LOG_BODY: bool = True
    API_VERSION: str | None = None
    SKIP: Callback = None
    IDENTIFY_USER: Callback = None
    IDENTIFY_COMPANY: Callback = None
    GET_SESSION_TOKEN: Callback = None
    GET_METADATA: Callback = None
    MASK_EVENT_MODEL: Callback = None
    REQUEST_HEADER_MASKS: list[str] | None = None
    RESPONSE_HEADER_MASKS: list[str] | None = None
    REQUEST_BODY_MASKS: list[str] | None = None
    RESPONSE_BODY_MASKS: list[str] | None = None
    AUTHORIZATION_HEADER_NAME: str = "authorization"
    AUTHORIZATION_USER_ID_FIELD: str = "sub"
    DISABLE_TRANSACTION_ID: bool = False
    BATCH_SIZE: int = 1000  # moesif_fast: the reference's is 25 (see the README's table)
    EVENT_QUEUE_SIZE: int = 1_000_000
    CAPTURE_OUTGOING_REQUESTS: bool = False
    IDENTIFY_USER_OUTGOING: Callback = None
    IDENTIFY_COMPANY_OUTGOING: Callback = None
    GET_SESSION_TOKEN_OUTGOING: Callback = None
    GET_METADATA_OUTGOING: Callback = None
    SKIP_OUTGOING: Callback = None
    LOG_BODY_OUTGOING: bool = True
    # moesif_fast: where the ring file lives (tmpfs); default /dev/shm, else the temp dir.
    RING_DIR: str | None = None
    # moesif_fast: ring size in bytes; default derived from EVENT_QUEUE_SIZE (see ring_bytes).
    RING_BYTES: int | None = None
    # moesif_fast: bodies larger than this are left out of the event and replaced by a marker.
    MAX_BODY_SIZE: int = 100_000
    # moesif_fast: seconds the shipper may take to deliver what is left at shutdown.
    SHUTDOWN_DEADLINE: float = 20.0
    # moesif_fast: where the on-disk spool lives; default /var/tmp, else the temp dir.
    SPOOL_DIR: str | None = None
    # moesif_fast: most bytes the spool holds on disk (0: no spool, the ring alone).
    SPOOL_BYTES: int = 1 << 30

    @property
    def base_uri(self) -> str:
        """The collector's base URL, as the reference chooses it."""
        return (self.BASE_URI or self.LOCAL_MOESIF_BASEURL or DEFAULT_BASE_URI).rstrip("/")

    @property
    def ring_dir(self) -> str:
        if self.RING_DIR:
            return self.RING_DIR
        return SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()

    @property
    def spool_dir(self) -> str:
        if self.SPOOL_DIR:
            return self.SPOOL_DIR
        return DISK_STATE_DIR if os.path.isdir(DISK_STATE_DIR) else tempfile.gettempdir()

    @property
    def ring_bytes(self) -> int:
        """RING_BYTES if set, else EVENT_QUEUE_SIZE × 4 KiB clamped to [4 MiB, 32 MiB]."""
        if self.RING_BYTES:
            return self.RING_BYTES
        wanted = self.EVENT_QUEUE_SIZE * RING_BYTES_PER_EVENT
        return max(RING_BYTES_MIN, min(RING_BYTES_MAX, wanted))

    @functools.cached_property
    def settings_tag(self) -> int:
        """A 32-bit digest of these options, equal in every process that loaded the same
        MOESIF_MIDDLEWARE: workers put it in each API call record, and the shipper sends a
        record only under options of the same tag (see `shipper.loop`). A callback counts by
        its module, name and source text, so editing a mask function changes the tag."""
        text = "\0".join(f"{field.name}={_stable_text(getattr(self, field.name))}"
                          for field in fields(self))
        digest = hashlib.sha256(text.encode(errors="surrogatepass")).digest()
        return int.from_bytes(digest[:4], "big") or 1  # 0: a record of no known settings


def _stable_text(value: object) -> str:
    """`value` as text that does not depend on the process (no addresses): a callback by
    its qualified name and source, anything else by its repr."""
    if not callable(value):
        return repr(value)
    named = value if hasattr(value, "__qualname__") else type(value)
    try:
        source = inspect.getsource(named)
    except (OSError, TypeError):  # defined in a REPL, a C function...
        source = ""
    return f"<{getattr(named, '__module__', '')}.{named.__qualname__}:{source}>"


_KNOWN = {f.name for f in fields(MoesifOptions)}
_BOOLS = {"LOCAL_DEBUG", "LOG_BODY", "DISABLE_TRANSACTION_ID", "CAPTURE_OUTGOING_REQUESTS",
          "LOG_BODY_OUTGOING"}
_POSITIVE_INTS = {"BATCH_SIZE", "EVENT_QUEUE_SIZE", "RING_BYTES", "MAX_BODY_SIZE"}
_CALLBACKS = {"SKIP", "IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_SESSION_TOKEN", "GET_METADATA",
              "MASK_EVENT_MODEL", "IDENTIFY_USER_OUTGOING", "IDENTIFY_COMPANY_OUTGOING",
              "GET_SESSION_TOKEN_OUTGOING", "GET_METADATA_OUTGOING", "SKIP_OUTGOING"}
_MASK_LISTS = {"REQUEST_HEADER_MASKS", "RESPONSE_HEADER_MASKS", "REQUEST_BODY_MASKS",
               "RESPONSE_BODY_MASKS"}
_STRINGS = {"APPLICATION_ID", "BASE_URI", "LOCAL_MOESIF_BASEURL", "API_VERSION",
            "AUTHORIZATION_HEADER_NAME", "AUTHORIZATION_USER_ID_FIELD", "RING_DIR", "SPOOL_DIR"}


CALLBACK_ERROR_LOG_INTERVAL = 60.0  # seconds between two warnings about one callback
_callback_errors: dict[str, list[float]] = {}  # callback → [errors not yet logged, next log]


def call_user_function(options: MoesifOptions, function: Callable[..., Any],
                       *args: object) -> Any:
    """Call a user callback (SKIP, IDENTIFY_USER, ...): its exception gives None and never
    reaches the application. Each callback's errors are logged at WARNING at most once a
    minute per process, with their count; with LOCAL_DEBUG each one, with its traceback."""
    try:
        return function(*args)
    except Exception:
        name = getattr(function, "__qualname__", repr(function))
        logger = logging.getLogger("moesif_fast")
        if options.LOCAL_DEBUG:
            logger.warning("moesif_fast: %s raised; its value is left out of the event", name,
                           exc_info=True)
            return None
        errors = _callback_errors.setdefault(name, [0, 0.0])
        errors[0] += 1
        now = time.monotonic()
        if now >= errors[1]:
            logger.warning("moesif_fast: the callback %s raised %d times since the last report; "
                           "its value is left out of those events (LOCAL_DEBUG logs each one "
                           "with its traceback)", name, errors[0])
            errors[0], errors[1] = 0, now + CALLBACK_ERROR_LOG_INTERVAL
        return None


def problems(raw: object) -> list[checks.CheckMessage]:
    """Everything wrong with a MOESIF_MIDDLEWARE value, as Django check messages."""
    if raw is None:
        return [checks.Error("settings.MOESIF_MIDDLEWARE is not set.",
                             hint="Add MOESIF_MIDDLEWARE = {'APPLICATION_ID': '...'}.",
                             id="moesif_fast.E001")]
    if not isinstance(raw, Mapping):
        return [checks.Error(f"settings.MOESIF_MIDDLEWARE must be a dict, not "
                             f"{type(raw).__name__}.", id="moesif_fast.E001")]
    found: list[checks.CheckMessage] = []
    for key, value in raw.items():
        if key not in _KNOWN:
            found.append(checks.Warning(f"MOESIF_MIDDLEWARE[{key!r}] is not an option this "
                                        "middleware reads; it is ignored.",
                                        id="moesif_fast.W001"))
            continue
        if value is None:
            continue
        error = _type_error(key, value)
        if error:
            found.append(checks.Error(f"MOESIF_MIDDLEWARE[{key!r}] {error}",
                                      id="moesif_fast.E002"))
    if not raw.get("APPLICATION_ID"):
        found.append(checks.Error(
            "MOESIF_MIDDLEWARE['APPLICATION_ID'] is missing or empty: no event can be sent.",
            hint="Copy it from the Moesif portal (Installation page); requests are still "
                 "served, but nothing is captured until it is set.",
            id="moesif_fast.E003"))
    for key in ("BASE_URI", "LOCAL_MOESIF_BASEURL"):
        uri = raw.get(key)
        if isinstance(uri, str) and uri and not _is_http_url(uri):
            found.append(checks.Error(
                f"MOESIF_MIDDLEWARE[{key!r}] = {uri!r} is not an http:// or https:// URL.",
                hint="For example 'https://api.moesif.net'.", id="moesif_fast.E004"))
    return found


def _type_error(key: str, value: object) -> str | None:
    if key in _BOOLS and not isinstance(value, bool):
        return f"must be True or False, not {value!r}."
    if key in _POSITIVE_INTS and (type(value) is not int or value <= 0):
        return f"must be a positive integer, not {value!r}."
    if key == "SPOOL_BYTES" and (type(value) is not int or value < 0):
        return f"must be a number of bytes (0: no spool), not {value!r}."
    if key == "SHUTDOWN_DEADLINE" and (
        isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
    ):
        return f"must be a positive number of seconds, not {value!r}."
    if key in _CALLBACKS and not callable(value):
        return f"must be a function, not {value!r}."
    if key in _MASK_LISTS and not (
        isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)
    ):
        return f"must be a list of strings, not {value!r}."
    if key in _STRINGS and not isinstance(value, str):
        return f"must be a string, not {value!r}."
    return None


def _is_http_url(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def load(raw: Mapping[str, Any]) -> MoesifOptions:
    """MoesifOptions from a MOESIF_MIDDLEWARE dict that `problems()` found no error in."""
    return MoesifOptions(**{k: v for k, v in raw.items() if k in _KNOWN and v is not None})


def configured() -> tuple[MoesifOptions | None, list[checks.CheckMessage]]:
    """The options from django.conf.settings, or None when they contain an error."""
    from django.conf import settings

    raw = getattr(settings, "MOESIF_MIDDLEWARE", None)
    found = problems(raw)
    if any(message.is_serious() for message in found):
        return None, found
    return load(raw), found


@checks.register()
def check_moesif_settings(app_configs: object = None, **kwargs: object
                          ) -> list[checks.CheckMessage]:
    """Django system check: report a bad MOESIF_MIDDLEWARE at start."""
    from django.conf import settings

    return problems(getattr(settings, "MOESIF_MIDDLEWARE", None))
