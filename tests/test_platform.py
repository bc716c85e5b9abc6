"""Sampling, config changes, governance and profile updates, end to end against the collector.

The gunicorn tests run the example API (moesif_fast.demo) under gunicorn with the repository's
hooks and a real collector subprocess whose `/_collector/config` and `/_collector/rules`
controls decide what `GET /v1/config` and `GET /v1/rules` serve (protocol §1.3, §1.6, §1.7).
The in-process tests are for what gunicorn cannot show: a seeded `random`, callbacks
(IDENTIFY_USER, IDENTIFY_COMPANY), views that record whether they ran, and profile updates
called from application code. They use the same pieces the hooks wire together: a ring named by
MOESIF_FAST_RING, a real `Shipper` (draining it, fetching config and rules, publishing the
snapshot) in a thread of the test process, and a `LocalCollector` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from conftest import (
    Collector,
    Load,
    Server,
    assert_answered_normally,
    assert_at_least_once,
    request_id_of,
    ring_report,
    run_stats,
    send_requests,
    wait_until,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from moesif_fast import __version__, entities, ringfile, snapshot  # noqa: E402
from moesif_fast.collector import LocalCollector  # noqa: E402
from moesif_fast.demo.run import APPLICATION_ID, start_collector, start_gunicorn  # noqa: E402
from moesif_fast.middleware import MoesifMiddleware  # noqa: E402
from moesif_fast.policy import Policy  # noqa: E402
from moesif_fast.ringbuffer import Geometry, RingFile  # noqa: E402
from moesif_fast.settings import load  # noqa: E402
from moesif_fast.shipper import refresh  # noqa: E402
from moesif_fast.shipper.loop import Shipper  # noqa: E402
from moesif_fast.shipper.transport import CollectorTransport  # noqa: E402

StartServer = Callable[..., Server]

POLICY_TIMEOUT = 60.0  # generous deadline for a fetched config/rules to reach the snapshot
DELIVERY_TIMEOUT = 60.0
# The tag of a delivered batch triggers the refetch; the periodic poll would take 60 s. A
# deadline well under that shows the batch path works (acceptance: "within one batch").
BATCH_TRIGGERED_REFRESH_TIMEOUT = 30.0
# Workers look at the snapshot file at most once per CHECK_INTERVAL: after this grace every
# worker follows the published snapshot.
WORKER_GRACE = 2 * snapshot.CHECK_INTERVAL + 1.0


# --- talking to a collector (subprocess or in-process) ------------------------------------------


def put_control(collector_url: str, what: str, value: Any) -> None:
    """PUT /_collector/config or /_collector/rules: what GET /v1/<what> serves from now on."""
    reply = requests.put(f"{collector_url}/_collector/{what}", json=value, timeout=10)
    assert reply.status_code == 204, reply.text


def served_tags(collector_url: str, application_id: str = APPLICATION_ID) -> tuple[str, str]:
    """(X-Moesif-Config-ETag, X-Moesif-Rules-Tag) the collector serves now."""
    headers = {"X-Moesif-Application-Id": application_id}
    config = requests.get(f"{collector_url}/v1/config", headers=headers, timeout=10)
    rules = requests.get(f"{collector_url}/v1/rules", headers=headers, timeout=10)
    assert config.status_code == rules.status_code == 200, (config.text, rules.text)
    return config.headers["X-Moesif-Config-ETag"], rules.headers["X-Moesif-Rules-Tag"]


def published_tags(ring_path: str) -> tuple[str | None, str | None] | None:
    """The tags of the config/rules snapshot the shipper published for the ring, if any."""
    found = snapshot.read(ringfile.policy_snapshot_path(ring_path))
    return None if found is None else (found.config_etag, found.rules_tag)


def wait_for_published(ring_path: str, collector_url: str,
                       timeout: float = POLICY_TIMEOUT) -> tuple[str, str]:
    """Wait until the snapshot holds what the collector serves now; its tags."""
    tags = served_tags(collector_url)
    wait_until(lambda: published_tags(ring_path) == tags, timeout,
               f"the shipper to publish config/rules tags {tags}")
    return tags


def ring_of(directory: Path) -> str:
    (ring_path,) = directory.glob("moesif_fast-*/*.ring")
    return str(ring_path)


def bearer(user_id: str) -> dict[str, str]:
    """An Authorization header with an (unsigned) JWT whose payload's "sub" is `user_id`."""
    def part(value: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return {"Authorization": f"Bearer {part({'alg': 'none'})}.{part({'sub': user_id})}.x"}


# --- sending chosen requests to gunicorn --------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request of a test: the route, the headers and JSON body it is sent with."""

    method: str
    route: str
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


def send_probes(base_url: str, probes: dict[str, Probe]) -> dict[str, requests.Response]:
    """Send each probe once (its name in the `rid` query parameter); the responses by name."""
    responses = {}
    with requests.Session() as session:
        for name, probe in probes.items():
            separator = "&" if "?" in probe.route else "?"
            responses[name] = session.request(
                probe.method, f"{base_url}{probe.route}{separator}rid={name}",
                headers=probe.headers, json=probe.body, timeout=30)
    return responses


def events_by_transaction_id(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for event in events:
        assert event["transaction_id"] not in found, f"delivered twice: {event}"
        found[event["transaction_id"]] = event
    return found


# --- the in-process pipeline --------------------------------------------------------------------


class Pipeline:
    """A ring (exported in MOESIF_FAST_RING), a LocalCollector, and a real Shipper draining the
    ring to it from a thread of this process: what the gunicorn hooks set up, without gunicorn.
    Requests go through Django's test clients; the middleware reads the shipper's snapshot."""

    def __init__(self, directory: Path, config: Any, rules: Any,
                 options: dict[str, Any]) -> None:
        self.options = options
        self.ring = RingFile.create(str(directory / f"platform-{uuid.uuid4().hex[:8]}.ring"),
                                    Geometry.for_size(8 << 20, 2, 20_000))
        self.collector = LocalCollector(directory / "collector.sqlite3", APPLICATION_ID,
                                        config=config, rules=rules)
        self.collector.start()
        self.url = self.collector.url  # kept when the test restarts the collector on its port
        self.transport = CollectorTransport(self.url, APPLICATION_ID,
                                            user_agent=f"moesif_fast-python/{__version__}")
        self.shipper = Shipper(self.ring, load(self.settings()), self.transport)
        self._finish = threading.Event()
        self._thread = threading.Thread(target=self.shipper.run,
                                        args=(self._finish.is_set, 0.5), daemon=True)
        self._thread.start()

    def settings(self, **extra: Any) -> dict[str, Any]:
        """MOESIF_MIDDLEWARE for this pipeline's workers. The shipper sends their events under
        the pipeline's own settings: the extra options are worker callbacks, so it is told
        their settings tag (it would otherwise stop for new settings)."""
        settings = {"APPLICATION_ID": APPLICATION_ID, "BASE_URI": self.url, **self.options,
                    **extra}
        if extra:
            self.shipper.accepted_tags |= {load(settings).settings_tag}
        return settings

    def wait_for_policy(self) -> tuple[str, str]:
        return wait_for_published(self.ring.path, self.url)

    @contextlib.contextmanager
    def client(self, **extra_options: Any) -> Iterator[Client]:
        """A test client (so a middleware of its own) with these settings, while in use."""
        with override_settings(MOESIF_MIDDLEWARE=self.settings(**extra_options),
                               ROOT_URLCONF=__name__):
            yield Client()

    def events(self) -> list[dict[str, Any]]:
        return self.collector.events()

    def wait_for_events(self, count: int) -> list[dict[str, Any]]:
        """The stored events once at least `count` arrived."""
        return wait_until(lambda: len(found := self.events()) >= count and found,
                          DELIVERY_TIMEOUT, f"{count} events at the collector")

    def stop(self) -> None:
        self._finish.set()
        self._thread.join(30)
        self.shipper.reader.close()
        self.transport.close()
        self.ring.close()
        self.collector.stop()


@pytest.fixture
def start_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[Callable[..., Pipeline]]:
    """Starts a Pipeline (config and rules served by its collector); stopped after the test."""
    started: list[Pipeline] = []

    def start(config: Any = None, rules: Any = None, **options: Any) -> Pipeline:
        pipeline = Pipeline(tmp_path, config, rules, options)
        started.append(pipeline)
        monkeypatch.setenv(ringfile.RING_ENV, pipeline.ring.path)
        return pipeline

    yield start
    for pipeline in started:
        pipeline.stop()


# Views of the in-process tests; `guarded` and `missing` record that they ran.
VIEW_CALLS: list[str] = []


@csrf_exempt
def guarded(request: HttpRequest) -> HttpResponse:
    VIEW_CALLS.append(f"guarded {request.body.decode()}")
    return JsonResponse({"ran": True})


def missing(request: HttpRequest) -> HttpResponse:
    VIEW_CALLS.append("missing")
    return JsonResponse({"found": False}, status=404)


def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("plain", content_type="text/plain")


urlpatterns = [path("guarded", guarded), path("missing", missing), path("plain", plain)]


@pytest.fixture
def view_calls() -> Iterator[list[str]]:
    VIEW_CALLS.clear()
    yield VIEW_CALLS
    VIEW_CALLS.clear()


def header_identity(name: str) -> Callable[[HttpRequest, Any], str | None]:
    """An IDENTIFY_USER / IDENTIFY_COMPANY callback reading a request header."""
    def identify(request: HttpRequest, response: Any) -> str | None:
        return request.headers.get(name)

    return identify


# === Sampling ==================================================================================


def test_sample_rate_30_under_gunicorn_delivers_about_30_percent_with_weight_3(
        start_server: StartServer, collector: Collector, workspace: Path) -> None:
    put_control(collector.url, "config", {"sample_rate": 30})
    server = start_server(workers=2)
    wait_for_published(ring_of(workspace), collector.url)

    exchanges = send_requests(server.url, 1500, threads=6, label="s30")
    assert_answered_normally(exchanges, sampled=True)
    assert server.stop() == 0

    events = collector.events()
    sent = {exchange.request_id for exchange in exchanges}
    delivered = [request_id_of(event) for event in events]
    assert len(set(delivered)) == len(delivered), "an event was delivered twice"
    assert set(delivered) <= sent
    with_header = {exchange.request_id for exchange in exchanges
                   if exchange.response.headers.get("x-moesif-transaction-id")}
    assert with_header == set(delivered), "exactly the kept requests carry a transaction id"
    fraction = len(delivered) / len(exchanges)
    assert 0.25 <= fraction <= 0.35, f"{len(delivered)} of {len(exchanges)} delivered"
    assert {event["weight"] for event in events} == {3}


def test_seeded_sampling_keeps_exactly_the_replayed_draws(
        start_pipeline: Callable[..., Pipeline]) -> None:
    """Per request the middleware draws random.random() for sampling (a global rate is
    decided before the view), and nothing else in the request path uses `random` (transaction
    ids come from a generator of their own), so one seed gives one exact kept set; kept
    requests carry a transaction id and have exactly one event each, sampled-out ones neither."""
    pipeline = start_pipeline(config={"sample_rate": 30})
    pipeline.wait_for_policy()
    seed, count = 20240517, 600

    random.seed(seed)
    kept = {number for number in range(count) if Policy.keep(30, random.random())}

    random.seed(seed)
    with pipeline.client() as client:
        answered = [client.get(f"/plain?n={number}") for number in range(count)]

    assert [response.status_code for response in answered] == [200] * count
    assert {number for number, response in enumerate(answered)
            if response.has_header("x-moesif-transaction-id")} == kept
    assert 0.2 * count < len(kept) < 0.4 * count
    events = events_by_transaction_id(pipeline.wait_for_events(len(kept)))
    assert {int(parse_qs(urlsplit(event["request"]["uri"]).query)["n"][0]): transaction_id
            for transaction_id, event in events.items()} == {
        number: answered[number]["x-moesif-transaction-id"] for number in kept}
    assert {event["weight"] for event in events.values()} == {3}


SAMPLING_OVERRIDES = {
    "sample_rate": 0,
    "user_sample_rate": {"user-7": 100, "user-8": 0, "user-half": 50},
    "regex_config": [
        {"conditions": [{"path": "request.route", "value": "^/api/text$"}], "sample_rate": 100},
        {"conditions": [{"path": "request.route", "value": "^/api/status/"}],
         "sample_rate": 0},
    ],
}


def test_user_and_regex_sample_rates_take_precedence_under_gunicorn(
        start_server: StartServer, collector: Collector, workspace: Path) -> None:
    put_control(collector.url, "config", SAMPLING_OVERRIDES)
    server = start_server(workers=2)
    wait_for_published(ring_of(workspace), collector.url)

    probes = {}
    for number in range(20):
        probes[f"anonymous-items-{number}"] = Probe("GET", "/api/items")  # global: 0
        probes[f"user7-items-{number}"] = Probe("GET", "/api/items", bearer("user-7"))  # 100
        probes[f"user8-text-{number}"] = Probe("GET", "/api/text", bearer("user-8"))  # regex
        probes[f"user7-status-{number}"] = Probe("GET", "/api/status/200",
                                                 bearer("user-7"))  # regex 0 beats user 100
        probes[f"anonymous-text-{number}"] = Probe("GET", "/api/text")  # regex: 100
    for number in range(200):
        probes[f"half-{number}"] = Probe("GET", "/api/items", bearer("user-half"))
    responses = send_probes(server.url, probes)
    assert {response.status_code for response in responses.values()} == {200}
    assert server.stop() == 0

    by_name = {request_id_of(event): event for event in collector.events()}
    delivered = {name.rsplit("-", 1)[0] for name in by_name}
    assert delivered == {"user7-items", "user8-text", "anonymous-text", "half"}
    for prefix in ("user7-items", "user8-text", "anonymous-text"):
        assert all(f"{prefix}-{number}" in by_name for number in range(20)), prefix
    assert {by_name[f"user7-items-{number}"]["user_id"] for number in range(20)} == {"user-7"}
    assert {event["weight"] for name, event in by_name.items()
            if not name.startswith("half")} == {1}
    half = [event for name, event in by_name.items() if name.startswith("half")]
    assert 60 <= len(half) <= 140, f"{len(half)} of 200 kept at 50 %"
    assert {event["weight"] for event in half} == {2}
    assert {event["user_id"] for event in half} == {"user-half"}


def test_company_sample_rate_and_its_place_in_the_precedence(
        start_pipeline: Callable[..., Pipeline]) -> None:
    pipeline = start_pipeline(config={
        "sample_rate": 0,
        "company_sample_rate": {"acme": 100, "globex": 0},
        "user_sample_rate": {"u-zero": 0, "u-all": 100},
        "regex_config": [{"conditions": [{"path": "request.route", "value": "^/missing$"},
                                         {"path": "response.status", "value": "^404$"}],
                          "sample_rate": 100}],
    })
    pipeline.wait_for_policy()
    cases = {  # name: (route, user, company, delivered)
        "company-only": ("/plain", None, "acme", True),
        "user-beats-company-down": ("/plain", "u-zero", "acme", False),
        "user-beats-company-up": ("/plain", "u-all", "globex", True),
        "company-zero": ("/plain", None, "globex", False),
        "unknown-company": ("/plain", None, "initech", False),
        "regex-beats-user": ("/missing", "u-zero", "globex", True),
    }
    with pipeline.client(IDENTIFY_USER=header_identity("X-User"),
                         IDENTIFY_COMPANY=header_identity("X-Company")) as client:
        for name, (route, user, company, _) in cases.items():
            headers = {"X-Case": name}
            if user:
                headers["X-User"] = user
            if company:
                headers["X-Company"] = company
            assert client.get(route, headers=headers).status_code in (200, 404)
        client.get("/plain", headers={"X-Case": "marker", "X-Company": "acme"})

    events = pipeline.wait_for_events(sum(expected for *_, expected in cases.values()) + 1)
    names = [event["request"]["headers"]["X-CASE"] for event in events]
    assert "marker" in names
    assert sorted(names) == sorted([name for name, (*_, expected) in cases.items()
                                    if expected] + ["marker"])
    by_name = {event["request"]["headers"]["X-CASE"]: event for event in events}
    assert by_name["company-only"]["company_id"] == "acme"
    assert by_name["user-beats-company-up"]["user_id"] == "u-all"


# === Config changes ============================================================================


def test_a_new_config_etag_reaches_the_workers_after_the_next_batch(
        start_server: StartServer, collector: Collector, workspace: Path) -> None:
    server = start_server(workers=2)
    ring_path = ring_of(workspace)
    wait_for_published(ring_path, collector.url)
    load = Load(server.url, limit=1_000_000, threads=4, label="chg").start()
    try:
        load.wait_answered(200)
        wait_until(lambda: collector.stats()["events"] > 0, DELIVERY_TIMEOUT,
                   "the first delivered batch")
        changed_at = time.time()
        put_control(collector.url, "config", {"sample_rate": 0})
        new_tags = served_tags(collector.url)
        wait_until(lambda: published_tags(ring_path) == new_tags,
                   BATCH_TRIGGERED_REFRESH_TIMEOUT,
                   "the shipper to refetch the config after a batch carried the new ETag")
        settled_at = time.time() + WORKER_GRACE
        time.sleep(WORKER_GRACE)
        load.wait_answered(load.answered + 400)
    finally:
        load.stop()
    exchanges = load.finish()
    assert_answered_normally(exchanges, sampled=True)
    assert server.stop() == 0

    delivered = collector.events_by_request_id()
    before = [exchange for exchange in exchanges if exchange.finished < changed_at]
    after = [exchange for exchange in exchanges if exchange.started > settled_at]
    assert len(before) >= 200 and len(after) >= 300
    assert_at_least_once(before, {request_id: events for request_id, events in delivered.items()
                                  if request_id in {exchange.request_id for exchange in before}})
    sampled_after_change = [exchange.request_id for exchange in after
                            if exchange.request_id in delivered]
    assert not sampled_after_change, \
        f"{len(sampled_after_change)} requests sent after the change were still sampled at 100 %"


def test_a_config_change_without_traffic_arrives_by_the_periodic_poll(
        start_pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch) -> None:
    """W17: with sample_rate 0 nothing is delivered, so no batch carries the new ETag; the
    shipper's periodic poll (REFRESH_INTERVAL, 60 s, shortened here) still brings it."""
    monkeypatch.setattr(refresh, "REFRESH_INTERVAL", 1.0)
    pipeline = start_pipeline(config={"sample_rate": 0})
    pipeline.wait_for_policy()
    with pipeline.client() as client:
        assert client.get("/plain?before").status_code == 200
    put_control(pipeline.url, "config", {"sample_rate": 100})
    pipeline.wait_for_policy()
    assert pipeline.collector.stats()["batches"] == 0
    with pipeline.client() as client:
        assert client.get("/plain?after").status_code == 200
    [event] = pipeline.wait_for_events(1)
    assert event["request"]["uri"].endswith("/plain?after")


# === Defaults while there is no config (W1) ====================================================


@contextlib.contextmanager
def blackhole_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


REFUSALS = ["401-wrong-application-id", "404-unknown-base-path", "timeout-no-answer"]
BLOCK_EVERYTHING = [{"_id": "block-all", "type": "regex", "block": True,
                     "regex_config": [{"conditions": [{"path": "request.route",
                                                       "value": "/.*"}]}],
                     "response": {"status": 503, "body": "blocked"}}]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_workers_use_the_defaults_while_the_collector_refuses(workspace: Path,
                                                              refusal: str) -> None:
    """No snapshot can be fetched: every request is answered normally and captured (sample
    everything, block nothing), although the collector holds a config that samples nothing
    and rules that block everything."""
    with contextlib.ExitStack() as stack:
        if refusal.startswith("timeout"):
            base_url = f"http://127.0.0.1:{stack.enter_context(blackhole_port())}"
        else:
            _, collector_url = start_collector(str(workspace), "another-application")
            put_control(collector_url, "config", {"sample_rate": 0})
            put_control(collector_url, "rules", BLOCK_EVERYTHING)
            base_url = collector_url + ("/nope" if refusal.startswith("404") else "")
        process, url = start_gunicorn(str(workspace), base_url, workers=2,
                                      options={"SHUTDOWN_DEADLINE": 1.0})
        server = Server(process, url, workspace)
        exchanges = send_requests(server.url, 200, threads=4, label="refused")
        assert_answered_normally(exchanges)
        report = ring_report(workspace)
        assert report["policy"] is None
        assert report["appended"] == len(exchanges)
        assert "none fetched yet: sampling everything, blocking nothing" in \
            run_stats(workspace, as_json=False)
        if not refusal.startswith("timeout"):
            wait_until(lambda: (ring_report(workspace)["shipper"] or {}).get("refused"),
                       DELIVERY_TIMEOUT, "the shipper to count the refused events")
        assert server.stop() == 0
        assert "Traceback" not in server.log


def test_collector_down_at_startup_then_config_and_rules_arrive(
        start_server: StartServer, collector: Collector, workspace: Path) -> None:
    collector.stop()
    server = start_server(workers=2)
    while_down = send_requests(server.url, 150, threads=4, label="down")
    assert_answered_normally(while_down)
    assert ring_report(workspace)["policy"] is None

    collector.restart()
    put_control(collector.url, "rules", [{
        "_id": "flagged", "type": "regex", "block": True,
        "regex_config": [{"conditions": [{"path": "request.headers.x-flag", "value": "on"}]}],
        "response": {"status": 429, "headers": {"X-Why": "flag"}, "body": {"slow": "down"}}}])
    wait_for_published(ring_of(workspace), collector.url, timeout=120)
    time.sleep(WORKER_GRACE)
    after = send_requests(server.url, 100, threads=4, label="up")
    assert_answered_normally(after)
    flagged = requests.get(f"{server.url}/api/items?rid=flagged", headers={"X-Flag": "on"},
                           timeout=30)
    assert flagged.status_code == 429
    assert flagged.json() == {"slow": "down"}
    assert server.stop() == 0
    events = collector.events_by_request_id()
    [flagged_event] = events.pop("flagged")
    assert flagged_event["blocked_by"] == "flagged"
    assert_at_least_once(while_down + after, events)


# === Governance ================================================================================


def regex_rule(rule_id: str, conditions: dict[str, str], status: int, *, block: bool = True,
               headers: dict[str, str] | None = None, body: Any = None,
               **fields: Any) -> dict[str, Any]:
    return {"_id": rule_id, "type": "regex", "block": block,
            "regex_config": [{"conditions": [{"path": name, "value": value}
                                             for name, value in conditions.items()]}],
            "response": {"status": status, "headers": headers or {}, "body": body}, **fields}


def entity_rule(rule_id: str, kind: str, conditions: dict[str, str], status: int, *,
                headers: dict[str, str] | None = None, body: Any = None,
                **fields: Any) -> dict[str, Any]:
    return {**regex_rule(rule_id, conditions, status, headers=headers, body=body, **fields),
            "type": kind}


GOVERNANCE_RULES: list[Any] = [
    regex_rule("rx-echo-banned", {"request.route": "/api/echo", "request.verb": "POST",
                                  "request.body.plan": "banned-.*"}, 403,
               headers={"X-Reason": "banned plan"}, body={"error": "plan {{plan|not allowed}}"}),
    regex_rule("rx-items-flag", {"request.route": "/api/items", "request.headers.x-flag": "on"},
               418, headers={"X-Regex": "yes"}, body="teapot"),
    entity_rule("user-gold-limit", "user", {"request.route": "/api/items"}, 429,
                headers={"X-Tier": "{{0}}", "X-Plan": "{{plan}}", "X-Missing": "{{nothing}}"},
                body={"message": "{{0}} users on {{plan}} wait",
                      "tiers": ["{{0}}", {"plan": "{{plan}}"}]}),
    entity_rule("user-not-listed", "user", {"request.route": "/api/text"}, 402,
                body={"pay": True}, applied_to="not_matching"),
    entity_rule("anonymous-stream", "user", {"request.route": "/api/stream"}, 401,
                headers={"WWW-Authenticate": "Bearer"}, body={"login": "required"},
                applied_to_unidentified=True),
    regex_rule("rx-gone", {"request.route": "/api/status/404", "response.status": "404"}, 410,
               body={"gone": True}),
    regex_rule("rx-deprecation", {"request.route": "/api/text"}, 200, block=False,
               headers={"Deprecation": "true", "Sunset": "Wed, 31 Dec 2031 23:59:59 GMT"}),
    # Malformed: every one is ignored, none of them may block or break a request.
    42, "garbage", None, [], {"_id": "no-type", "block": True},
    regex_rule("bad-regex", {"request.route": "(/api/items"}, 500),
    regex_rule("bad-status", {"request.route": "/api/items"}, 999),
    {**regex_rule("bad-groups", {}, 500), "regex_config": "/api/items"},
    {**regex_rule("no-response", {"request.route": "/api/items"}, 500), "response": None},
    regex_rule("rx-deprecation", {"request.route": "/api/.*"}, 500),  # a duplicate _id
    regex_rule("unconditional", {}, 500),
]
GOVERNANCE_CONFIG = {
    "sample_rate": 100,
    "user_rules": {
        "user-7": [{"rules": "user-gold-limit", "values": {"0": "gold", "plan": "pro"}},
                   {"rules": "user-not-listed"}],
        "user-9": "not a list",
        "user-10": [42, {"rules": 5}, {"values": {"0": "x"}}, {"rules": "unknown-rule"}],
    },
}


def event_body(value: Any) -> Any:
    """A JSON response body as the event carries it (§2.2): objects and arrays as JSON, other
    JSON text (a JSON string "teapot") as base64 of its bytes."""
    if isinstance(value, dict | list):
        return value
    return base64.standard_b64encode(json.dumps(value).encode()).decode()


@dataclass(frozen=True)
class Expected:
    """What the client must see for a probe; `blocked_by` None: the view's response."""

    status: int
    blocked_by: str | None = None
    body: Any = None  # the JSON body of a blocked response
    headers: dict[str, str] = field(default_factory=dict)  # a subset of the response headers


GOVERNANCE_PROBES: dict[str, tuple[Probe, Expected]] = {
    "echo-banned": (Probe("POST", "/api/echo", body={"plan": "banned-7"}),
                    Expected(403, "rx-echo-banned", {"error": "plan not allowed"},
                             {"X-Reason": "banned plan"})),
    "echo-allowed": (Probe("POST", "/api/echo", body={"plan": "basic"}), Expected(201)),
    "echo-get": (Probe("GET", "/api/echo"), Expected(201)),
    "items-flag-anonymous": (Probe("GET", "/api/items", {"X-Flag": "on"}),
                             Expected(418, "rx-items-flag", "teapot", {"X-Regex": "yes"})),
    "items-user7": (Probe("GET", "/api/items", bearer("user-7")),
                    Expected(429, "user-gold-limit",
                             {"message": "gold users on pro wait",
                              "tiers": ["gold", {"plan": "pro"}]},
                             {"X-Tier": "gold", "X-Plan": "pro", "X-Missing": "UNKNOWN"})),
    "items-user7-flag": (Probe("GET", "/api/items", {**bearer("user-7"), "X-Flag": "on"}),
                         Expected(429, "user-gold-limit",
                                  {"message": "gold users on pro wait",
                                   "tiers": ["gold", {"plan": "pro"}]},
                                  {"X-Tier": "gold", "X-Regex": "yes"})),
    "items-user8": (Probe("GET", "/api/items", bearer("user-8")), Expected(200)),
    "items-user9": (Probe("GET", "/api/items", bearer("user-9")), Expected(200)),
    "items-user10": (Probe("GET", "/api/items", bearer("user-10")), Expected(200)),
    "items-anonymous": (Probe("GET", "/api/items"), Expected(200)),
    "text-user8": (Probe("GET", "/api/text", bearer("user-8")),
                   Expected(402, "user-not-listed", {"pay": True}, {"Deprecation": "true"})),
    "text-user7": (Probe("GET", "/api/text", bearer("user-7")),
                   Expected(200, headers={"Deprecation": "true"})),
    "text-anonymous": (Probe("GET", "/api/text"),
                       Expected(200, headers={"Deprecation": "true",
                                              "Sunset": "Wed, 31 Dec 2031 23:59:59 GMT"})),
    "stream-anonymous": (Probe("GET", "/api/stream"),
                         Expected(401, "anonymous-stream", {"login": "required"},
                                  {"WWW-Authenticate": "Bearer"})),
    "stream-user8": (Probe("GET", "/api/stream", bearer("user-8")), Expected(200)),
    "status-404": (Probe("GET", "/api/status/404"), Expected(410, "rx-gone", {"gone": True})),
    "status-409": (Probe("GET", "/api/status/409"), Expected(409)),
}


def test_governance_rules_under_gunicorn(start_server: StartServer, collector: Collector,
                                         workspace: Path) -> None:
    put_control(collector.url, "config", GOVERNANCE_CONFIG)
    put_control(collector.url, "rules", GOVERNANCE_RULES)
    server = start_server(workers=2)
    wait_for_published(ring_of(workspace), collector.url)

    responses = send_probes(server.url, {name: probe for name, (probe, _)
                                         in GOVERNANCE_PROBES.items()})
    assert server.stop() == 0

    events = events_by_transaction_id(collector.events())
    assert len(events) == len(GOVERNANCE_PROBES)
    for name, (_, expected) in GOVERNANCE_PROBES.items():
        response = responses[name]
        event = events[response.headers["x-moesif-transaction-id"]]
        assert request_id_of(event) == name
        assert response.status_code == expected.status, name
        assert event["response"]["status"] == expected.status, name
        assert event["blocked_by"] == expected.blocked_by, name
        for header, value in expected.headers.items():
            assert response.headers.get(header) == value, (name, header)
            assert event["response"]["headers"].get(header) == value, (name, header)
        if expected.blocked_by is None:
            assert "X-Tier" not in response.headers and "X-Regex" not in response.headers, name
            continue
        assert response.headers["Content-Type"] == "application/json", name
        assert response.json() == expected.body, name
        assert event["response"]["body"] == event_body(expected.body), name
    assert "ignoring part of the Moesif config/rules" in server.log
    assert "Traceback" not in server.log


IN_PROCESS_RULES = [
    regex_rule("rx-delete", {"request.route": "/guarded", "request.body.action": "delete"}, 403,
               headers={"X-Layer": "regex"}, body={"blocked": "regex"}),
    entity_rule("company-guard", "company", {"request.route": "/guarded"}, 451,
                headers={"X-Layer": "company"}, body={"blocked": "company {{0}}"}),
    entity_rule("user-guard", "user", {"request.route": "/guarded"}, 429,
                headers={"X-Layer": "user"}, body={"blocked": "user {{name}}"}),
    regex_rule("rx-missing-gone", {"request.route": "/missing", "response.status": "404"}, 410,
               body={"gone": True}),
]
IN_PROCESS_CONFIG = {
    "company_rules": {"acme": [{"rules": "company-guard", "values": {"0": "acme-corp"}}]},
    "user_rules": {"u-1": [{"rules": "user-guard", "values": {"name": "alice"}}]},
}


def test_a_pre_view_block_never_runs_the_view_and_precedence_is_user_company_regex(
        start_pipeline: Callable[..., Pipeline], view_calls: list[str]) -> None:
    pipeline = start_pipeline(config=IN_PROCESS_CONFIG, rules=IN_PROCESS_RULES)
    pipeline.wait_for_policy()
    cases = {  # name: (path, action, user, company, status, blocked_by, response body)
        "regex": ("/guarded", "delete", None, None, 403, "rx-delete", {"blocked": "regex"}),
        "company": ("/guarded", "delete", None, "acme", 451, "company-guard",
                    {"blocked": "company acme-corp"}),
        "user": ("/guarded", "delete", "u-1", "acme", 429, "user-guard",
                 {"blocked": "user alice"}),
        "allowed": ("/guarded", "read", "u-2", "initech", 200, None, {"ran": True}),
    }
    responses = {}
    with pipeline.client(IDENTIFY_USER=header_identity("X-User"),
                         IDENTIFY_COMPANY=header_identity("X-Company")) as client:
        for name, (route, action, user, company, *_) in cases.items():
            headers = {key: value for key, value in (("X-User", user), ("X-Company", company))
                       if value}
            responses[name] = client.post(route, {"action": action},
                                          content_type="application/json", headers=headers)

    assert view_calls == ['guarded {"action": "read"}']
    events = events_by_transaction_id(pipeline.wait_for_events(len(cases)))
    for name, (_, _, _, _, status, blocked_by, body) in cases.items():
        response = responses[name]
        assert response.status_code == status, name
        assert json.loads(response.content) == body, name
        event = events[response["x-moesif-transaction-id"]]
        assert (event["blocked_by"], event["response"]["status"]) == (blocked_by, status), name
        assert event["response"]["body"] == body, name
        if blocked_by is not None:
            assert response["Content-Type"] == "application/json", name
    assert responses["user"]["X-Layer"] == "user"  # the last blocking rule's headers win
    assert responses["company"]["X-Layer"] == "company"


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_a_rule_on_response_status_runs_the_view_then_replaces_its_response(
        start_pipeline: Callable[..., Pipeline], view_calls: list[str], interface: str) -> None:
    pipeline = start_pipeline(rules=IN_PROCESS_RULES)
    pipeline.wait_for_policy()
    with override_settings(MOESIF_MIDDLEWARE=pipeline.settings(), ROOT_URLCONF=__name__):
        response = Client().get("/missing") if interface == "wsgi" \
            else asyncio.run(AsyncClient().get("/missing"))
    assert view_calls == ["missing"]
    [event] = pipeline.wait_for_events(1)
    assert event["blocked_by"] == "rx-missing-gone"
    assert (event["response"]["status"], event["response"]["body"]) == (410, {"gone": True})
    assert response.status_code == 410
    assert json.loads(response.content) == {"gone": True}
    assert response["Content-Type"] == "application/json"


@pytest.mark.parametrize("callbacks", [False, True], ids=["no-callbacks", "callbacks"])
def test_a_pre_view_block_under_asgi_never_runs_the_view(
        start_pipeline: Callable[..., Pipeline], view_calls: list[str], callbacks: bool) -> None:
    """Without callbacks the middleware decides on the event loop; with them, in Django's
    sync thread (they may use the ORM)."""
    pipeline = start_pipeline(config=IN_PROCESS_CONFIG, rules=IN_PROCESS_RULES)
    pipeline.wait_for_policy()
    options = {"IDENTIFY_USER": header_identity("X-User")} if callbacks else {}
    headers = {"X-User": "u-1"} if callbacks else {}
    with override_settings(MOESIF_MIDDLEWARE=pipeline.settings(**options),
                           ROOT_URLCONF=__name__):
        response = asyncio.run(AsyncClient().post("/guarded", {"action": "delete"},
                                                  content_type="application/json",
                                                  headers=headers))
    expected_rule, expected_status, expected_body = \
        ("user-guard", 429, {"blocked": "user alice"}) if callbacks \
        else ("rx-delete", 403, {"blocked": "regex"})
    assert response.status_code == expected_status
    assert json.loads(response.content) == expected_body
    assert view_calls == []
    [event] = pipeline.wait_for_events(1)
    assert (event["blocked_by"], event["response"]["status"]) == (expected_rule, expected_status)


GARBAGE_SHAPES = {
    "config-values-of-wrong-types": (
        {"sample_rate": "30", "user_sample_rate": [1], "company_sample_rate": {"a": "x"},
         "regex_config": {"conditions": []}, "user_rules": ["x"], "company_rules": 7}, []),
    "config-not-an-object": ([{"sample_rate": 0}], None),
    "rules-not-an-array": ({"sample_rate": 100}, {"_id": "r", "type": "regex"}),
    "rules-of-garbage": (None, [1, "x", None, {}, {"_id": "r", "type": "regex",
                                                    "regex_config": [{"conditions": [
                                                        {"path": "request.route",
                                                         "value": "["}]}],
                                                    "response": {"status": 403}}]),
    "sampling-rule-garbage": ({"regex_config": [{"conditions": [{"path": 5, "value": "x"}],
                                                 "sample_rate": 0},
                                                {"conditions": [{"path": "request.route",
                                                                 "value": "("}],
                                                 "sample_rate": 0},
                                                {"sample_rate": 0}]}, []),
}


@pytest.mark.parametrize("shape", list(GARBAGE_SHAPES))
def test_malformed_config_and_rules_are_ignored_without_errors(
        start_pipeline: Callable[..., Pipeline], view_calls: list[str], shape: str) -> None:
    config, rules = GARBAGE_SHAPES[shape]
    pipeline = start_pipeline(config=config, rules=rules)
    pipeline.wait_for_policy()
    with pipeline.client() as client:
        answered = [client.post("/guarded", {"action": "delete"},
                                content_type="application/json"),
                    client.get("/missing"), client.get("/plain")]
    assert [response.status_code for response in answered] == [200, 404, 200]
    assert len(view_calls) == 2
    events = pipeline.wait_for_events(3)
    assert {event["blocked_by"] for event in events} == {None}
    assert {event["weight"] for event in events} == {1}


# === python -m moesif_fast stats ===============================================================


def test_stats_show_the_snapshot_tags_and_age_and_follow_a_rules_change(
        start_server: StartServer, collector: Collector, workspace: Path) -> None:
    put_control(collector.url, "rules", GOVERNANCE_RULES[:3])
    server = start_server(workers=2)
    config_etag, rules_tag = wait_for_published(ring_of(workspace), collector.url)
    flagged = Probe("GET", "/api/items", {"X-Flag": "on"})
    assert send_probes(server.url, {"flagged-before": flagged})["flagged-before"].status_code \
        == 418

    policy = ring_report(workspace)["policy"]
    assert policy["config_etag"] == config_etag and policy["rules_tag"] == rules_tag
    assert policy["rules"] == 3
    assert 0 <= policy["age_s"] < POLICY_TIMEOUT + 60
    text = run_stats(workspace, as_json=False)
    assert re.search(rf"config\s+fetched \d+\.\d s ago, config ETag {config_etag}, "
                     rf"rules tag {rules_tag}, 3 governance rules", text), text

    put_control(collector.url, "rules", [])
    _, new_rules_tag = served_tags(collector.url)
    assert_answered_normally(send_requests(server.url, 30, threads=2, label="tick"))
    wait_until(lambda: ring_report(workspace)["policy"]["rules_tag"] == new_rules_tag,
               BATCH_TRIGGERED_REFRESH_TIMEOUT, "stats to show the new rules tag")
    assert ring_report(workspace)["policy"]["rules"] == 0
    time.sleep(WORKER_GRACE)
    assert send_probes(server.url, {"flagged-after": flagged})["flagged-after"].status_code \
        == 200
    assert server.stop() == 0


# === Profile updates ===========================================================================

CAMPAIGN = {"utm_source": "news", "utm_medium": "email", "utm_campaign": "launch",
            "utm_term": None, "utm_content": None, "referrer": "https://example.org/",
            "referring_domain": "example.org", "gclid": None}
USER = {"user_id": "u-1", "company_id": "c-1", "modified_time": "2024-05-01T12:30:00Z",
        "ip_address": "198.51.100.4", "session_token": "s-1", "user_agent_string": "curl/8",
        "metadata": {"email": "a@example.org", "seats": 3}, "campaign": CAMPAIGN,
        "unknown_key": "dropped"}
USER_WIRE = {"user_id": "u-1", "company_id": "c-1",
             "modified_time": "2024-05-01T12:30:00+00:00", "ip_address": "198.51.100.4",
             "session_token": "s-1", "user_agent_string": "curl/8",
             "metadata": {"email": "a@example.org", "seats": 3}, "campaign": CAMPAIGN}
COMPANY = {"company_id": "c-1", "company_domain": "example.org", "metadata": {"plan": "pro"}}
COMPANY_WIRE = {"company_id": "c-1", "company_domain": "example.org", "modified_time": None,
                "ip_address": None, "session_token": None, "metadata": {"plan": "pro"},
                "campaign": None}
SUBSCRIPTION = {"subscription_id": "sub-1", "company_id": "c-1", "status": "active",
                "current_period_start": "2024-05-01", "current_period_end": None}
SUBSCRIPTION_WIRE = {"subscription_id": "sub-1", "company_id": "c-1",
                     "current_period_start": "2024-05-01T00:00:00", "current_period_end": None,
                     "status": "active", "metadata": None}


def numbered(profile: dict[str, Any], key: str, number: int) -> dict[str, Any]:
    return {**profile, key: f"{profile[key]}-{number}"}


def assert_wire_order(received: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The same profiles, field by field, keys in §1.5 order."""
    assert [list(item.items()) for item in received] == \
        [list(item.items()) for item in expected]


def test_queued_profile_updates_arrive_in_the_wire_shape(
        start_pipeline: Callable[..., Pipeline]) -> None:
    pipeline = start_pipeline()
    with override_settings(MOESIF_MIDDLEWARE=pipeline.settings()):
        assert MoesifMiddleware(None).update_user(USER) is True  # the reference's usage
        assert entities.update_users_batch(
            [numbered(USER, "user_id", number) for number in range(3)]) is True
        assert entities.update_company(COMPANY) is True
        assert entities.update_companies_batch(
            [numbered(COMPANY, "company_id", number) for number in range(2)]) is True
        assert entities.update_subscription(SUBSCRIPTION) is True
        assert entities.update_subscriptions_batch(
            [numbered(SUBSCRIPTION, "subscription_id", number) for number in range(2)]) is True

    collector = pipeline.collector
    wait_until(lambda: collector.stats()["entities"] >= 10, DELIVERY_TIMEOUT,
               "10 profile updates at the collector")
    assert_wire_order(collector.entities("user"),
                      [USER_WIRE] + [numbered(USER_WIRE, "user_id", n) for n in range(3)])
    assert_wire_order(collector.entities("company"),
                      [COMPANY_WIRE] + [numbered(COMPANY_WIRE, "company_id", n)
                                        for n in range(2)])
    assert_wire_order(collector.entities("subscription"),
                      [SUBSCRIPTION_WIRE] + [numbered(SUBSCRIPTION_WIRE, "subscription_id", n)
                                             for n in range(2)])
    batches = collector.batches()
    assert {batch["path"] for batch in batches} == \
        {"/v1/users/batch", "/v1/companies/batch", "/v1/subscriptions/batch"}
    assert not any(batch["gzip"] for batch in batches)  # plain JSON, as the reference sends
    assert sum(batch["event_count"] for batch in batches) == 10
    assert collector.stats()["events"] == 0


REQUIRED_FIELD_ERRORS = [
    (entities.update_user, {"company_id": "c-1"}, "update_user: user_id is required"),
    (entities.update_user, {"user_id": ""}, "update_user: user_id is required"),
    (entities.update_company, {"company_id": None}, "update_company: company_id is required"),
    (entities.update_subscription, {"subscription_id": "s", "company_id": "c"},
     "update_subscription: status is required"),
    (entities.update_subscription, {"subscription_id": "s", "status": "active"},
     "update_subscription: company_id is required"),
    (entities.update_users_batch, [{"user_id": "ok-1"}, {"user_id": None}],
     "update_users_batch: item 1: user_id is required"),
    (entities.update_companies_batch, [{"company_id": "ok"}, {}],
     "update_companies_batch: item 1: company_id is required"),
    (entities.update_subscriptions_batch, [{"subscription_id": "s"}],
     "update_subscriptions_batch: item 0: company_id is required"),
]


def test_required_field_errors_queue_nothing_and_a_batch_is_all_or_nothing(
        start_pipeline: Callable[..., Pipeline]) -> None:
    pipeline = start_pipeline()
    with override_settings(MOESIF_MIDDLEWARE=pipeline.settings()):
        for function, profile, message in REQUIRED_FIELD_ERRORS:
            with pytest.raises(ValueError, match=re.escape(message)):
                function(profile)
        assert entities.update_user({"user_id": "marker"}) is True
    wait_until(lambda: pipeline.collector.entities("user"), DELIVERY_TIMEOUT,
               "the marker update")
    assert [user["user_id"] for user in pipeline.collector.entities("user")] == ["marker"]
    assert pipeline.collector.entities("company") == []
    assert pipeline.collector.entities("subscription") == []


def test_updates_made_while_the_collector_is_down_are_delivered_when_it_returns(
        start_pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    pipeline = start_pipeline()
    collector = pipeline.collector
    port = int(pipeline.url.rsplit(":", 1)[1])
    collector.stop()
    with override_settings(MOESIF_MIDDLEWARE=pipeline.settings()):
        assert entities.update_user(USER) is True
        assert entities.update_companies_batch([COMPANY]) is True
        assert entities.update_subscription(SUBSCRIPTION) is True
    time.sleep(1.0)  # the shipper tries, fails and backs off meanwhile
    pipeline.collector = LocalCollector(tmp_path / "collector.sqlite3", APPLICATION_ID,
                                        port=port)
    pipeline.collector.start()
    wait_until(lambda: pipeline.collector.stats()["entities"] >= 3, DELIVERY_TIMEOUT,
               "the updates queued while the collector was down")
    assert_wire_order(pipeline.collector.entities("user"), [USER_WIRE])
    assert_wire_order(pipeline.collector.entities("company"), [COMPANY_WIRE])
    assert_wire_order(pipeline.collector.entities("subscription"), [SUBSCRIPTION_WIRE])
