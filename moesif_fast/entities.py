"""Profile updates (users, companies, subscriptions): validate, shape to the wire, queue or send.

The six functions of moesifdjango's helpers (`update_user`, `update_users_batch`,
`update_company`, `update_companies_batch`, `update_subscription`,
`update_subscriptions_batch`), callable without a middleware; `MoesifMiddleware` delegates its
methods of the same names here. Each takes a profile (or an iterable of them) and:

1. checks and shapes it, in the caller's thread, raising `ValueError` naming the function, the
   item index (batches) and the field for anything it cannot send. A batch is all-or-nothing:
   one bad item and nothing is queued or sent. An empty batch is a no-op that succeeds;
2. by default appends one ring record per profile (`record.encode_entity`) and returns at once:
   True when every record was queued, False when one was dropped (ring full or not attachable,
   or MOESIF_MIDDLEWARE invalid). The shipper delivers them in batches with retries
   (`entity_requests`), at least once, even when the collector is down at the time of the call;
3. with `sync=True`, POSTs directly instead (`/v1/users` for one profile, `/v1/users/batch` for
   a batch, as the reference does: plain JSON, not gzip), retrying 408/429/5xx and network
   errors until `timeout` seconds have passed, and returns the transport's `Outcome`. It never
   raises for network problems. It blocks: from async code, wrap it in `sync_to_async`.

Invalid MOESIF_MIDDLEWARE is not raised to the caller (like the middleware, a broken analytics
configuration must not break the views that report profiles): it is logged at ERROR once per
process and distinct problem, the queued path returns False and the sync path a permanent
`Outcome` whose error says so. Django settings must be configured (else Django's
ImproperlyConfigured propagates).

Accepted profiles: a mapping; a JSON object as str or bytes (the reference parses non-models as
JSON text); or a moesifapi model, or any object, with the field names as attributes. Only the
fields of moesif-protocol §1.5 are read; other keys are dropped (logged at DEBUG). The shape
has every field, in §1.5 order, None (null) when unset:

- ids (`user_id`, `company_id`, `subscription_id`): str, or int/UUID sent as their string;
  None or "" means unset. Required: `user_id` for users, `company_id` for companies,
  `subscription_id`, `company_id` and `status` for subscriptions (as the reference).
- dates (`modified_time`, `current_period_start`, `current_period_end`): a datetime is sent as
  its `isoformat()`: an aware one keeps its offset (`+00:00`, `-05:00`), a naive one is sent
  as given, without an offset (as the reference sends it); no zone conversion. A date becomes
  midnight (`2024-05-01T00:00:00`). A string must be ISO 8601 as `datetime.fromisoformat`
  reads it (Python 3.11 reads more forms than 3.10), with a trailing `Z` also accepted; it is
  parsed and re-emitted by the datetime rule (`...Z` → `...+00:00`, `2024-05-01` →
  `2024-05-01T00:00:00`), as the reference's parse-and-isoformat does. Other formats, and
  numbers (epoch seconds or milliseconds?), are refused. None or a blank string means unset.
- `metadata`: a mapping or None, made JSON-safe so one odd value never fails a batch: keys
  become strings; numbers stay numbers (int and float subclasses such as IntEnum or numpy
  scalars become plain int and float) but NaN and infinities become "nan", "inf", "-inf";
  datetime/date/time → isoformat; Decimal, UUID and any other object → str(); bytes → UTF-8
  text (invalid bytes replaced); tuples → lists; sets → lists sorted by repr; nesting deeper
  than MAX_METADATA_DEPTH → str() of the deeper value.
- `campaign` (users, companies): a mapping or model object shaped to the eight Campaign
  fields, or None.
- other fields (ip_address, session_token, user_agent_string, company_domain, status, the
  campaign's): text; bytes are decoded, scalars such as IPv4Address go through str(), while
  mappings and sequences are refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import numbers
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from . import __version__, ringfile, settings
from .record import EntityUpdate, encode_entity
from .settings import MoesifOptions
from .shipper.transport import CollectorTransport, Outcome, Stop
from .sink import EventSink

logger = logging.getLogger("moesif_fast")

DEFAULT_SYNC_TIMEOUT = 5.0  # seconds a sync=True call may take, retries included
SYNC_MAX_BACKOFF = 2.0  # longest wait between two attempts of a sync call
MAX_ENTITIES_PER_REQUEST = 500  # profiles in one batch request
MAX_REQUEST_BYTES = 4 << 20  # JSON bytes in one batch request (a lone larger profile goes alone)
MAX_METADATA_DEPTH = 32  # metadata nested deeper is sent as the text of the deeper value
USER_AGENT = f"moesif_fast-python/{__version__}"

Profile = Any
"""A mapping, a JSON object as str or bytes, or an object with the fields as attributes."""


class EntitySpec(NamedTuple):
    """What one kind of profile looks like on the wire and where it goes."""

    fields: tuple[str, ...]  # the wire keys, in order
    required: tuple[str, ...]
    single_path: str
    batch_path: str


SPECS: dict[str, EntitySpec] = {  # one per record.ENTITY_KINDS
    "user": EntitySpec(
        ("user_id", "company_id", "modified_time", "ip_address", "session_token",
         "user_agent_string", "metadata", "campaign"),
        ("user_id",), "/v1/users", "/v1/users/batch"),
    "company": EntitySpec(
        ("company_id", "company_domain", "modified_time", "ip_address", "session_token",
         "metadata", "campaign"),
        ("company_id",), "/v1/companies", "/v1/companies/batch"),
    "subscription": EntitySpec(
        ("subscription_id", "company_id", "current_period_start", "current_period_end",
         "status", "metadata"),
        ("subscription_id", "company_id", "status"), "/v1/subscriptions",
        "/v1/subscriptions/batch"),
}
CAMPAIGN_FIELDS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
                   "referrer", "referring_domain", "gclid")


class EntityRequest(NamedTuple):
    """One batch request for the shipper: POST `body` (a JSON array, not gzipped) to `path`."""

    path: str
    body: bytes
    count: int  # profiles in the body


# --- the public functions ---------------------------------------------------------------------


def update_user(profile: Profile, *, sync: bool = False,
                timeout: float = DEFAULT_SYNC_TIMEOUT) -> bool | Outcome:
    """Queue one user update (True: queued, False: dropped), or with `sync` send it now and
    return the `Outcome`. Raises ValueError for an invalid profile (user_id is required)."""
    return _update_one("user", "update_user", profile, sync, timeout)


def update_users_batch(profiles: Iterable[Profile], *, sync: bool = False,
                       timeout: float = DEFAULT_SYNC_TIMEOUT) -> bool | Outcome:
    """`update_user` for each profile, all-or-nothing: ValueError names the first bad item."""
    return _update_many("user", "update_users_batch", profiles, sync, timeout)


def update_company(profile: Profile, *, sync: bool = False,
                   timeout: float = DEFAULT_SYNC_TIMEOUT) -> bool | Outcome:
    """Queue one company update, or send it with `sync`; company_id is required."""
    return _update_one("company", "update_company", profile, sync, timeout)


def update_companies_batch(profiles: Iterable[Profile], *, sync: bool = False,
                           timeout: float = DEFAULT_SYNC_TIMEOUT) -> bool | Outcome:
    """`update_company` for each profile, all-or-nothing."""
    return _update_many("company", "update_companies_batch", profiles, sync, timeout)


def update_subscription(subscription: Profile, *, sync: bool = False,
                        timeout: float = DEFAULT_SYNC_TIMEOUT) -> bool | Outcome:
    """Queue one subscription update, or send it with `sync`; subscription_id, company_id and
    status are required."""
    return _update_one("subscription", "update_subscription", subscription, sync, timeout)


def update_subscriptions_batch(subscriptions: Iterable[Profile], *, sync: bool = False,
                               timeout: float = DEFAULT_SYNC_TIMEOUT) -> bool | Outcome:
    """`update_subscription` for each one, all-or-nothing."""
    return _update_many("subscription", "update_subscriptions_batch", subscriptions, sync,
                        timeout)


def shape_profile(kind: str, profile: Profile, where: str = "profile") -> dict[str, Any]:
    """The wire shape (§1.5) of one `kind` profile by the module's rules. Raises ValueError,
    its message starting with `where` and naming the field, when it cannot be sent."""
    spec = SPECS[kind]
    source = _read_fields(profile, spec.fields, where)
    shaped: dict[str, Any] = {}
    for name in spec.fields:
        try:
            shaped[name] = _SHAPERS[name](source.get(name))
        except ValueError as error:
            raise ValueError(f"{where}: {name} {error}") from None
    for name in spec.required:
        if shaped[name] is None:
            raise ValueError(f"{where}: {name} is required (missing, None or empty)")
    return shaped


def entity_requests(updates: Iterable[EntityUpdate]) -> list[EntityRequest]:
    """The shipper's requests for updates read from the ring: per kind, in order, JSON arrays
    of at most MAX_ENTITIES_PER_REQUEST profiles and MAX_REQUEST_BYTES for `/v1/<kind>/batch`.
    An update that cannot be sent (no required id, not serializable) is logged and left out,
    so it cannot make the collector refuse the others."""
    items_by_kind: dict[str, list[bytes]] = {kind: [] for kind in SPECS}
    for update in updates:
        item = _wire_item(update)
        if item is not None:
            items_by_kind[update.kind].append(item)
    return [request for kind, items in items_by_kind.items()
            for request in _batch_requests(SPECS[kind].batch_path, items)]


# --- one call ---------------------------------------------------------------------------------


def _update_one(kind: str, function: str, profile: Profile, sync: bool,
                timeout: float) -> bool | Outcome:
    _check_timeout(function, sync, timeout)
    shaped = [shape_profile(kind, profile, function)]
    return _send(SPECS[kind].single_path, shaped, timeout) if sync else _queue(kind, shaped)


def _update_many(kind: str, function: str, profiles: Iterable[Profile], sync: bool,
                 timeout: float) -> bool | Outcome:
    _check_timeout(function, sync, timeout)
    if isinstance(profiles, Mapping | str | bytes | bytearray) \
            or not isinstance(profiles, Iterable):
        raise ValueError(f"{function}: expects a list of profiles, not "
                         f"{type(profiles).__name__}")
    shaped = [shape_profile(kind, profile, f"{function}: item {index}")
              for index, profile in enumerate(profiles)]
    return _send(SPECS[kind].batch_path, shaped, timeout) if sync else _queue(kind, shaped)


def _check_timeout(function: str, sync: bool, timeout: float) -> None:
    if sync and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                 or not timeout > 0):
        raise ValueError(f"{function}: timeout must be a positive number of seconds, "
                         f"not {timeout!r}")


def _queue(kind: str, profiles: list[dict[str, Any]]) -> bool:
    """Append one record per profile; True when every one was queued."""
    if not profiles:
        return True
    sink = _process_sink()
    if sink is None:
        return False
    queued = True
    for profile in profiles:
        queued = sink.append(encode_entity(kind, profile)) and queued
    return queued


def _send(path: str, profiles: list[dict[str, Any]], timeout: float) -> Outcome:
    """POST now: to a single-profile `path` one object, to a batch path arrays within the
    request limits, in turn, stopping at the first not delivered (its Outcome is returned and
    the rest is not sent). An empty batch sends nothing and counts as delivered."""
    if not profiles:
        return Outcome(delivered=True, permanent=False, status=None, attempts=0, error=None)
    options = _valid_options()
    if options is None:
        return Outcome(delivered=False, permanent=True, status=None, attempts=0,
                       error="MOESIF_MIDDLEWARE is invalid (see the logged problems)")
    if path.endswith("/batch"):
        requests = list(_batch_requests(path, [_to_json(profile) for profile in profiles]))
    else:
        requests = [EntityRequest(path, _to_json(profiles[0]), 1)]
    transport = _process_transport(options)
    give_up_at = time.monotonic() + timeout
    never_stop = Stop()
    for request in requests:
        outcome = transport.post(request.path, request.body, gzipped=False,
                                 give_up_at=give_up_at, stop=never_stop)
        if not outcome.delivered:
            return outcome
    return outcome


# --- process-wide sink and transport ----------------------------------------------------------

_lock = threading.Lock()
_sink_key: tuple[MoesifOptions, str | None] | None = None
_sink: EventSink | None = None
_transport_key: tuple[str, str] | None = None
_transport: CollectorTransport | None = None
_reported_problems: set[str] = set()


def _valid_options() -> MoesifOptions | None:
    """The options from Django settings; None (logged once per problem) when invalid."""
    options, problems = settings.configured()
    if options is None:
        text = "; ".join(problem.msg for problem in problems if problem.is_serious())
        if text not in _reported_problems:
            _reported_problems.add(text)
            logger.error("moesif_fast: MOESIF_MIDDLEWARE is invalid (%s); profile updates are "
                         "not sent", text)
    return options


def _process_sink() -> EventSink | None:
    """This process's sink for the current options and ring. A sink keeps the ring it first
    attached to, so changed options or a changed MOESIF_FAST_RING get a new sink (the ring
    producer itself stays shared per path, see `sink`)."""
    global _sink_key, _sink
    options = _valid_options()
    if options is None:
        return None
    key = (options, os.environ.get(ringfile.RING_ENV))
    with _lock:
        if _sink is None or _sink_key != key:
            _sink, _sink_key = EventSink(options), key
        return _sink


def _process_transport(options: MoesifOptions) -> CollectorTransport:
    """One transport per process and collector, so sync calls reuse keep-alive connections."""
    global _transport_key, _transport
    key = (options.base_uri, options.APPLICATION_ID or "")
    with _lock:
        if _transport is None or _transport_key != key:
            _transport = CollectorTransport(options.base_uri, options.APPLICATION_ID or "",
                                            user_agent=USER_AGENT,
                                            max_backoff=SYNC_MAX_BACKOFF)
            _transport_key = key
        return _transport


def _forget_transport_in_child() -> None:
    """A forked child must not share the parent's pooled connections, nor a lock held then."""
    global _lock, _transport, _transport_key
    _lock = threading.Lock()
    _transport = _transport_key = None


os.register_at_fork(after_in_child=_forget_transport_in_child)


# --- reading and shaping ----------------------------------------------------------------------


def _read_fields(profile: Profile, names: tuple[str, ...], where: str) -> Mapping[str, Any]:
    """The profile's fields by name, from a mapping, JSON text or an object's attributes."""
    if isinstance(profile, str | bytes | bytearray):
        try:
            profile = json.loads(profile)
        except ValueError as error:
            raise ValueError(f"{where}: a str profile must be a JSON object ({error})") from None
        if not isinstance(profile, dict):
            raise ValueError(f"{where}: a str profile must be a JSON object, not "
                             f"{type(profile).__name__}")
    if isinstance(profile, Mapping):
        if logger.isEnabledFor(logging.DEBUG):
            unknown = [str(key) for key in profile if key not in names]
            if unknown:
                logger.debug("moesif_fast: %s: unknown keys dropped: %s", where, unknown)
        return profile
    if profile is not None and any(hasattr(profile, name) for name in names):
        return {name: getattr(profile, name, None) for name in names}
    raise ValueError(f"{where}: a profile must be a dict, a JSON object string or a model "
                     f"object with the fields as attributes, not {type(profile).__name__}")


def _identifier(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return str.__str__(value) or None  # an exact str, which the record carries as one
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, uuid.UUID):
        return str(value)
    raise ValueError(f"must be a string (or an int or UUID), not {type(value).__name__}")


def _timestamp(value: object) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time()).isoformat()
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat does not read Z
            text = text[:-1] + "+00:00"
        try:
            return datetime.datetime.fromisoformat(text).isoformat()
        except ValueError:
            raise ValueError(f"is not an ISO 8601 date or date-time: {value[:100]!r}") from None
    raise ValueError(f"must be a datetime, a date or an ISO 8601 string, not "
                     f"{type(value).__name__}")


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        raise ValueError(f"must be text, not {type(value).__name__}")
    return _as_text(value)


def _metadata(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a dict, not {type(value).__name__}")
    return _json_safe(value, 0)


def _campaign(value: object) -> dict[str, str | None] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        source: Mapping[str, Any] = value
    elif any(hasattr(value, name) for name in CAMPAIGN_FIELDS):
        source = {name: getattr(value, name, None) for name in CAMPAIGN_FIELDS}
    else:
        raise ValueError(f"must be a dict or a campaign model, not {type(value).__name__}")
    shaped = {}
    for name in CAMPAIGN_FIELDS:
        try:
            shaped[name] = _text(source.get(name))
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None
    return shaped


_SHAPERS: dict[str, Callable[[object], Any]] = {
    "user_id": _identifier,
    "company_id": _identifier,
    "subscription_id": _identifier,
    "modified_time": _timestamp,
    "current_period_start": _timestamp,
    "current_period_end": _timestamp,
    "metadata": _metadata,
    "campaign": _campaign,
    "ip_address": _text,
    "session_token": _text,
    "user_agent_string": _text,
    "company_domain": _text,
    "status": _text,
}


def _json_safe(value: Any, depth: int) -> Any:
    """`value` as plain JSON types (exact str, int, float, bool, None, dict, list) by the
    module's metadata rules; never raises."""
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if depth >= MAX_METADATA_DEPTH:
        return _as_text(value)
    if isinstance(value, Mapping):
        return {(key if type(key) is str else _as_text(key)): _json_safe(item, depth + 1)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item, depth + 1) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((_json_safe(item, depth + 1) for item in value), key=repr)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return _as_text(value)


def _as_text(value: object) -> str:
    try:
        return str.__str__(str(value))
    except Exception:  # a broken __str__ must not fail the update
        return f"<{type(value).__name__}>"


# --- JSON and batch requests ------------------------------------------------------------------


def _to_json(profile: dict[str, Any]) -> bytes:
    """JSON as the reference sends it: json.dumps defaults (ASCII, ", " and ": ")."""
    return json.dumps(profile).encode()


def _wire_item(update: EntityUpdate) -> bytes | None:
    """One ring update as JSON, or None (logged) when it cannot be sent."""
    spec = SPECS.get(update.kind)
    if spec is None or not all(isinstance(update.profile.get(name), str)
                               and update.profile[name] for name in spec.required):
        logger.warning("moesif_fast shipper: a %s update without its ids is dropped",
                       update.kind)
        return None
    try:
        return _to_json(update.profile)
    except (TypeError, ValueError, RecursionError) as error:
        logger.warning("moesif_fast shipper: a %s update cannot be serialized (%s); it is "
                       "dropped", update.kind, error)
        return None


def _batch_requests(path: str, items: list[bytes]) -> Iterator[EntityRequest]:
    """JSON arrays of `items` (serialized profiles) within the per-request limits."""
    chunk: list[bytes] = []
    size = 2  # the brackets
    for item in items:
        if chunk and (len(chunk) >= MAX_ENTITIES_PER_REQUEST
                      or size + len(item) > MAX_REQUEST_BYTES):
            yield EntityRequest(path, b"[" + b", ".join(chunk) + b"]", len(chunk))
            chunk, size = [], 2
        chunk.append(item)
        size += len(item) + 2  # the item and its ", " separator
    if chunk:
        yield EntityRequest(path, b"[" + b", ".join(chunk) + b"]", len(chunk))
