"""The local collector (moesif_fast.collector), driven over real HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import re
import select
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from moesif_fast.collector import (
    BUSY_RETRY_AFTER_S,
    MAX_BODY_BYTES,
    MAX_REQUESTS_IN_FLIGHT,
    SLOT_WAIT_S,
    LocalCollector,
    main,
    read_entities,
    read_event_bodies,
    read_events,
    read_stats,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_ID = "app-under-test"
HEADERS = {"X-Moesif-Application-Id": APP_ID, "Content-Type": "application/json; charset=utf-8"}
TAG_HEADERS = ("X-Moesif-Config-ETag", "X-Moesif-Rules-Tag")


def make_event(number: int, header_key: str = "X-MOESIF-TRANSACTION-ID") -> dict[str, Any]:
    """An event shaped like the reference middleware's (protocol §1.4)."""
    return {
        "request": {
            "time": "2026-11-24T08:47:16.321",
            "uri": f"http://api.example.com/items/{number}?x=1",
            "verb": "POST" if number % 2 else "GET",
            "headers": {"CONTENT-TYPE": "application/json", header_key: f"header-txn-{number}"},
            "api_version": None,
            "ip_address": "203.0.113.9",
            "body": {"item": number, "name": "caf\u00e9"},
            "transfer_encoding": "json",
        },
        "response": {
            "time": "2026-11-24T08:47:16.322",
            "status": 200 + number,
            "headers": {"Content-Type": "application/json"},
            "body": "aGVsbG8=",
            "ip_address": None,
            "transfer_encoding": "base64",
        },
        "session_token": None,
        "tags": None,
        "user_id": f"user-{number}",
        "company_id": None,
        "metadata": None,
        "direction": "Incoming" if number % 2 else "Outgoing",
        "weight": 1,
        "blocked_by": None,
        "transaction_id": f"txn-{number}",
    }


@pytest.fixture
def local_collector(tmp_path: Path) -> Iterator[LocalCollector]:
    with LocalCollector(tmp_path / "collector.sqlite3", application_id=APP_ID) as running:
        yield running


def post_json(
    collector: LocalCollector,
    path: str,
    payload: Any,
    *,
    compress: bool = True,
    headers: dict[str, str] = HEADERS,
) -> requests.Response:
    body = json.dumps(payload).encode()
    if compress:
        body = gzip.compress(body)
        headers = {**headers, "Content-Encoding": "gzip"}
    return requests.post(collector.url + path, data=body, headers=headers, timeout=30)


def stored_batches(collector: LocalCollector) -> list[tuple[str, int, int, bool]]:
    return [
        (batch["path"], batch["event_count"], batch["raw_bytes"], batch["gzip"])
        for batch in collector.batches()
    ]


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_batch_is_stored_field_by_field(local_collector: LocalCollector, compress: bool) -> None:
    events = [make_event(1), make_event(2, header_key="x-moesif-transaction-id")]
    # Element texts written differently from each other, to see each stored exactly as sent.
    element_texts = [json.dumps(events[0]), json.dumps(events[1], indent=1, ensure_ascii=False)]
    wire = (" [\n" + " ,\r\n\t".join(element_texts) + "\n] ").encode()
    headers = dict(HEADERS)
    if compress:
        wire = gzip.compress(wire)
        headers["Content-Encoding"] = "gzip"

    response = requests.post(local_collector.url + "/v1/events/batch", data=wire, headers=headers)

    assert response.status_code == 201
    assert response.content == b""
    assert all(response.headers[name] for name in TAG_HEADERS)
    assert local_collector.events() == events
    assert read_event_bodies(local_collector.db_path) == element_texts
    with contextlib.closing(sqlite3.connect(local_collector.db_path)) as connection:
        stored = connection.execute("SELECT first_event_id, body FROM batches").fetchall()
    assert stored == [(1, wire)]
    assert stored_batches(local_collector) == [("/v1/events/batch", 2, len(wire), compress)]


def test_single_event_is_stored(local_collector: LocalCollector) -> None:
    event = make_event(7)

    response = post_json(local_collector, "/v1/events", event)

    assert response.status_code == 201
    assert "X-Moesif-Config-ETag" not in response.headers
    assert local_collector.events() == [event]
    assert [batch[:2] for batch in stored_batches(local_collector)] == [("/v1/events", 1)]


def test_wrong_or_missing_application_id_is_401(local_collector: LocalCollector) -> None:
    wrong = post_json(local_collector, "/v1/events/batch", [make_event(1)],
                      headers={"X-Moesif-Application-Id": "someone-else"})
    missing = post_json(local_collector, "/v1/events/batch", [make_event(1)], headers={})
    config = requests.get(local_collector.url + "/v1/config",
                          headers={"X-Moesif-Application-Id": "someone-else"})

    assert [wrong.status_code, missing.status_code, config.status_code] == [401, 401, 401]
    assert "X-Moesif-Application-Id" in wrong.json()["error"]
    assert local_collector.events() == []
    assert local_collector.stats()["rejected"] == {"401": 3}


def test_any_non_empty_application_id_is_accepted_when_none_is_configured(
    tmp_path: Path,
) -> None:
    with LocalCollector(tmp_path / "collector.sqlite3") as local_collector:
        accepted = post_json(local_collector, "/v1/events/batch", [make_event(1)],
                             headers={"X-Moesif-Application-Id": "any-app"})
        empty = post_json(local_collector, "/v1/events/batch", [make_event(2)],
                          headers={"X-Moesif-Application-Id": ""})
        missing = post_json(local_collector, "/v1/events/batch", [make_event(3)], headers={})

        assert [accepted.status_code, empty.status_code, missing.status_code] == [201, 401, 401]
        assert [event["transaction_id"] for event in local_collector.events()] == ["txn-1"]


@pytest.mark.parametrize(
    ("body", "content_encoding", "error_says"),
    [
        (b"this is not gzip", "gzip", "gzip"),
        (gzip.compress(json.dumps([make_event(1)]).encode())[:-4], "gzip", "gzip"),
        (b'[{"request": ', None, "JSON"),
        (b"\xff\xfe[]", None, "UTF-8"),
        (json.dumps(make_event(1)).encode(), None, "array"),
        (json.dumps([make_event(1), ["not", "an", "event"]]).encode(), None, "item 1"),
        (json.dumps([{**make_event(1), "request": {"time": "t", "uri": "/u"}}]).encode(), None,
         "item 0: request.verb"),
        (b"[] []", None, "Extra data"),
    ],
    ids=["not-gzip", "truncated-gzip", "bad-json", "not-utf8", "object-for-batch",
         "array-element", "event-without-verb", "trailing-data"],
)
def test_bad_batch_is_400_and_stores_nothing(
    local_collector: LocalCollector, body: bytes, content_encoding: str | None, error_says: str
) -> None:
    headers = dict(HEADERS)
    if content_encoding:
        headers["Content-Encoding"] = content_encoding

    response = requests.post(local_collector.url + "/v1/events/batch", data=body, headers=headers)

    assert response.status_code == 400
    assert error_says in response.json()["error"]
    assert local_collector.events() == []
    assert local_collector.batches() == []


def test_chunked_body_is_411(local_collector: LocalCollector) -> None:
    response = requests.post(local_collector.url + "/v1/events/batch", headers=HEADERS,
                             data=iter([json.dumps([make_event(1)]).encode()]))

    assert response.status_code == 411
    assert local_collector.events() == []


def test_oversized_bodies_are_413_and_the_connection_stays_usable(
    local_collector: LocalCollector,
) -> None:
    host, port = local_collector.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(body: bytes, headers: dict[str, str]) -> tuple[int, tuple[str, int]]:
        connection.request("POST", "/v1/events/batch", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert connection.sock is not None
        return response.status, connection.sock.getsockname()

    try:
        too_big = post(b" " * (MAX_BODY_BYTES + 1), HEADERS)
        # Small on the wire, past the limit once inflated.
        bomb = gzip.compress(b"[" + b" " * MAX_BODY_BYTES + b"]", compresslevel=1)
        inflates_too_big = post(bomb, {**HEADERS, "Content-Encoding": "gzip"})
        after = post(json.dumps([make_event(1)]).encode(), HEADERS)
    finally:
        connection.close()

    assert (too_big[0], inflates_too_big[0], after[0]) == (413, 413, 201)
    assert too_big[1] == inflates_too_big[1] == after[1], "the collector closed the connection"
    assert [event["transaction_id"] for event in local_collector.events()] == ["txn-1"]
    assert local_collector.stats()["rejected"] == {"413": 2}


def test_an_oversized_body_is_answered_413_before_it_is_sent_and_never_held(
    local_collector: LocalCollector,
) -> None:
    host, port = local_collector.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    declared = 4 * MAX_BODY_BYTES
    chunk = b" " * (1 << 20)  # the body is this one buffer, sent again and again
    try:
        connection.putrequest("POST", "/v1/events/batch")
        for name, value in HEADERS.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(declared))
        connection.endheaders()
        connection.send(chunk)
        # The client stalls after 1 MiB of 200: an answer can only come before the body.
        early = connection.getresponse()
        early.read()
        memory = psutil.Process()  # the collector serves from this process
        baseline = peak = memory.memory_info().rss
        for sent in range(len(chunk), declared, len(chunk)):
            connection.send(chunk[:declared - sent])
            if sent % (16 * len(chunk)) == 0:
                peak = max(peak, memory.memory_info().rss)
        connection.request("POST", "/v1/events/batch", body=json.dumps([make_event(1)]),
                           headers=HEADERS)
        after = connection.getresponse()
        after.read()
    finally:
        connection.close()

    assert early.status == 413
    assert peak - baseline < MAX_BODY_BYTES // 2, "the collector held the body it refused"
    assert after.status == 201, "the connection is not usable after the 413"
    assert [event["transaction_id"] for event in local_collector.events()] == ["txn-1"]


def test_config_and_rules_are_served_with_tags_that_batches_echo(
    local_collector: LocalCollector,
) -> None:
    def get(path: str) -> requests.Response:
        response = requests.get(local_collector.url + path, headers=HEADERS)
        assert response.status_code == 200
        return response

    def batch_tags() -> tuple[str, str]:
        response = post_json(local_collector, "/v1/events/batch", [make_event(1)])
        assert response.status_code == 201
        return response.headers["X-Moesif-Config-ETag"], response.headers["X-Moesif-Rules-Tag"]

    config, rules = get("/v1/config"), get("/v1/rules")
    assert config.json() == {"sample_rate": 100}
    assert rules.json() == []
    first_tags = (config.headers["X-Moesif-Config-ETag"], rules.headers["X-Moesif-Rules-Tag"])
    assert batch_tags() == first_tags

    new_config = {"sample_rate": 50, "user_sample_rate": {"user-1": 10}}
    put = requests.put(local_collector.url + "/_collector/config", json=new_config)
    assert put.status_code == 204
    config = get("/v1/config")
    assert config.json() == new_config
    assert config.headers["X-Moesif-Config-ETag"] != first_tags[0]
    assert batch_tags() == (config.headers["X-Moesif-Config-ETag"], first_tags[1])

    new_rules = [{"_id": "rule-1", "type": "regex", "block": True,
                  "response": {"status": 403, "headers": {}, "body": {"blocked": True}}}]
    put = requests.put(local_collector.url + "/_collector/rules", json=new_rules)
    assert put.status_code == 204
    rules = get("/v1/rules")
    assert rules.json() == new_rules
    assert rules.headers["X-Moesif-Rules-Tag"] != first_tags[1]
    assert batch_tags() == (config.headers["X-Moesif-Config-ETag"],
                            rules.headers["X-Moesif-Rules-Tag"])

    assert requests.put(local_collector.url + "/_collector/config", json=[1]).status_code == 400
    assert requests.put(local_collector.url + "/_collector/rules", json={}).status_code == 400
    assert get("/v1/config").json() == new_config


def test_health_probe(local_collector: LocalCollector) -> None:
    response = requests.get(local_collector.url + "/health/probe", headers=HEADERS)

    assert response.status_code == 200
    assert response.json() == {"status": True}


def test_every_third_request_fails_with_the_injected_status_and_is_not_stored(
    local_collector: LocalCollector,
) -> None:
    assert post_json(local_collector, "/v1/events/batch", [make_event(0)]).status_code == 201
    faults = requests.post(local_collector.url + "/_collector/faults",
                           json={"status": 503, "every": 3})
    assert faults.status_code == 204

    statuses = [post_json(local_collector, "/v1/events/batch", [make_event(n)]).status_code
                for n in range(1, 7)]

    assert statuses == [201, 201, 503, 201, 201, 503]
    assert [event["transaction_id"] for event in local_collector.events()] == [
        "txn-0", "txn-1", "txn-2", "txn-4", "txn-5"]
    stats = local_collector.stats()
    assert (stats["batches"], stats["events"], stats["rejected"]) == (5, 5, {"503": 2})

    assert requests.post(local_collector.url + "/_collector/faults", json={}).status_code == 204
    statuses = [post_json(local_collector, "/v1/events/batch", [make_event(n)]).status_code
                for n in range(7, 10)]
    assert statuses == [201, 201, 201]


def test_injected_429_carries_retry_after(local_collector: LocalCollector) -> None:
    requests.post(local_collector.url + "/_collector/faults",
                  json={"status": 429, "every": 2, "retry_after": 1})

    first = post_json(local_collector, "/v1/events/batch", [make_event(1)])
    second = post_json(local_collector, "/v1/events/batch", [make_event(2)])

    assert (first.status_code, second.status_code) == (201, 429)
    assert "Retry-After" not in first.headers
    assert second.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    "faults",
    [{"status": 99}, {"every": 3}, {"status": 503, "every": 0}, {"delay_s": -1}, {"colour": 1}, []],
)
def test_bad_fault_specs_are_400(local_collector: LocalCollector, faults: Any) -> None:
    response = requests.post(local_collector.url + "/_collector/faults", json=faults)

    assert response.status_code == 400
    assert post_json(local_collector, "/v1/events/batch", [make_event(1)]).status_code == 201


def test_delay_holds_the_answer_and_still_stores(local_collector: LocalCollector) -> None:
    delay_s = 0.3
    requests.post(local_collector.url + "/_collector/faults", json={"delay_s": delay_s})

    started = time.monotonic()
    response = post_json(local_collector, "/v1/events/batch", [make_event(1)])
    elapsed = time.monotonic() - started

    assert response.status_code == 201
    assert elapsed >= delay_s  # a lower bound the server's sleep guarantees, not a speed check
    assert len(local_collector.events()) == 1


@pytest.mark.parametrize(
    ("path", "kind", "payload"),
    [
        ("/v1/users", "user", {"user_id": "u1", "metadata": {"plan": "pro"}}),
        ("/v1/users/batch", "user", [{"user_id": "u1"}, {"user_id": "u2", "company_id": "c1"}]),
        ("/v1/companies", "company", {"company_id": "c1", "company_domain": "example.com"}),
        ("/v1/companies/batch", "company", [{"company_id": "c1"}, {"company_id": "c2"}]),
        ("/v1/subscriptions", "subscription",
         {"subscription_id": "s1", "company_id": "c1", "status": "active"}),
        ("/v1/subscriptions/batch", "subscription",
         [{"subscription_id": "s1", "company_id": "c1"}]),
    ],
)
def test_entities_are_stored_by_kind(
    local_collector: LocalCollector, path: str, kind: str, payload: Any
) -> None:
    response = post_json(local_collector, path, payload, compress=False)

    assert response.status_code == 201
    expected = payload if isinstance(payload, list) else [payload]
    assert local_collector.entities(kind) == expected
    assert stored_batches(local_collector)[0][:2] == (path, len(expected))
    assert local_collector.events() == []


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/users", {"company_id": "c1"}),
        ("/v1/companies/batch", [{"company_id": "c1"}, {"company_domain": "example.com"}]),
        ("/v1/subscriptions", {"subscription_id": "s1"}),
        ("/v1/users/batch", {"user_id": "u1"}),
    ],
)
def test_entities_without_their_ids_are_400(
    local_collector: LocalCollector, path: str, payload: Any
) -> None:
    response = post_json(local_collector, path, payload, compress=False)

    assert response.status_code == 400
    assert local_collector.stats()["entities"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/nothing", 404),
        ("GET", "/", 404),
        ("GET", "/v1/events/batch", 405),
        ("POST", "/v1/config", 405),
    ],
)
def test_unknown_paths_and_methods(
    local_collector: LocalCollector, method: str, path: str, status: int
) -> None:
    response = requests.request(method, local_collector.url + path, headers=HEADERS, data=b"[]")

    assert response.status_code == status
    assert local_collector.stats()["rejected"] == {str(status): 1}


def test_control_api_lists_events_and_counts(local_collector: LocalCollector) -> None:
    post_json(local_collector, "/v1/events/batch", [make_event(1), make_event(2)])
    post_json(local_collector, "/v1/events/batch", [make_event(3)])
    post_json(local_collector, "/v1/users", {"user_id": "u1"}, compress=False)
    post_json(local_collector, "/v1/events/batch", [make_event(4)], headers={})

    everything = requests.get(local_collector.url + "/_collector/events")
    since_two = requests.get(local_collector.url + "/_collector/events", params={"since_id": 2})
    stats = requests.get(local_collector.url + "/_collector/stats")

    assert everything.json() == [make_event(1), make_event(2), make_event(3)]
    assert since_two.json() == [make_event(3)]
    assert stats.json() == {"requests": 4, "batches": 3, "events": 3, "entities": 1,
                            "rejected": {"401": 1}}
    assert stats.json() == local_collector.stats()
    bad = requests.get(local_collector.url + "/_collector/events", params={"since_id": "-1"})
    assert bad.status_code == 400


def test_concurrent_batches_are_all_stored_once_and_in_order(
    local_collector: LocalCollector,
) -> None:
    batches = [[make_event(batch * 10 + n) for n in range(5)] for batch in range(40)]

    def send(batch: list[dict[str, Any]]) -> int:
        return post_json(local_collector, "/v1/events/batch", batch).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(send, batches))

    assert statuses == [201] * len(batches)
    stored = [event["transaction_id"] for event in local_collector.events()]
    counts = [batch["event_count"] for batch in local_collector.batches()]
    assert counts == [5] * len(batches)
    # Each batch's events are consecutive, in the order sent: cut the stored list batch by batch.
    by_batch = [stored[start:start + 5] for start in range(0, len(stored), 5)]
    sent = [[event["transaction_id"] for event in batch] for batch in batches]
    assert sorted(by_batch) == sorted(sent)
    assert local_collector.stats()["events"] == len(stored)
    for since_id in (1, 4, 5, 6, 99, len(stored) - 1, len(stored)):
        assert [event["transaction_id"] for event in local_collector.events(since_id)] == (
            stored[since_id:])


def event_text(number: int, uri: str, extra: str = "") -> str:
    """An event's JSON text written by hand, so that no serializer decides its spelling."""
    return (f'{{ "request" : {{"time": "2026-11-24T08:47:16.321", "uri": "{uri}", "verb": "GET"}}'
            f', "response": null, "transaction_id": "txn-{number}"{extra} }}')


def test_event_ids_and_since_id_across_batch_boundaries(local_collector: LocalCollector) -> None:
    """Ids run 1, 2, 3... across requests of every kind; a reader asking from any id gets the
    rest in order, each event's text exactly as it was sent."""
    texts = [
        event_text(1, "/caf\\u00e9", ', "weight": 1.50'),
        event_text(2, "/caf\u00e9", ', "metadata": {"big": 1E2, "list": [ 1 ,2 ]}'),
        event_text(3, "/three"),
        event_text(4, "/single"),
        event_text(5, "/five", ', "tags": "a\\"b"'),
        event_text(6, "/six"),
    ]

    def post(path: str, text: str, compress: bool) -> None:
        body = text.encode()
        headers = dict(HEADERS)
        if compress:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        response = requests.post(local_collector.url + path, data=body, headers=headers)
        assert response.status_code == 201, response.text

    post("/v1/events/batch", "[" + ",".join(texts[:3]) + "]", compress=True)
    post("/v1/events/batch", " [ ] ", compress=False)
    post("/v1/users", '{"user_id": "u1"}', compress=False)
    post("/v1/events", "\n " + texts[3] + " \r\n", compress=False)
    post("/v1/events/batch", "[" + texts[4] + " ,\n\t" + texts[5] + "]", compress=False)

    expected = [json.loads(text) for text in texts]
    assert expected[0]["request"]["uri"] == expected[1]["request"]["uri"] == "/caf\u00e9"
    for since_id in range(len(texts) + 2):
        assert read_event_bodies(local_collector.db_path, since_id) == texts[since_id:]
        assert local_collector.events(since_id) == expected[since_id:]
        listed = requests.get(local_collector.url + "/_collector/events",
                              params={"since_id": since_id})
        assert listed.json() == expected[since_id:]
    assert [batch["event_count"] for batch in local_collector.batches()] == [3, 0, 1, 1, 2]
    assert local_collector.stats()["events"] == len(texts)
    assert local_collector.entities("user") == [{"user_id": "u1"}]


def test_a_bad_event_in_the_middle_stores_nothing(local_collector: LocalCollector) -> None:
    bad = make_event(2)
    del bad["request"]["uri"]

    refused = post_json(local_collector, "/v1/events/batch", [make_event(1), bad, make_event(3)])
    accepted = post_json(local_collector, "/v1/events/batch", [make_event(4)])

    assert refused.status_code == 400
    assert refused.json()["error"] == "item 1: request.uri must be a string"
    assert accepted.status_code == 201
    assert local_collector.events() == [make_event(4)]
    assert local_collector.events(since_id=1) == []
    assert [batch["event_count"] for batch in local_collector.batches()] == [1]
    stats = local_collector.stats()
    assert (stats["requests"], stats["events"], stats["rejected"]) == (2, 1, {"400": 1})


def test_ids_continue_after_a_restart_on_the_same_file(tmp_path: Path) -> None:
    db_path = tmp_path / "collector.sqlite3"
    with LocalCollector(db_path, APP_ID) as first:
        assert post_json(first, "/v1/events/batch", [make_event(1), make_event(2)]).ok
    with LocalCollector(db_path, APP_ID) as second:
        assert post_json(second, "/v1/events/batch", [make_event(3)]).ok

        assert second.events() == [make_event(1), make_event(2), make_event(3)]
        assert second.events(since_id=2) == [make_event(3)]
        assert second.stats()["events"] == 3


def test_a_database_of_the_older_layout_is_refused(tmp_path: Path) -> None:
    db_path = tmp_path / "collector.sqlite3"
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")

    with pytest.raises(sqlite3.DatabaseError, match="not written by this version"):
        LocalCollector(db_path).start()


def file_modes(db_path: Path) -> dict[str, int]:
    """The permission bits of the database and of its -wal and -shm files."""
    return {suffix: stat.S_IMODE(os.stat(f"{db_path}{suffix}").st_mode)
            for suffix in ("", "-wal", "-shm")}


@contextlib.contextmanager
def usual_umask() -> Iterator[None]:
    """The umask 022 of most logins, under which a file created without care is 0644."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_database_and_its_wal_and_shm_are_owner_only(tmp_path: Path) -> None:
    db_path = tmp_path / "collector.sqlite3"
    with usual_umask(), LocalCollector(db_path, application_id=APP_ID) as collector:
        assert post_json(collector, "/v1/events/batch", [make_event(1)]).status_code == 201
        modes = file_modes(db_path)  # while it runs: the -wal and -shm go when it stops

    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_an_existing_database_and_its_left_wal_and_shm_are_made_owner_only(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "collector.sqlite3"
    with LocalCollector(db_path, application_id=APP_ID) as collector:
        assert post_json(collector, "/v1/events/batch", [make_event(1)]).status_code == 201
    db_path.chmod(0o644)  # as an older collector left it
    # A reader keeps a -wal and a -shm there, as a killed collector leaves them; SQLite creates
    # them with the database's mode.
    reader = sqlite3.connect(db_path)
    try:
        assert reader.execute("SELECT count(*) FROM batches").fetchone() == (1,)
        assert file_modes(db_path) == {"": 0o644, "-wal": 0o644, "-shm": 0o644}

        with LocalCollector(db_path, application_id=APP_ID) as collector:
            assert post_json(collector, "/v1/events/batch", [make_event(2)]).status_code == 201
            modes = file_modes(db_path)
    finally:
        reader.close()

    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    assert [event["transaction_id"] for event in read_events(db_path)] == ["txn-1", "txn-2"]


def test_a_symlink_in_place_of_the_database_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sqlite3"
    db_path = tmp_path / "collector.sqlite3"
    db_path.symlink_to(target)

    with pytest.raises(OSError):
        LocalCollector(db_path).start()

    assert not target.exists()


def raw_exchange(collector: LocalCollector, request: bytes) -> bytes:
    """Send `request` as is and read until the collector closes the connection."""
    host, port = collector.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_header_names_are_case_insensitive_and_http_1_0_closes(
    local_collector: LocalCollector,
) -> None:
    body = gzip.compress(json.dumps([make_event(1)]).encode())
    request = (b"POST /v1/events/batch HTTP/1.0\r\nx-moesif-application-id: " + APP_ID.encode()
               + b"\r\ncontent-encoding:GZIP\r\nCONTENT-LENGTH: %d\r\n\r\n" % len(body) + body)

    answer = raw_exchange(local_collector, request)  # returns only if the collector closes

    assert answer.startswith(b"HTTP/1.1 201 ")
    assert local_collector.events() == [make_event(1)]


def test_expect_100_continue_is_answered_before_the_body(local_collector: LocalCollector) -> None:
    body = json.dumps({"user_id": "u1"}).encode()
    host, port = local_collector.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /v1/users HTTP/1.1\r\nX-Moesif-Application-Id: " + APP_ID.encode()
                           + b"\r\nExpect: 100-continue\r\nConnection: close\r\n"
                           + b"Content-Length: %d\r\n\r\n" % len(body))
        assert connection.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        connection.sendall(body)
        assert connection.recv(65536).startswith(b"HTTP/1.1 201 ")
    assert local_collector.entities("user") == [{"user_id": "u1"}]


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"NONSENSE\r\n", 400),
        (b"GET /health/probe\r\n", 400),
        (b"GET /health/probe FTP/1.1\r\n", 400),
        (b"GET /health/probe HTTP/2.0\r\n", 505),
        (b"GET /health/probe HTTP/1.1\r\nNo colon here\r\n", 400),
        (b"GET /health/probe HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101, 431),
        (b"GET /health/probe HTTP/1.1\r\nX-Long: " + b"x" * 65536 + b"\r\n", 431),
    ],
    ids=["no-version", "http-0.9", "not-http", "http-2", "no-colon", "101-headers", "long-line"],
)
def test_malformed_requests_are_refused(
    local_collector: LocalCollector, request_head: bytes, status: int
) -> None:
    answer = raw_exchange(local_collector, request_head + b"\r\n")

    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    assert local_collector.stats()["requests"] == 0


def test_a_hundred_headers_are_accepted(local_collector: LocalCollector) -> None:
    headers = b"".join(b"X-Header-%d: %d\r\n" % (n, n) for n in range(98))
    answer = raw_exchange(local_collector, b"GET /health/probe HTTP/1.1\r\n" + headers
                          + b"X-Moesif-Application-Id: " + APP_ID.encode()
                          + b"\r\nConnection: close\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_reader_in_a_transaction_does_not_hold_up_ingestion(
    local_collector: LocalCollector,
) -> None:
    reader = sqlite3.connect(local_collector.db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM batches").fetchone() == (0,)

        response = post_json(local_collector, "/v1/events/batch", [make_event(1)])

        assert response.status_code == 201
        assert reader.execute("SELECT count(*) FROM batches").fetchone() == (0,)  # its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM batches").fetchone() == (1,)
    finally:
        reader.close()


def test_stop_answers_the_request_in_flight_and_ends_idle_connections(tmp_path: Path) -> None:
    collector = LocalCollector(tmp_path / "collector.sqlite3")
    collector.start()
    host, port = collector.url.removeprefix("http://").split(":")
    idle = requests.Session()  # keeps its connection open after this request
    busy = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        assert idle.get(collector.url + "/health/probe", headers=HEADERS).status_code == 200
        requests.post(collector.url + "/_collector/faults", json={"delay_s": 0.5})
        # A first exchange proves the collector serves this connection; the request sent next
        # is then in its hands, waiting out the delay, when stop() begins.
        busy.request("GET", "/_collector/stats")
        busy.getresponse().read()
        busy.request("POST", "/v1/users", body=json.dumps({"user_id": "u1"}), headers=HEADERS)

        stopper = threading.Thread(target=collector.stop)
        stopper.start()
        response = busy.getresponse()
        stopper.join(timeout=60)  # a guard against hanging, not a speed check

        assert not stopper.is_alive(), "stop() hung"
        assert response.status == 201
        assert read_entities(collector.db_path, "user") == [{"user_id": "u1"}]
    finally:
        busy.close()
        idle.close()
        collector.stop()


def test_a_stalled_client_holds_up_no_one_and_is_dropped_after_the_timeout(
    tmp_path: Path,
) -> None:
    timeout_s = 10.0
    body = json.dumps([make_event(1)]).encode()
    head = (b"POST /v1/events/batch HTTP/1.1\r\nX-Moesif-Application-Id: " + APP_ID.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    halves = [head[:len(head) // 2], head + body[:len(body) // 2]]  # of the head, of the body
    with LocalCollector(tmp_path / "collector.sqlite3", application_id=APP_ID,
                        connection_timeout_s=timeout_s) as collector:
        host, port = collector.url.removeprefix("http://").split(":")
        stalled = [socket.create_connection((host, int(port)), timeout=60) for _ in halves]
        try:
            for connection, half in zip(stalled, halves, strict=True):
                connection.sendall(half)
            stalled_at = time.monotonic()

            response = post_json(collector, "/v1/events/batch", [make_event(2)])

            assert response.status_code == 201
            assert [event["transaction_id"] for event in collector.events()] == ["txn-2"]
            readable, _, _ = select.select(stalled, [], [], 0)
            assert readable == [], "not open any more (an end of file is readable)"
            # Closed by the collector, without an answer (the recv timeout of 60 s is a guard).
            assert [connection.recv(65536) for connection in stalled] == [b"", b""]
            assert time.monotonic() - stalled_at > timeout_s / 2, "closed before its timeout"
        finally:
            for connection in stalled:
                connection.close()
        assert [event["transaction_id"] for event in collector.events()] == ["txn-2"]


def test_clients_beyond_the_request_slots_get_503_and_no_event_is_lost_or_doubled(
    local_collector: LocalCollector,
) -> None:
    clients = 4 * MAX_REQUESTS_IN_FLIGHT
    # Each request holds its slot this long, so the clients that find none give up waiting
    # (SLOT_WAIT_S) well before a slot is free again.
    delay_s = SLOT_WAIT_S + 3
    faults = requests.post(local_collector.url + "/_collector/faults", json={"delay_s": delay_s})
    assert faults.status_code == 204
    all_ready = threading.Barrier(clients)

    def send(number: int) -> requests.Response:
        all_ready.wait(timeout=60)
        return post_json(local_collector, "/v1/events/batch", [make_event(number)])

    with ThreadPoolExecutor(max_workers=clients) as pool:
        responses = list(pool.map(send, range(clients)))

    statuses = [response.status_code for response in responses]
    assert set(statuses) == {201, 503}, statuses
    assert all(response.headers["Retry-After"] == str(BUSY_RETRY_AFTER_S)
               for response in responses if response.status_code == 503)
    stored = [event["transaction_id"] for event in local_collector.events()]
    assert sorted(stored) == sorted(f"txn-{number}" for number, status in enumerate(statuses)
                                    if status == 201)
    assert local_collector.stats()["rejected"] == {"503": statuses.count(503)}
    assert requests.get(local_collector.url + "/health/probe", headers=HEADERS,
                        timeout=30).status_code == 200


def test_cli_prints_its_url_stores_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-c",
               "import sys; from moesif_fast.collector import main; sys.exit(main(sys.argv[1:]))",
               "--port", "0", "--application-id", "cli-app"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "the collector printed nothing"
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"moesif_fast collector listening on (http://127\.0\.0\.1:(\d+))"
                             r" \(db: (.+)\)\n", line)
        assert match, line
        url, port, db_path = match.group(1), int(match.group(2)), Path(match.group(3))
        assert port != 0
        assert db_path == tmp_path / "moesif-collector.sqlite3"

        response = requests.post(url + "/v1/events/batch", json=[make_event(1)],
                                 headers={"X-Moesif-Application-Id": "cli-app"})
        assert response.status_code == 201
        # This test process reads the file the collector process is still writing.
        assert read_events(db_path) == [make_event(1)]
        assert read_stats(db_path)["events"] == 1

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert '"POST /v1/events/batch HTTP/1.1" 201' in stderr
    assert read_events(db_path) == [make_event(1)]


def test_cli_refuses_a_host_that_is_not_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "collector.sqlite3"

    with pytest.raises(SystemExit) as exit_info:
        main(["--host", "0.0.0.0", "--db", str(db_path)])

    assert exit_info.value.code == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert not db_path.exists()
