"""A local Moesif-compatible collector: it stores in SQLite what a Moesif client sends.

It serves the collector endpoints of Moesif's API on loopback (events, users, companies,
subscriptions, config, rules, health probe), so the project's tests, the demo and curious users
can see exactly what would be sent. Standard library and orjson only.

Ingestion (`POST /v1/...`):
- bodies may be gzip (`Content-Encoding: gzip`) or plain, with a Content-Length (chunked is
  411); at most `MAX_BODY_BYTES` on the wire and after inflating. A larger declared body is
  answered 413 at once, then read and thrown away in chunks, never held: the client that sends
  it all gets the answer instead of a reset, and the connection stays usable;
- `X-Moesif-Application-Id` must equal the configured id, or be non-empty when none is
  configured (401 otherwise);
- bad gzip, bad JSON or a wrong shape is answered 400 with `{"error": "..."}` (an event needs
  string request.time/uri/verb, and a response, when not null, a string time and an integer
  status; request and response headers, when not null, are objects of strings, direction and
  transaction_id strings or null; an entity needs its ids, see ENTITY_ID_KEYS); success is 201
  with an empty body. A 201 to `POST /v1/events/batch` carries the current
  `X-Moesif-Config-ETag` and `X-Moesif-Rules-Tag`.

Control API (no application id), for tests of a client against a misbehaving collector:
- `POST /_collector/faults` `{"status": 503, "every": 3, "retry_after": 1, "delay_s": 0.5}`:
  sleep `delay_s` before answering each authorized ingestion request, and answer `status` (with
  `Retry-After` when given) to every `every`-th one, storing nothing for it. `"tags"` changes the
  tag headers (TAG_MODES): `"batches_only"` answers `GET /v1/rules` without
  `X-Moesif-Rules-Tag` (batch responses still carry it); `"new_per_batch"` does that too, and
  every batch response carries a config ETag and a rules tag never sent before, the worst case
  for a client that refreshes on a new tag. `{}` clears.
- `PUT /_collector/config`, `PUT /_collector/rules`: the JSON body becomes what `GET /v1/config`
  (an object) or `GET /v1/rules` (an array) serves, under a new tag.
- `GET /_collector/stats`: `read_stats`. `GET /_collector/events[?since_id=N]`: the stored event
  bodies as one JSON array in arrival order. Event ids are 1, 2, 3... so a reader that has seen
  N events asks for `since_id=N`.

Limits, so that no client can stall the others or make the collector's memory grow without bound:
- a connection silent for `CONNECTION_TIMEOUT_S` (in the middle of a request, or idle between
  keep-alive requests), or that leaves an answer untaken that long, is closed;
- at most `MAX_REQUESTS_IN_FLIGHT` requests are handled at once (from reading the body to
  sending the answer), each holding at most `MAX_BODY_BYTES` on the wire and as many inflated,
  plus their parsed JSON. A request that finds no free slot within `SLOT_WAIT_S` is answered 503
  with `Retry-After` (Moesif clients retry it; nothing is stored) and its body thrown away as for
  a 413. Until it has a slot, a connection costs a thread but holds no body;
- the listen backlog is `socket.SOMAXCONN`, so that a burst of connections waits to be accepted
  instead of being refused.

Storage: one SQLite file in WAL mode, so other processes can read it while the collector writes;
the `read_*` functions take only its path. It holds captured headers (bearer tokens): the
collector creates it owner-only (`PRIVATE_FILE_MODE`) before SQLite opens it, and SQLite gives its
`-wal` and `-shm` files the same mode. An existing file, or a `-wal` or `-shm` left by a killed
collector, loses any group and other access; a symlink in its place is refused. Tables:
- `requests(id, received_at, method, path, status)`: every request outside the control API;
- `batches(id, received_at, path, event_count, raw_bytes, gzip, first_event_id, body)`: one per
  stored ingestion request; `event_count` counts the events or entities it carried, `raw_bytes`
  is the body's size on the wire, `gzip` is 1 when it was gzip. For events, `body` is the
  request body exactly as received (gzip or not) and its events have the ids first_event_id,
  first_event_id + 1, ... (both columns are NULL for entities);
- `entities(id, batch_id, kind, body)`: kind is 'user', 'company' or 'subscription'; `body` is
  the entity's JSON text exactly as received.
`received_at` is Unix time in seconds. A stored request's batch and its `requests` row are
written in one transaction (the row by a trigger on `batches`). A file written by the older
collector, which stored one row per event, is refused.

Events are checked one by one but not stored one row each: the body is stored as it came, one
blob per request, which costs a small part of the CPU that cutting it into events and writing a
row for each did (the collector shares the cores with the application in the benchmarks). The
read functions inflate those bodies and cut them into events: `read_event_bodies` gives each
event's JSON text exactly as received, `read_events` the parsed events.

Python API: `LocalCollector` serves from a thread of the calling process (tests); the `read_*`
functions read the file from any process. Command line: `main` (`python -m moesif_fast
collector`), loopback only unless `--allow-remote`.

All handler threads share one SQLite connection behind a lock: SQLite admits one writer at a
time anyway, the lock makes that explicit (no SQLITE_BUSY between threads) and makes id order
the arrival order. Reads open their own short-lived connection, which WAL lets run alongside.
`PRAGMA synchronous = OFF`: what was stored survives the collector's death, not the machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import orjson

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 50 * 1024 * 1024
"""Moesif's limit for one request body, compressed or not: 50 MB, taken as 50 MiB."""
MAX_REQUESTS_IN_FLIGHT = 4
"""Requests handled at once. One shipper sends at most 4 batches at once, so it never waits; a
request of MAX_BODY_BYTES of events takes about 300 MB at its peak (the body, its inflated copy,
the text and the parsed events), so 4 of them stay near 1.2 GB however many clients connect.
The work is mostly Python, which runs one thread at a time: more slots would add memory rather
than speed."""
SLOT_WAIT_S = 2.0
"""How long a request waits for a free slot before it is answered 503. Normal requests hold one
for milliseconds; this is well under the shipper's 30 s read timeout, so that a client never gives
up on a request the collector would still store (its retry would store it twice)."""
BUSY_RETRY_AFTER_S = 1
"""The Retry-After of that 503, in seconds."""
CONNECTION_TIMEOUT_S = 30.0
"""How long a connection may stay silent, or leave an answer untaken, before it is closed: much
longer than any pause of a working client, short enough that a stalled one soon frees its thread
(and its slot, if it stalled in the middle of a body)."""
PRIVATE_FILE_MODE = 0o600
"""The mode of the database file, and so of its -wal and -shm: they hold captured headers."""

DEFAULT_CONFIG: dict[str, Any] = {"sample_rate": 100}
DEFAULT_DB_PATH = Path("moesif-collector.sqlite3")

APPLICATION_ID_HEADER = "X-Moesif-Application-Id"
CONFIG_ETAG_HEADER = "X-Moesif-Config-ETag"
RULES_TAG_HEADER = "X-Moesif-Rules-Tag"

EVENTS_BATCH_PATH = "/v1/events/batch"
CONTROL_PREFIX = "/_collector/"

ENTITY_ID_KEYS = {
    "user": ("user_id",),
    "company": ("company_id",),
    "subscription": ("subscription_id", "company_id"),
}
"""Entity kind → the keys each of its objects must carry (not null)."""


class IngestionRoute(NamedTuple):
    kind: str
    """'event' or one of ENTITY_ID_KEYS."""
    is_batch: bool


INGESTION_ROUTES = {
    "/v1/events": IngestionRoute("event", False),
    EVENTS_BATCH_PATH: IngestionRoute("event", True),
    "/v1/users": IngestionRoute("user", False),
    "/v1/users/batch": IngestionRoute("user", True),
    "/v1/companies": IngestionRoute("company", False),
    "/v1/companies/batch": IngestionRoute("company", True),
    "/v1/subscriptions": IngestionRoute("subscription", False),
    "/v1/subscriptions/batch": IngestionRoute("subscription", True),
}

METHODS_BY_PATH: dict[str, frozenset[str]] = {
    **{path: frozenset({"POST"}) for path in INGESTION_ROUTES},
    "/v1/config": frozenset({"GET"}),
    "/v1/rules": frozenset({"GET"}),
    "/health/probe": frozenset({"GET"}),
    "/_collector/faults": frozenset({"POST"}),
    "/_collector/config": frozenset({"PUT"}),
    "/_collector/rules": frozenset({"PUT"}),
    "/_collector/stats": frozenset({"GET"}),
    "/_collector/events": frozenset({"GET"}),
}

SCHEMA_VERSION = 2
"""The `PRAGMA user_version` this collector writes and accepts (the older layout with one row per
event left it at 0)."""

SCHEMA = f"""
BEGIN;
CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    path TEXT NOT NULL,
    event_count INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    gzip INTEGER NOT NULL,
    first_event_id INTEGER,
    body BLOB
);
CREATE INDEX batches_by_next_event_id ON batches (first_event_id + event_count);
CREATE TRIGGER stored_request AFTER INSERT ON batches BEGIN
    INSERT INTO requests (received_at, method, path, status)
    VALUES (NEW.received_at, 'POST', NEW.path, 201);
END;
CREATE TABLE entities (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    kind TEXT NOT NULL CHECK (kind IN ('user', 'company', 'subscription')),
    body TEXT NOT NULL
);
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""
NEXT_EVENT_ID = "SELECT coalesce(max(first_event_id + event_count), 1) FROM batches"
"""The id the next stored event gets (the index above makes it one lookup)."""

DISCARD_CHUNK_BYTES = 64 * 1024
SHUTDOWN_POLL_S = 0.05
"""How often the serving loop checks for stop(); stop() waits up to this long for it."""
JSON_WHITESPACE_CHARACTERS = " \t\n\r"
JSON_WHITESPACE = re.compile(f"[{JSON_WHITESPACE_CHARACTERS}]*")
JSON_DECODER = json.JSONDecoder()
ASCII_DIGITS = re.compile(r"[0-9]+")
STRING_TYPE = frozenset({str})
HTTP_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})
HEADER_FIELD = re.compile(r"([^\s:]+):[ \t]*(.*?)[ \t]*\r?\n")
MAX_HEADER_LINE = 65536
MAX_HEADER_FIELDS = 100
"""The limits of http.client, which BaseHTTPRequestHandler reads headers with."""


class Rejection(Exception):
    """A request answered with an error status and `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def reply(self) -> Reply:
        return json_reply(self.status, {"error": self.message}, self.headers)


class BadShape(Exception):
    """A JSON value that is not what the endpoint takes; the message says what is wrong."""


class Batch(NamedTuple):
    """What an accepted ingestion request stores, besides its `requests` row."""

    kind: str
    """'event' or one of ENTITY_ID_KEYS."""
    count: int
    body: bytes
    """The request body as received."""
    gzip: bool
    entity_texts: list[str]
    """Each entity's exact JSON text; empty for events, which are stored as `body`."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    batch: Batch | None = None
    """What to store with the request's `requests` row (before the reply is sent)."""


def json_reply(status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(value).encode(), headers or {})


# --- request bodies ------------------------------------------------------------------------------


def gunzip_capped(data: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """Inflate every gzip member of `data`; 400 if it is not gzip, 413 past `limit` bytes."""
    members: list[bytes] = []
    size = 0
    try:
        while data:
            member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            members.append(member.decompress(data, limit + 1 - size))
            size += len(members[-1])
            if size > limit:
                raise Rejection(413, f"body inflates past {limit} bytes")
            if not member.eof:
                raise Rejection(400, "bad gzip body: truncated")
            data = member.unused_data
    except zlib.error as error:
        raise Rejection(400, f"bad gzip body: {error}") from None
    return b"".join(members)


def decode_body(body: bytes, encoding: str) -> str:
    """The body as text; `encoding` is the request's Content-Encoding, lowercase."""
    if encoding == "gzip":
        body = gunzip_capped(body)
    elif encoding != "identity":
        raise Rejection(415, f"unsupported Content-Encoding: {encoding}")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(400, "body is not UTF-8") from None


def parse_items(text: str, is_batch: bool) -> list[Any]:
    """The items of an ingestion body: the elements of a batch's JSON array, or its one value."""
    value = parse_json(text)
    if not is_batch:
        return [value]
    if not isinstance(value, list):
        raise Rejection(400, "a batch body must be a JSON array")
    return value


def item_texts(text: str, is_batch: bool) -> list[str]:
    """The exact source text of each item of an ingestion body that parse_items accepted."""
    if not is_batch:
        return [text.strip(JSON_WHITESPACE_CHARACTERS)]
    texts: list[str] = []
    position = skip_json_whitespace(text, skip_json_whitespace(text, 0) + 1)  # past the '['
    while text[position] != "]":
        _, end = JSON_DECODER.raw_decode(text, position)
        texts.append(text[position:end])
        position = skip_json_whitespace(text, end)
        if text[position] == ",":
            position = skip_json_whitespace(text, position + 1)
    return texts


def skip_json_whitespace(text: str, position: int) -> int:
    return JSON_WHITESPACE.match(text, position).end()


def check_each(items: list[Any], check: Callable[[Any], None]) -> None:
    """check(item) for each item; a BadShape is a 400 that names the item."""
    for index, item in enumerate(items):
        try:
            check(item)
        except BadShape as error:
            raise Rejection(400, f"item {index}: {error}") from None


def parse_json(text: str) -> Any:
    """The JSON value of `text`, by orjson when it accepts the text (3 times the speed), else
    by json, which also takes NaN, Infinity and lone surrogate escapes and words the errors.
    (orjson also takes nesting from json's recursion limit up to 1024 levels, and gives
    integers past 64 bits as floats.)"""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise Rejection(400, f"bad JSON: {error}") from None


# --- shapes --------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_string_map(value: object, where: str) -> None:
    # map(type, ...) rather than isinstance in a generator: C-speed, and JSON has no subclasses.
    if value is not None and not (
        isinstance(value, dict) and STRING_TYPE.issuperset(map(type, value.values()))
    ):
        raise BadShape(f"{where} must be an object of strings")


def check_event(event: object) -> None:
    """Raise BadShape unless `event` has the Moesif event shape (see the module docstring)."""
    if not isinstance(event, dict):
        raise BadShape("an event must be a JSON object")
    request = event.get("request")
    if not isinstance(request, dict):
        raise BadShape("request must be an object")
    for key in ("time", "uri", "verb"):
        if not isinstance(request.get(key), str):
            raise BadShape(f"request.{key} must be a string")
    check_string_map(request.get("headers"), "request.headers")
    response = event.get("response")
    if response is not None:
        if not isinstance(response, dict):
            raise BadShape("response must be an object or null")
        if not isinstance(response.get("time"), str):
            raise BadShape("response.time must be a string")
        if not is_int(response.get("status")):
            raise BadShape("response.status must be an integer")
        check_string_map(response.get("headers"), "response.headers")
    for key in ("direction", "transaction_id"):
        value = event.get(key)
        if value is not None and not isinstance(value, str):
            raise BadShape(f"{key} must be a string or null")


def check_entity(kind: str, entity: object) -> None:
    if not isinstance(entity, dict):
        raise BadShape(f"a {kind} must be a JSON object")
    for key in ENTITY_ID_KEYS[kind]:
        if entity.get(key) is None:
            raise BadShape(f"a {kind} needs {key}")


# --- faults, config and rules --------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    status: int | None = None
    every: int = 1
    retry_after: int | None = None
    delay_s: float = 0.0
    tags: str | None = None
    """None (tags as usual) or one of TAG_MODES."""


TAG_MODES = frozenset({"batches_only", "new_per_batch"})


def parse_faults(spec: object) -> Faults:
    if not isinstance(spec, dict):
        raise BadShape("faults must be a JSON object")
    unknown = spec.keys() - {"status", "every", "retry_after", "delay_s", "tags"}
    if unknown:
        raise BadShape(f"unknown fault keys: {sorted(unknown)}")
    status = spec.get("status")
    if status is not None and not (is_int(status) and 400 <= status <= 599):
        raise BadShape("status must be an integer from 400 to 599")
    if status is None and ("every" in spec or "retry_after" in spec):
        raise BadShape("every and retry_after need a status")
    every = spec.get("every", 1)
    if not (is_int(every) and every >= 1):
        raise BadShape("every must be a positive integer")
    retry_after = spec.get("retry_after")
    if retry_after is not None and not (is_int(retry_after) and retry_after >= 0):
        raise BadShape("retry_after must be a non-negative integer (seconds)")
    delay_s = spec.get("delay_s", 0.0)
    if not (isinstance(delay_s, (int, float)) and not isinstance(delay_s, bool)):
        raise BadShape("delay_s must be a number")
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise BadShape("delay_s must be a finite number >= 0")
    tags = spec.get("tags")
    if tags is not None and tags not in TAG_MODES:
        raise BadShape(f"tags must be one of {sorted(TAG_MODES)}")
    return Faults(status, every, retry_after, float(delay_s), tags)


def new_tag() -> str:
    return uuid.uuid4().hex


class Controls:
    """What the control API changes while serving: config and rules with their tags, faults."""

    def __init__(self, config: dict[str, Any], rules: list[Any]) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._config_etag = new_tag()
        self._rules = rules
        self._rules_tag = new_tag()
        self._faults = Faults()
        self._ingestion_requests = 0

    def config(self) -> tuple[dict[str, Any], str]:
        with self._lock:
            return self._config, self._config_etag

    def rules(self) -> tuple[list[Any], str | None]:
        """The rules and their tag; None when the faults say to send none."""
        with self._lock:
            return self._rules, None if self._faults.tags else self._rules_tag

    def tags(self) -> dict[str, str]:
        """The tag headers of a batch response."""
        with self._lock:
            if self._faults.tags == "new_per_batch":
                return {CONFIG_ETAG_HEADER: new_tag(), RULES_TAG_HEADER: new_tag()}
            return {CONFIG_ETAG_HEADER: self._config_etag, RULES_TAG_HEADER: self._rules_tag}

    def set_config(self, config: dict[str, Any]) -> None:
        with self._lock:
            self._config = config
            self._config_etag = new_tag()

    def set_rules(self, rules: list[Any]) -> None:
        with self._lock:
            self._rules = rules
            self._rules_tag = new_tag()

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._ingestion_requests = 0

    def next_ingestion(self) -> tuple[Faults, bool]:
        """Count one ingestion request: the faults in force, and whether this one gets `status`."""
        with self._lock:
            self._ingestion_requests += 1
            faults = self._faults
            injected = faults.status is not None and self._ingestion_requests % faults.every == 0
            return faults, injected


# --- storage -------------------------------------------------------------------------------------


class CollectorStore:
    """The collector's writes to its SQLite file, from any handler thread."""

    def __init__(self, db_path: Path) -> None:
        self._lock = threading.Lock()
        make_private(db_path)
        # Autocommit: a statement outside BEGIN is a transaction of its own.
        self._connection = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        try:
            self._connection.execute("PRAGMA journal_mode = WAL")
            self._connection.execute("PRAGMA synchronous = OFF")  # no fsync at checkpoints
            create_schema(self._connection, db_path)
        except BaseException:
            self._connection.close()
            raise

    def record_request(self, method: str, path: str, status: int, batch: Batch | None) -> None:
        """A request's `requests` row or, for a stored request, its batch (and so, by trigger, its
        `requests` row): a stored events request is one SQLite statement. The sqlite3 module lets
        go of the GIL around each statement, which costs a thread switch when other handler
        threads wait for it."""
        assert batch is None or (method, status) == ("POST", 201), "what the trigger writes"
        received_at = time.time()
        with self._lock:
            if batch is None:
                self._connection.execute(
                    "INSERT INTO requests (received_at, method, path, status) VALUES (?, ?, ?, ?)",
                    (received_at, method, path, status),
                )
            elif batch.kind == "event":
                self._connection.execute(
                    "INSERT INTO batches (received_at, path, event_count, raw_bytes, gzip,"
                    f" first_event_id, body) VALUES (?, ?, ?, ?, ?, ({NEXT_EVENT_ID}), ?)",
                    (received_at, path, batch.count, len(batch.body), batch.gzip, batch.body),
                )
            else:
                self._insert_entities(received_at, path, batch)

    def _insert_entities(self, received_at: float, path: str, batch: Batch) -> None:
        with self._connection:  # commits, or rolls back on an error
            self._connection.execute("BEGIN")
            cursor = self._connection.execute(
                "INSERT INTO batches (received_at, path, event_count, raw_bytes, gzip)"
                " VALUES (?, ?, ?, ?, ?)",
                (received_at, path, batch.count, len(batch.body), batch.gzip),
            )
            self._connection.executemany(
                "INSERT INTO entities (batch_id, kind, body) VALUES (?, ?, ?)",
                [(cursor.lastrowid, batch.kind, text) for text in batch.entity_texts],
            )

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def make_private(db_path: Path) -> None:
    """Create the database file with PRIVATE_FILE_MODE unless it exists, before SQLite opens it
    (SQLite then creates -wal and -shm with its mode), and take group and other access away from
    an existing one and from a -wal or -shm already there. A symlink is refused, not followed.
    Not done with the umask: it is the whole process's, and other threads create files too."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    restrict_to_owner(os.open(db_path, flags | os.O_CREAT, PRIVATE_FILE_MODE))
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            restrict_to_owner(os.open(f"{db_path}{suffix}", flags))


def restrict_to_owner(descriptor: int) -> None:
    """Take group and other access away from the open file, and close it."""
    try:
        mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            os.fchmod(descriptor, mode & stat.S_IRWXU)
    finally:
        os.close(descriptor)


def create_schema(connection: sqlite3.Connection, db_path: Path) -> None:
    """Create the tables in a new database; refuse one this collector did not write."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version != 0 or connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise sqlite3.DatabaseError(
            f"{db_path} was not written by this version of the collector; use another file"
        )
    connection.executescript(SCHEMA)


def connect_for_reading(db_path: str | os.PathLike[str]) -> sqlite3.Connection:
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"no collector database at {db_path}")
    connection = sqlite3.connect(db_path, timeout=10)
    connection.execute("PRAGMA query_only = ON")
    return connection


class StoredEvents(NamedTuple):
    """A stored events request, as read back."""

    skip: int
    """How many of its first events a reader has seen (their ids are not past its since_id)."""
    is_batch: bool
    text: str
    """Its body, inflated: a JSON array of events or, if not is_batch, one event."""


def read_event_requests(db_path: str | os.PathLike[str], since_id: int) -> list[StoredEvents]:
    """Each stored events request holding an event with id > since_id, in arrival order."""
    with contextlib.closing(connect_for_reading(db_path)) as connection:
        rows = connection.execute(
            "SELECT first_event_id, path, gzip, body FROM batches"
            " WHERE first_event_id + event_count > ? ORDER BY first_event_id + event_count",
            (since_id + 1,),
        ).fetchall()
    return [
        StoredEvents(
            max(since_id + 1 - first_event_id, 0),
            INGESTION_ROUTES[path].is_batch,
            decode_body(body, "gzip" if gzip else "identity"),
        )
        for first_event_id, path, gzip, body in rows
    ]


def read_event_bodies(db_path: str | os.PathLike[str], since_id: int = 0) -> list[str]:
    """The JSON text of each stored event with id > since_id, in arrival order."""
    return [
        text
        for stored in read_event_requests(db_path, since_id)
        for text in item_texts(stored.text, stored.is_batch)[stored.skip:]
    ]


def read_events(db_path: str | os.PathLike[str], since_id: int = 0) -> list[dict[str, Any]]:
    """The stored events with id > since_id, parsed, in arrival order."""
    return [
        event
        for stored in read_event_requests(db_path, since_id)
        for event in parse_items(stored.text, stored.is_batch)[stored.skip:]
    ]


def read_entities(db_path: str | os.PathLike[str], kind: str) -> list[dict[str, Any]]:
    """The stored users, companies or subscriptions (`kind` 'user', 'company', 'subscription')."""
    if kind not in ENTITY_ID_KEYS:
        raise ValueError(f"kind must be one of {sorted(ENTITY_ID_KEYS)}, not {kind!r}")
    with contextlib.closing(connect_for_reading(db_path)) as connection:
        rows = connection.execute("SELECT body FROM entities WHERE kind = ? ORDER BY id", (kind,))
        return [json.loads(body) for (body,) in rows]


def read_batches(db_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One dict per stored ingestion request (the `batches` table), in arrival order."""
    with contextlib.closing(connect_for_reading(db_path)) as connection:
        rows = connection.execute(
            "SELECT id, received_at, path, event_count, raw_bytes, gzip FROM batches ORDER BY id"
        )
        return [
            {
                "id": batch_id,
                "received_at": received_at,
                "path": path,
                "event_count": event_count,
                "raw_bytes": raw_bytes,
                "gzip": bool(gzip),
            }
            for batch_id, received_at, path, event_count, raw_bytes, gzip in rows
        ]


def read_stats(db_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts: requests (outside the control API), batches, events, entities, and
    `rejected` = {status as a string: count} for every answer of 400 or more."""
    with contextlib.closing(connect_for_reading(db_path)) as connection:

        def count(query: str) -> int:
            return connection.execute(query).fetchone()[0]

        rejected = connection.execute(
            "SELECT status, count(*) FROM requests WHERE status >= 400 GROUP BY status"
        )
        return {
            "requests": count("SELECT count(*) FROM requests"),
            "batches": count("SELECT count(*) FROM batches"),
            "events": count(NEXT_EVENT_ID) - 1,  # ids are 1, 2, 3... with no gaps
            "entities": count("SELECT count(*) FROM entities"),
            "rejected": {str(status): number for status, number in rejected},
        }


# --- HTTP ----------------------------------------------------------------------------------------


class CollectorServer(ThreadingHTTPServer):
    """The HTTP server and what its handler threads share."""

    daemon_threads = False  # server_close() waits for requests in flight
    request_queue_size = socket.SOMAXCONN  # the listen backlog (the kernel may cap it lower)

    def __init__(
        self,
        address: tuple[str, int],
        store: CollectorStore,
        controls: Controls,
        application_id: str | None,
        db_path: Path,
        connection_timeout_s: float = CONNECTION_TIMEOUT_S,
    ) -> None:
        super().__init__(address, CollectorRequestHandler)
        self.store = store
        self.controls = controls
        self.application_id = application_id
        self.db_path = db_path
        self.connection_timeout_s = connection_timeout_s
        self.request_slots = threading.BoundedSemaphore(MAX_REQUESTS_IN_FLIGHT)
        self._open_connections: set[socket.socket] = set()
        self._open_connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_connections_lock:
            self._open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_connections_lock:
            self._open_connections.discard(request)
        super().shutdown_request(request)

    def stop_reading_connections(self) -> None:
        """End idle keep-alive connections; a request in flight still gets its answer."""
        with self._open_connections_lock:
            connections = list(self._open_connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RD)


class CollectorRequestHandler(BaseHTTPRequestHandler):
    server: CollectorServer
    protocol_version = "HTTP/1.1"
    server_version = "moesif_fast-collector"

    header_fields: dict[str, str]
    """The request's header fields by lowercase name (the first of repeated ones)."""

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout_s  # every read and write of the connection
        super().setup()

    def parse_request(self) -> bool:
        """Read the request line and the header fields into `header_fields`; False when the
        request was refused (and answered). This is BaseHTTPRequestHandler.parse_request for
        HTTP/1.0 and 1.1 without its email-package header parser, which cost more than all the
        rest of the HTTP handling."""
        self.command = ""  # for send_error, until the request line is read
        self.request_version = self.protocol_version  # an error answer gets a status line
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({self.requestline!r})")
            return False
        if words[2] not in HTTP_VERSIONS:
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Not HTTP/1.x: {words[2]}")
            return False
        self.command, path, self.request_version = words
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path
        fields: dict[str, str] = {}
        for _ in range(MAX_HEADER_FIELDS + 1):
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            if len(line) > MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            field = HEADER_FIELD.fullmatch(line.decode("iso-8859-1"))
            if field is None:
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad header line ({line!r})")
                return False
            fields.setdefault(field[1].lower(), field[2])
        else:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            return False
        self.header_fields = fields
        connection = fields.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive"
        )
        expect = fields.get("expect", "").lower()
        if expect == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def handle_any_method(self) -> None:
        """Answer the request in one of the request slots; a body too large, or that would wait
        too long for a slot, is answered at once and then thrown away."""
        path, _, query = self.path.partition("?")
        slots = self.server.request_slots
        length = 0
        try:
            length = self.body_length()
            if length > MAX_BODY_BYTES:
                raise Rejection(413, f"body is {length} bytes; the limit is {MAX_BODY_BYTES}")
            if not slots.acquire(timeout=SLOT_WAIT_S):
                raise Rejection(503, f"{MAX_REQUESTS_IN_FLIGHT} requests in flight; retry",
                                {"Retry-After": str(BUSY_RETRY_AFTER_S)})
        except Rejection as rejection:
            self.answer(path, rejection.reply())
            self.discard_body(length)
            return
        try:
            try:
                reply = self.route(path, query, self.read_body(length))
            except Rejection as rejection:
                reply = rejection.reply()
            self.answer(path, reply)
        finally:
            slots.release()

    do_GET = do_POST = do_PUT = handle_any_method

    def answer(self, path: str, reply: Reply) -> None:
        if not path.startswith(CONTROL_PREFIX):
            self.server.store.record_request(self.command, path, reply.status, reply.batch)
        self.send_reply(reply)

    def body_length(self) -> int:
        """The request body's declared length; a Rejection if it has none that can be read."""
        if "transfer-encoding" in self.header_fields:
            self.close_connection = True
            raise Rejection(411, "send a Content-Length; chunked bodies are not accepted")
        declared = self.header_fields.get("content-length", "0")
        if not ASCII_DIGITS.fullmatch(declared):
            self.close_connection = True
            raise Rejection(400, "bad Content-Length")
        return int(declared)

    def read_body(self, length: int) -> bytes:
        """The request body of `length` bytes, read whole; a Rejection if it is cut short."""
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise Rejection(400, "body shorter than its Content-Length")
        return body

    def content_encoding(self) -> str:
        return self.header_fields.get("content-encoding", "identity").lower()

    def discard_body(self, length: int) -> None:
        """Read `length` body bytes and throw them away, so that the connection stays usable."""
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, DISCARD_CHUNK_BYTES))
                if not chunk:
                    break
                length -= len(chunk)
        except ConnectionError:  # the client took its answer and hung up
            pass
        if length > 0:
            self.close_connection = True

    def route(self, path: str, query: str, body: bytes) -> Reply:
        allowed = METHODS_BY_PATH.get(path)
        if allowed is None:
            raise Rejection(404, f"no endpoint {path}")
        if self.command not in allowed:
            raise Rejection(405, f"{path} takes {', '.join(sorted(allowed))}",
                            {"Allow": ", ".join(sorted(allowed))})
        if path.startswith(CONTROL_PREFIX):
            return self.control(path, query, body)
        sent_id = self.header_fields.get(APPLICATION_ID_HEADER.lower())
        expected_id = self.server.application_id
        if not sent_id or (expected_id is not None and sent_id != expected_id):
            raise Rejection(401, f"missing or wrong {APPLICATION_ID_HEADER}")
        if path in INGESTION_ROUTES:
            return self.ingest(path, INGESTION_ROUTES[path], body)
        if path == "/v1/config":
            config, etag = self.server.controls.config()
            return json_reply(200, config, {CONFIG_ETAG_HEADER: etag})
        if path == "/v1/rules":
            rules, tag = self.server.controls.rules()
            return json_reply(200, rules, {RULES_TAG_HEADER: tag} if tag else {})
        return json_reply(200, {"status": True})  # /health/probe

    def ingest(self, path: str, route: IngestionRoute, body: bytes) -> Reply:
        faults, injected = self.server.controls.next_ingestion()
        if faults.delay_s:
            time.sleep(faults.delay_s)
        if injected:
            assert faults.status is not None
            headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
            raise Rejection(faults.status, "injected fault", headers)
        encoding = self.content_encoding()
        text = decode_body(body, encoding)
        items = parse_items(text, route.is_batch)
        entity_texts: list[str] = []  # events are stored as the body they came in
        if route.kind == "event":
            check_each(items, check_event)
        else:
            check_each(items, functools.partial(check_entity, route.kind))
            entity_texts = item_texts(text, route.is_batch)
        batch = Batch(route.kind, len(items), body, encoding == "gzip", entity_texts)
        tags = self.server.controls.tags() if path == EVENTS_BATCH_PATH else {}
        return Reply(201, b"", tags, batch)

    def control(self, path: str, query: str, body: bytes) -> Reply:
        controls = self.server.controls
        if path == "/_collector/stats":
            return json_reply(200, read_stats(self.server.db_path))
        if path == "/_collector/events":
            since_id = parse_qs(query).get("since_id", ["0"])[-1]
            if not ASCII_DIGITS.fullmatch(since_id):
                raise Rejection(400, "since_id must be a non-negative integer")
            bodies = read_event_bodies(self.server.db_path, int(since_id))
            return Reply(200, ("[" + ",".join(bodies) + "]").encode())
        value = parse_json(decode_body(body, self.content_encoding()))
        if path == "/_collector/faults":
            try:
                controls.set_faults(parse_faults(value))
            except BadShape as error:
                raise Rejection(400, str(error)) from None
        elif path == "/_collector/config":
            if not isinstance(value, dict):
                raise Rejection(400, "config must be a JSON object")
            controls.set_config(value)
        else:  # /_collector/rules
            if not isinstance(value, list):
                raise Rejection(400, "rules must be a JSON array")
            controls.set_rules(value)
        return Reply(204)

    def send_reply(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.body:
                self.send_header("Content-Type", "application/json")
            if reply.status != HTTPStatus.NO_CONTENT:
                self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if reply.body:
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client hung up; nothing to answer

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s " + format, self.address_string(), *args)


# --- public API ----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


class LocalCollector:
    """A collector serving from a background thread of this process.

        with LocalCollector(tmp_path / "collector.sqlite3") as collector:
            requests.post(collector.url + "/v1/events/batch", ...)
            assert collector.events() == [...]
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        application_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        config: dict[str, Any] | None = None,
        rules: list[Any] | None = None,
        allow_remote: bool = False,
        connection_timeout_s: float = CONNECTION_TIMEOUT_S,
    ) -> None:
        """`application_id` None accepts any non-empty id; `port` 0 picks a free port;
        `config` and `rules` are what GET /v1/config and /v1/rules serve at first;
        `connection_timeout_s` replaces CONNECTION_TIMEOUT_S (tests of stalled clients)."""
        if not connection_timeout_s > 0:
            raise ValueError(f"connection_timeout_s must be > 0, not {connection_timeout_s}")
        if application_id == "":
            raise ValueError("application_id must be non-empty, or None to accept any id")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, not {port}")
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"refusing to listen on {host!r}, which is not loopback: the collector stores "
                "API traffic (allow it explicitly with --allow-remote / allow_remote=True)"
            )
        self.db_path = Path(db_path)
        self.application_id = application_id
        self.host = host
        self.port = port
        self._initial_config = DEFAULT_CONFIG if config is None else config
        self._initial_rules = [] if rules is None else rules
        self._connection_timeout_s = connection_timeout_s
        self._server: CollectorServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the collector is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        """Open the database, bind, and serve from a background thread."""
        if self._server is not None:
            raise RuntimeError("the collector is already started")
        store = CollectorStore(self.db_path)
        try:
            controls = Controls(self._initial_config, self._initial_rules)
            server = CollectorServer(
                (self.host, self.port),
                store,
                controls,
                self.application_id,
                self.db_path,
                self._connection_timeout_s,
            )
        except BaseException:
            store.close()
            raise
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            args=(SHUTDOWN_POLL_S,),
            name="moesif_fast-collector",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, answer requests in flight, close connections and the database."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.stop_reading_connections()
        server.server_close()
        thread.join()
        server.store.close()
        self._server = self._thread = None

    def __enter__(self) -> LocalCollector:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def events(self, since_id: int = 0) -> list[dict[str, Any]]:
        return read_events(self.db_path, since_id)

    def entities(self, kind: str) -> list[dict[str, Any]]:
        return read_entities(self.db_path, kind)

    def batches(self) -> list[dict[str, Any]]:
        return read_batches(self.db_path)

    def stats(self) -> dict[str, Any]:
        return read_stats(self.db_path)


# --- command line --------------------------------------------------------------------------------

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
APPLICATION_ID_VARIABLE = "MOESIF_COLLECTOR_APPLICATION_ID"
"""The environment variable `--application-id` defaults to: unlike a command line, which `ps`
shows every user, a process's environment is readable by its owner only."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moesif_fast collector",
        description="Run a local Moesif-compatible collector that stores what it receives "
        "in SQLite, to see what would be sent to Moesif.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=8085, help="port; 0 picks a free one")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB_PATH, help="SQLite file to store in")
    parser.add_argument(
        "--application-id",
        default=os.environ.get(APPLICATION_ID_VARIABLE) or None,
        help=f"accept only this X-Moesif-Application-Id (default: ${APPLICATION_ID_VARIABLE} if "
        "set, else any); every user can read a command line: prefer the variable",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not loopback (the collector stores API traffic)",
    )
    parser.add_argument("--quiet", action="store_true", help="no log line per request")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM, then stop cleanly and return 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        collector = LocalCollector(
            args.db, args.application_id, args.host, args.port, allow_remote=args.allow_remote
        )
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    # Block the stop signals in every thread (threads inherit the mask) and wait for them here.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            collector.start()
        except (OSError, sqlite3.Error) as error:
            print(f"moesif_fast collector: cannot start: {error}", file=sys.stderr)
            return 1
        print(
            f"moesif_fast collector listening on {collector.url} (db: {args.db.resolve()})",
            flush=True,
        )
        received = signal.sigwait(STOP_SIGNALS)
        logger.info("stopping on %s", signal.Signals(received).name)
        collector.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 0

