"""No config-refresh storm, whatever tags the collector sends (issue 15).

A collector that puts `X-Moesif-Rules-Tag` on batch responses but none on `GET /v1/rules` made
the shipper fetch config and rules again after nearly every batch (134 fetches of each in 15 s)
and the workers re-read the snapshot each time. Here the local collector plays that collector
(faults `{"tags": "batches_only"}`) and the worst one, whose every batch response carries new
tags (`{"tags": "new_per_batch"}`), against real gunicorn with the packaged hooks under load:
fetches are counted at the collector, every captured request must be delivered, and a config
and rules change must still reach the workers. The collector modes themselves, and the
shipper's refresher not republishing an unchanged snapshot, are checked in process first.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import (
    Collector,
    Load,
    Server,
    assert_answered_normally,
    assert_exactly_once,
    wait_until,
)

from moesif_fast.collector import (
    CONFIG_ETAG_HEADER,
    RULES_TAG_HEADER,
    LocalCollector,
    connect_for_reading,
)
from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.shipper import refresh
from moesif_fast.shipper.refresh import PolicyRefresher
from moesif_fast.shipper.transport import CollectorTransport
from moesif_fast.snapshot import read

HOOKS = "python:moesif_fast.gunicorn"
LOAD_SECONDS = 11.0  # the load before fetches are counted: more than 10 s
MAX_FETCHES = 3  # of each of /v1/config and /v1/rules over that load, the startup's included
EFFECT_TIMEOUT = 60.0  # generous deadline for a changed config or rules to reach the workers
HEADERS = {"X-Moesif-Application-Id": APPLICATION_ID}
FLAG_RULE = {"_id": "flagged", "type": "regex", "block": True,
             "regex_config": [{"conditions": [{"path": "request.route", "value": "/api/items"},
                                              {"path": "request.headers.x-flag",
                                               "value": "on"}]}],
             "response": {"status": 418, "headers": {}, "body": "teapot"}}


def fetch_counts(db_path: Path) -> dict[str, int]:
    """How many times each of GET /v1/config and /v1/rules was answered so far."""
    with contextlib.closing(connect_for_reading(db_path)) as connection:
        rows = connection.execute(
            "SELECT path, count(*) FROM requests WHERE method = 'GET'"
            " AND path IN ('/v1/config', '/v1/rules') GROUP BY path").fetchall()
    return {"/v1/config": 0, "/v1/rules": 0, **dict(rows)}


def put_control(collector_url: str, what: str, value: Any) -> None:
    reply = requests.put(f"{collector_url}/_collector/{what}", json=value, timeout=10)
    assert reply.status_code == 204, reply.text


def post_batch(collector_url: str) -> requests.Response:
    event = {"request": {"time": "2026-01-01T00:00:00.000", "uri": "http://x/", "verb": "GET"},
             "response": None}
    reply = requests.post(f"{collector_url}/v1/events/batch", json=[event], headers=HEADERS,
                          timeout=10)
    assert reply.status_code == 201, reply.text
    return reply


# --- the collector's tag modes -----------------------------------------------------------------


@pytest.fixture
def local_collector(tmp_path: Path) -> Iterator[LocalCollector]:
    with LocalCollector(tmp_path / "collector.sqlite3", APPLICATION_ID) as collector:
        yield collector


def set_faults(collector_url: str, faults: dict[str, Any]) -> None:
    reply = requests.post(f"{collector_url}/_collector/faults", json=faults, timeout=10)
    assert reply.status_code == 204, reply.text


def test_batches_only_tags_batch_responses_and_not_the_rules_get(
        local_collector: LocalCollector) -> None:
    url = local_collector.url
    served = requests.get(f"{url}/v1/rules", headers=HEADERS, timeout=10)
    set_faults(url, {"tags": "batches_only"})

    rules = requests.get(f"{url}/v1/rules", headers=HEADERS, timeout=10)
    config = requests.get(f"{url}/v1/config", headers=HEADERS, timeout=10)
    batch = post_batch(url)

    assert rules.status_code == 200 and rules.json() == []
    assert RULES_TAG_HEADER not in rules.headers
    assert batch.headers[RULES_TAG_HEADER] == served.headers[RULES_TAG_HEADER]
    assert batch.headers[CONFIG_ETAG_HEADER] == config.headers[CONFIG_ETAG_HEADER]
    set_faults(url, {})
    assert requests.get(f"{url}/v1/rules", headers=HEADERS, timeout=10).headers[
        RULES_TAG_HEADER] == served.headers[RULES_TAG_HEADER]


def test_new_per_batch_sends_tags_never_sent_before(local_collector: LocalCollector) -> None:
    url = local_collector.url
    set_faults(url, {"tags": "new_per_batch"})

    config = requests.get(f"{url}/v1/config", headers=HEADERS, timeout=10)
    rules = requests.get(f"{url}/v1/rules", headers=HEADERS, timeout=10)
    batches = [post_batch(url).headers for _ in range(3)]

    assert RULES_TAG_HEADER not in rules.headers
    config_etags = {headers[CONFIG_ETAG_HEADER] for headers in batches}
    rules_tags = {headers[RULES_TAG_HEADER] for headers in batches}
    assert len(config_etags) == len(rules_tags) == 3
    assert config.headers[CONFIG_ETAG_HEADER] not in config_etags
    assert local_collector.stats()["events"] == 3


def test_an_unknown_tag_mode_is_400(local_collector: LocalCollector) -> None:
    reply = requests.post(f"{local_collector.url}/_collector/faults",
                          json={"tags": "sometimes"}, timeout=10)
    assert reply.status_code == 400 and "tags must be one of" in reply.json()["error"]


# --- the refresher, in process -----------------------------------------------------------------


def test_a_refresh_that_brings_the_same_content_publishes_nothing(
        local_collector: LocalCollector, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls that fetch what is published leave the file alone, so workers (which compare its
    identity) do not re-read it; a changed config is published by the next poll."""
    monkeypatch.setattr(refresh, "REFRESH_INTERVAL", 0.05)
    path = str(tmp_path / "policy.json")
    transport = CollectorTransport(local_collector.url, APPLICATION_ID, user_agent="tests")
    refresher = PolicyRefresher(transport, path)
    try:
        wait_until(lambda: os.path.exists(path), 30, "the first snapshot")
        first = os.stat(path)
        fetched = fetch_counts(local_collector.db_path)["/v1/config"]
        wait_until(lambda: fetch_counts(local_collector.db_path)["/v1/config"] >= fetched + 3,
                   30, "three more polls")
        again = os.stat(path)
        assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

        put_control(local_collector.url, "config", {"sample_rate": 40})
        wait_until(lambda: (read(path).config or {}).get("sample_rate") == 40, 30,
                   "the changed config in the snapshot")
    finally:
        refresher.stop()
        transport.close()


# --- real gunicorn under load ------------------------------------------------------------------


def captured(exchange: Any) -> bool:
    """Whether the middleware captured the request: it then names its event in the response."""
    return exchange.answered and "x-moesif-transaction-id" in exchange.response.headers


def sampled_at_50(collector: Collector, since_id: int) -> bool:
    return any(event["weight"] == 2 for event in collector.events()[since_id:])


def flagged_request_is_blocked(server: Server) -> bool:
    reply = requests.get(f"{server.url}/api/items?rid=probe", headers={"X-Flag": "on"},
                         timeout=30)
    return reply.status_code == 418


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batches_only", "new_per_batch"])
def test_no_refresh_storm_under_load_and_changes_still_arrive(
        start_server: Any, collector: Collector, mode: str) -> None:
    collector.set_faults({"tags": mode})
    server = start_server(workers=2, config=HOOKS)
    load = Load(server.url, limit=10**9, threads=4, label="storm").start()
    try:
        time.sleep(LOAD_SECONDS)
        fetches = fetch_counts(collector.db_path)
        batches = collector.stats()["batches"]
        assert batches >= 10, f"the load brought only {batches} batches"
        assert fetches["/v1/config"] <= MAX_FETCHES, fetches
        assert fetches["/v1/rules"] <= MAX_FETCHES, fetches

        events_before_change = collector.stats()["events"]
        put_control(collector.url, "config", {"sample_rate": 50})
        put_control(collector.url, "rules", [FLAG_RULE])
        wait_until(lambda: sampled_at_50(collector, events_before_change), EFFECT_TIMEOUT,
                   "workers sampling at the new rate (events of weight 2)")
        wait_until(lambda: flagged_request_is_blocked(server), EFFECT_TIMEOUT,
                   "workers blocking by the new rule")
    finally:
        load.stop()
    exchanges = load.finish()
    assert server.stop() == 0

    assert_answered_normally(exchanges, sampled=True)
    captured_exchanges = [exchange for exchange in exchanges if captured(exchange)]
    assert len(captured_exchanges) < len(exchanges), "no request was sampled out"
    storm_events = {request_id: events
                    for request_id, events in collector.events_by_request_id().items()
                    if request_id.startswith("storm-")}
    assert_exactly_once(captured_exchanges, storm_events)
