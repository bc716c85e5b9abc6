"""Profile updates (moesif_fast.entities) against a real LocalCollector on 127.0.0.1.

The sync path posts straight to the collector. The queued path is followed end to end the way
the shipper does it: the call appends to a ring made for the test, the test reads the ring,
decodes the records, turns them into requests with `entity_requests` and posts them with a
`CollectorTransport`; then the collector's stored entities are compared field by field.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import IntEnum
from pathlib import Path
from typing import Any

import django
import pytest
import requests
from django.test import override_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")
django.setup()

from moesif_fast import entities  # noqa: E402  (needs Django set up)
from moesif_fast.collector import LocalCollector  # noqa: E402
from moesif_fast.record import EntityUpdate, decode  # noqa: E402
from moesif_fast.ringbuffer import Geometry, Reader, RingFile  # noqa: E402
from moesif_fast.ringfile import RING_ENV  # noqa: E402
from moesif_fast.shipper.transport import CollectorTransport, Outcome, Stop  # noqa: E402

APPLICATION_ID = "entities-test-app"

UTC = timezone.utc
CAMPAIGN_IN = {"utm_source": "google", "utm_medium": "cpc", "utm_campaign": "spring",
               "utm_term": "api", "utm_content": "ad-1", "referrer": "https://example.com/",
               "referring_domain": "example.com", "gclid": "g-1"}
USER_IN = {
    "user_id": "u-1", "company_id": "c-1",
    "modified_time": datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    "ip_address": "203.0.113.7", "session_token": "tok-1", "user_agent_string": "Mozilla/5.0",
    "metadata": {"email": "ada@example.com", "plan": {"name": "pro", "seats": 3}},
    "campaign": CAMPAIGN_IN, "not_a_field": "dropped",
}
USER_OUT = {
    "user_id": "u-1", "company_id": "c-1", "modified_time": "2024-05-01T12:30:00+00:00",
    "ip_address": "203.0.113.7", "session_token": "tok-1", "user_agent_string": "Mozilla/5.0",
    "metadata": {"email": "ada@example.com", "plan": {"name": "pro", "seats": 3}},
    "campaign": CAMPAIGN_IN,
}
COMPANY_IN = {
    "company_id": "c-1", "company_domain": "example.com",
    "modified_time": "2024-05-01T12:30:00Z", "ip_address": "203.0.113.8",
    "session_token": "tok-2", "metadata": {"industry": "tools"}, "campaign": None,
}
COMPANY_OUT = {
    "company_id": "c-1", "company_domain": "example.com",
    "modified_time": "2024-05-01T12:30:00+00:00", "ip_address": "203.0.113.8",
    "session_token": "tok-2", "metadata": {"industry": "tools"}, "campaign": None,
}
SUBSCRIPTION_IN = {
    "subscription_id": "s-1", "company_id": "c-1",
    "current_period_start": datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=2))),
    "current_period_end": "2024-06-01T00:00:00", "status": "active",
    "metadata": {"plan": "pro"},
}
SUBSCRIPTION_OUT = {
    "subscription_id": "s-1", "company_id": "c-1",
    "current_period_start": "2024-05-01T00:00:00+02:00",
    "current_period_end": "2024-06-01T00:00:00", "status": "active",
    "metadata": {"plan": "pro"},
}
MINIMAL_OUT = {
    "user": {"user_id": "u-min", "company_id": None, "modified_time": None, "ip_address": None,
             "session_token": None, "user_agent_string": None, "metadata": None,
             "campaign": None},
    "company": {"company_id": "c-min", "company_domain": None, "modified_time": None,
                "ip_address": None, "session_token": None, "metadata": None, "campaign": None},
    "subscription": {"subscription_id": "s-min", "company_id": "c-min",
                     "current_period_start": None, "current_period_end": None,
                     "status": "trialing", "metadata": None},
}
MINIMAL_IN = {
    "user": {"user_id": "u-min"},
    "company": {"company_id": "c-min"},
    "subscription": {"subscription_id": "s-min", "company_id": "c-min", "status": "trialing"},
}


class Kind:
    """One kind of profile: its functions, a full example and where it is posted."""

    def __init__(self, name: str, single: Callable[..., Any], batch: Callable[..., Any],
                 example_in: dict[str, Any], example_out: dict[str, Any], path: str,
                 id_key: str) -> None:
        self.name = name
        self.single = single
        self.batch = batch
        self.example_in = example_in
        self.example_out = example_out
        self.path = path
        self.id_key = id_key

    def __repr__(self) -> str:
        return self.name

    def numbered(self, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The example with its own id, as input and as expected at the collector."""
        identifier = f"{self.example_in[self.id_key]}-{number}"
        return ({**self.example_in, self.id_key: identifier},
                {**self.example_out, self.id_key: identifier})


KINDS = [
    Kind("user", entities.update_user, entities.update_users_batch, USER_IN, USER_OUT,
         "/v1/users", "user_id"),
    Kind("company", entities.update_company, entities.update_companies_batch, COMPANY_IN,
         COMPANY_OUT, "/v1/companies", "company_id"),
    Kind("subscription", entities.update_subscription, entities.update_subscriptions_batch,
         SUBSCRIPTION_IN, SUBSCRIPTION_OUT, "/v1/subscriptions", "subscription_id"),
]


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_stray_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued call in a test without `ring` finds no ring (and starts no shipper)."""
    monkeypatch.setenv(RING_ENV, str(tmp_path / "no-ring-here"))


@pytest.fixture
def ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RingFile:
    """A ring of this test's own, which the queued path appends to."""
    path = str(tmp_path / f"entities-{uuid.uuid4().hex[:8]}.ring")
    monkeypatch.setenv(RING_ENV, path)
    return RingFile.create(path, Geometry.for_size(4 << 20, 2, 1000))


@pytest.fixture
def local_collector(tmp_path: Path) -> Iterator[LocalCollector]:
    with LocalCollector(tmp_path / "collector.sqlite3", application_id=APPLICATION_ID) as found:
        yield found


@contextlib.contextmanager
def moesif_settings(base_uri: str, tmp_path: Path, **extra: object) -> Iterator[None]:
    options = {"APPLICATION_ID": APPLICATION_ID, "BASE_URI": base_uri,
               "RING_DIR": str(tmp_path), **extra}
    with override_settings(MOESIF_MIDDLEWARE=options):
        yield


@pytest.fixture
def configured(local_collector: LocalCollector, tmp_path: Path) -> Iterator[LocalCollector]:
    """Django settings pointing at the test's collector."""
    with moesif_settings(local_collector.url, tmp_path):
        yield local_collector


def drain(ring: RingFile) -> list[EntityUpdate]:
    """Every record in the ring, decoded, and committed (as a shipper that delivered them)."""
    reader = Reader(ring)
    updates = []
    try:
        while (batch := reader.read(max_records=10_000, max_bytes=64 << 20)).records:
            updates += [decode(payload) for payload in batch.records]
            reader.commit(batch)
    finally:
        reader.close()
    assert all(isinstance(update, EntityUpdate) for update in updates), updates
    return updates


def post_all(base_uri: str, requests_: list[entities.EntityRequest],
             give_up_after: float = 30.0) -> list[Outcome]:
    """Send the shipper's requests as the shipper does (plain JSON, retried)."""
    transport = CollectorTransport(base_uri, APPLICATION_ID, user_agent="entities-tests",
                                   max_backoff=0.2)
    try:
        return [transport.post(request.path, request.body, gzipped=False,
                               give_up_at=time.monotonic() + give_up_after,
                               stop=Stop())
                for request in requests_]
    finally:
        transport.close()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_in_order(received: dict[str, Any], expected: dict[str, Any]) -> None:
    """Field by field, and the keys in wire order."""
    assert list(received.items()) == list(expected.items())


# --- shapes at the collector -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_sync_single_update_has_the_wire_shape(kind: Kind, configured: LocalCollector) -> None:
    outcome = kind.single(kind.example_in, sync=True)

    assert isinstance(outcome, Outcome) and outcome.delivered, outcome
    assert outcome.status == 201
    [received] = configured.entities(kind.name)
    assert_same_in_order(received, kind.example_out)
    [batch] = configured.batches()
    assert batch["path"] == kind.path and batch["gzip"] == 0  # plain JSON, as the reference


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_sync_batch_is_one_request_to_the_batch_endpoint(kind: Kind,
                                                         configured: LocalCollector) -> None:
    inputs, expected = zip(*(kind.numbered(number) for number in range(3)), strict=True)

    outcome = kind.batch(list(inputs), sync=True)

    assert outcome.delivered, outcome
    received = configured.entities(kind.name)
    assert len(received) == 3
    for got, wanted in zip(received, expected, strict=True):
        assert_same_in_order(got, wanted)
    assert [(b["path"], b["event_count"]) for b in configured.batches()] == [
        (kind.path + "/batch", 3)]


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_unset_fields_are_sent_as_null(kind: Kind, configured: LocalCollector) -> None:
    assert kind.single(MINIMAL_IN[kind.name], sync=True).delivered

    [received] = configured.entities(kind.name)
    assert_same_in_order(received, MINIMAL_OUT[kind.name])


def test_queued_updates_reach_the_collector_through_the_ring(
        ring: RingFile, configured: LocalCollector) -> None:
    companies_in, companies_out = zip(*(KINDS[1].numbered(n) for n in range(2)), strict=True)

    assert entities.update_user(USER_IN) is True
    assert entities.update_companies_batch(list(companies_in)) is True
    assert entities.update_subscription(SUBSCRIPTION_IN) is True

    updates = drain(ring)
    assert [update.kind for update in updates] == ["user", "company", "company", "subscription"]
    requests_ = entities.entity_requests(updates)
    assert [(r.path, r.count) for r in requests_] == [
        ("/v1/users/batch", 1), ("/v1/companies/batch", 2), ("/v1/subscriptions/batch", 1)]
    assert all(outcome.delivered for outcome in post_all(configured.url, requests_))
    [user] = configured.entities("user")
    assert_same_in_order(user, USER_OUT)
    for got, wanted in zip(configured.entities("company"), companies_out, strict=True):
        assert_same_in_order(got, wanted)
    [subscription] = configured.entities("subscription")
    assert_same_in_order(subscription, SUBSCRIPTION_OUT)


# --- inputs the reference accepts ---------------------------------------------------------------


class CampaignModel:
    def __init__(self, **fields: str) -> None:
        for name in entities.CAMPAIGN_FIELDS:
            setattr(self, name, fields.get(name))


class UserModel:
    """Like moesifapi's UserModel: the wire fields as attributes."""

    def __init__(self, user_id: str, metadata: dict[str, Any],
                 campaign: CampaignModel | None = None) -> None:
        self.user_id = user_id
        self.company_id = None
        self.modified_time = datetime(2024, 5, 1, 8, 0)
        self.metadata = metadata
        self.campaign = campaign


def test_model_objects_and_json_text_are_accepted() -> None:
    from_model = entities.shape_profile(
        "user", UserModel("u-m", {"a": 1}, CampaignModel(utm_source="newsletter")))
    from_text = entities.shape_profile("user", json.dumps({"user_id": "u-j", "metadata": {}}))

    assert from_model["user_id"] == "u-m"
    assert from_model["modified_time"] == "2024-05-01T08:00:00"
    assert from_model["ip_address"] is None  # an attribute the model does not have
    assert from_model["campaign"] == {**dict.fromkeys(entities.CAMPAIGN_FIELDS),
                                      "utm_source": "newsletter"}
    assert from_text == {**MINIMAL_OUT["user"], "user_id": "u-j", "metadata": {}}


def test_ids_given_as_numbers_or_uuids_are_sent_as_strings() -> None:
    identifier = uuid.UUID("12345678-1234-5678-1234-567812345678")

    shaped = entities.shape_profile("subscription", {
        "subscription_id": identifier, "company_id": 42, "status": "active"})

    assert shaped["subscription_id"] == str(identifier)
    assert shaped["company_id"] == "42"


# --- required fields and invalid values --------------------------------------------------------


@pytest.mark.parametrize(("function", "argument", "message"), [
    (entities.update_user, {"company_id": "c"}, "update_user: user_id is required"),
    (entities.update_user, {"user_id": None}, "update_user: user_id is required"),
    (entities.update_user, {"user_id": ""}, "update_user: user_id is required"),
    (entities.update_company, {"company_domain": "x.com"},
     "update_company: company_id is required"),
    (entities.update_subscription, {"subscription_id": "s", "status": "active"},
     "update_subscription: company_id is required"),
    (entities.update_subscription, {"company_id": "c", "status": "active"},
     "update_subscription: subscription_id is required"),
    (entities.update_subscription, {"subscription_id": "s", "company_id": "c"},
     "update_subscription: status is required"),
    (entities.update_users_batch, [{"user_id": "a"}, {"name": "b"}],
     "update_users_batch: item 1: user_id is required"),
    (entities.update_companies_batch, [{"company_id": "a"}, {"company_id": "b"}, {}],
     "update_companies_batch: item 2: company_id is required"),
    (entities.update_subscriptions_batch, [{"subscription_id": "s", "company_id": "c"}],
     "update_subscriptions_batch: item 0: status is required"),
])
def test_a_missing_required_field_is_a_value_error_naming_it(
        function: Callable[..., Any], argument: Any, message: str, ring: RingFile,
        configured: LocalCollector) -> None:
    for sync in (False, True):
        with pytest.raises(ValueError, match=message):
            function(argument, sync=sync)

    assert drain(ring) == []  # all-or-nothing: not even the good items were queued
    assert configured.stats()["requests"] == 0


@pytest.mark.parametrize(("profile", "message"), [
    ({"user_id": 1.5}, "update_user: user_id must be a string"),
    ({"user_id": "u", "metadata": ["a"]}, "update_user: metadata must be a dict, not list"),
    ({"user_id": "u", "campaign": "spring"}, "update_user: campaign must be a dict"),
    ({"user_id": "u", "campaign": {"utm_source": ["a"]}},
     "update_user: campaign utm_source must be text, not list"),
    ({"user_id": "u", "modified_time": "yesterday"},
     "update_user: modified_time is not an ISO 8601 date or date-time: 'yesterday'"),
    ({"user_id": "u", "modified_time": 1714564800},
     "update_user: modified_time must be a datetime, a date or an ISO 8601 string, not int"),
    ({"user_id": "u", "ip_address": {"v4": "1.2.3.4"}},
     "update_user: ip_address must be text, not dict"),
    (["u"], "update_user: a profile must be a dict, .* not list"),
    (None, "update_user: a profile must be a dict, .* not NoneType"),
    ("not json", "update_user: a str profile must be a JSON object"),
    ("[1, 2]", "update_user: a str profile must be a JSON object, not list"),
])
def test_an_invalid_value_is_a_value_error_naming_the_field(profile: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        entities.update_user(profile)


def test_batch_functions_want_a_list_and_sync_a_positive_timeout() -> None:
    with pytest.raises(ValueError, match="update_users_batch: expects a list of profiles, "
                                         "not dict"):
        entities.update_users_batch({"user_id": "u"})
    with pytest.raises(ValueError, match="update_company: timeout must be a positive number"):
        entities.update_company({"company_id": "c"}, sync=True, timeout=0)


# --- dates and metadata ------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "sent"), [
    (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), "2024-05-01T12:00:00+00:00"),
    (datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5))),
     "2024-05-01T12:00:00-05:00"),
    (datetime(2024, 5, 1, 12, 0, 0, 123456), "2024-05-01T12:00:00.123456"),  # naive: as given
    (date(2024, 5, 1), "2024-05-01T00:00:00"),
    ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00+00:00"),
    ("2024-05-01T12:00:00.500+05:30", "2024-05-01T12:00:00.500000+05:30"),
    ("2024-05-01 12:00:00", "2024-05-01T12:00:00"),
    ("2024-05-01", "2024-05-01T00:00:00"),
    ("", None),
    (None, None),
])
def test_date_fields_accept_datetimes_dates_and_iso_strings(given: Any, sent: str | None) -> None:
    user = entities.shape_profile("user", {"user_id": "u", "modified_time": given})
    subscription = entities.shape_profile("subscription", {
        "subscription_id": "s", "company_id": "c", "status": "active",
        "current_period_start": given, "current_period_end": given})

    assert user["modified_time"] == sent
    assert subscription["current_period_start"] == subscription["current_period_end"] == sent


class Level(IntEnum):
    HIGH = 3


class Custom:
    def __str__(self) -> str:
        return "custom!"


class BrokenStr:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_metadata_values_json_cannot_carry_become_text_at_the_collector(
        configured: LocalCollector) -> None:
    identifier = uuid.UUID("12345678-1234-5678-1234-567812345678")
    metadata = {
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "day": date(2024, 1, 2),
        "price": Decimal("12.50"), "raw": b"ab\xff", "tags": {"b", "a"}, "id": identifier,
        "pair": (1, 2.5), "nan": float("nan"), "inf": float("-inf"), 7: "int key",
        "level": Level.HIGH, "nested": {"at": [datetime(2024, 1, 2)]}, "flag": True,
        "nothing": None, "custom": Custom(), "broken": BrokenStr(),
    }

    assert entities.update_user({"user_id": "u-meta", "metadata": metadata}, sync=True).delivered

    [received] = configured.entities("user")
    assert received["metadata"] == {
        "when": "2024-01-02T03:04:05+00:00", "day": "2024-01-02", "price": "12.50",
        "raw": "ab\ufffd", "tags": ["a", "b"], "id": str(identifier), "pair": [1, 2.5],
        "nan": "nan", "inf": "-inf", "7": "int key", "level": 3,
        "nested": {"at": ["2024-01-02T00:00:00"]}, "flag": True, "nothing": None,
        "custom": "custom!", "broken": "<BrokenStr>",
    }


def test_metadata_nested_too_deep_is_cut_to_text() -> None:
    deep: dict[str, Any] = {}
    innermost = deep
    for _ in range(entities.MAX_METADATA_DEPTH + 5):
        innermost["next"] = {}
        innermost = innermost["next"]

    metadata = entities.shape_profile("user", {"user_id": "u", "metadata": deep})["metadata"]

    depth = 0
    while isinstance(metadata, dict):
        metadata = metadata["next"]
        depth += 1
    assert depth == entities.MAX_METADATA_DEPTH and isinstance(metadata, str)


# --- batches -----------------------------------------------------------------------------------


def test_a_queued_batch_is_one_record_per_item_in_order(ring: RingFile,
                                                        configured: LocalCollector) -> None:
    profiles = [{"user_id": f"u-{number}"} for number in range(5)]

    assert entities.update_users_batch(profiles) is True

    updates = drain(ring)
    assert [update.profile["user_id"] for update in updates] == [f"u-{n}" for n in range(5)]
    assert all(update.kind == "user" for update in updates)


def test_entity_requests_chunk_by_count_and_keep_order() -> None:
    updates = [EntityUpdate("user", entities.shape_profile("user", {"user_id": f"u-{n}"}))
               for n in range(1201)]
    updates.insert(600, EntityUpdate("company", MINIMAL_OUT["company"]))

    requests_ = entities.entity_requests(updates)

    assert [(r.path, r.count) for r in requests_] == [
        ("/v1/users/batch", 500), ("/v1/users/batch", 500), ("/v1/users/batch", 201),
        ("/v1/companies/batch", 1)]
    sent_ids = [item["user_id"] for request in requests_[:3] for item in json.loads(request.body)]
    assert sent_ids == [f"u-{n}" for n in range(1201)]


def test_entity_requests_chunk_by_bytes_and_send_an_oversized_profile_alone() -> None:
    megabyte = "x" * (1 << 20)
    sizes = [1, 1, 1, 5, 1]  # MiB of metadata per profile; the limit is 4 MiB per request
    updates = [EntityUpdate("user", entities.shape_profile(
        "user", {"user_id": f"u-{n}", "metadata": {"blob": megabyte * size}}))
        for n, size in enumerate(sizes)]

    requests_ = entities.entity_requests(updates)

    assert [r.count for r in requests_] == [3, 1, 1]
    assert len(requests_[0].body) <= entities.MAX_REQUEST_BYTES
    assert [len(json.loads(r.body)) for r in requests_] == [3, 1, 1]


def test_entity_requests_leave_out_updates_that_cannot_be_sent(
        caplog: pytest.LogCaptureFixture) -> None:
    good = entities.shape_profile("user", {"user_id": "good"})
    updates = [EntityUpdate("user", {**good, "user_id": None}),
               EntityUpdate("user", {**good, "user_id": "bytes", "metadata": {"b": b"x"}}),
               EntityUpdate("user", good)]

    with caplog.at_level(logging.WARNING, logger="moesif_fast"):
        requests_ = entities.entity_requests(updates)

    assert [(r.path, json.loads(r.body)) for r in requests_] == [("/v1/users/batch", [good])]
    assert len(caplog.records) == 2


def test_a_sync_batch_larger_than_one_request_is_sent_in_chunks(
        configured: LocalCollector) -> None:
    profiles = [{"company_id": f"c-{n}"} for n in range(entities.MAX_ENTITIES_PER_REQUEST + 1)]

    assert entities.update_companies_batch(profiles, sync=True).delivered

    assert [b["event_count"] for b in configured.batches()] == [
        entities.MAX_ENTITIES_PER_REQUEST, 1]
    assert [c["company_id"] for c in configured.entities("company")] == [
        p["company_id"] for p in profiles]


def test_an_empty_batch_sends_and_queues_nothing(ring: RingFile,
                                                 configured: LocalCollector) -> None:
    assert entities.update_users_batch([]) is True
    outcome = entities.update_subscriptions_batch([], sync=True)

    assert outcome.delivered and outcome.attempts == 0
    assert drain(ring) == []
    assert configured.stats()["requests"] == 0


# --- delivery when the collector misbehaves ------------------------------------------------------


def test_a_queued_update_made_while_the_collector_is_down_is_delivered_later(
        ring: RingFile, tmp_path: Path) -> None:
    database = tmp_path / "collector.sqlite3"
    port = unused_port()
    url = f"http://127.0.0.1:{port}"

    with moesif_settings(url, tmp_path):
        assert entities.update_user(USER_IN) is True  # nobody listens on the port
        assert entities.update_subscription(SUBSCRIPTION_IN) is True

    # A shipper tries, fails, stops without committing: the records stay in the ring.
    reader = Reader(ring)
    batch = reader.read(max_records=100, max_bytes=1 << 20)
    first_try = post_all(url, entities.entity_requests([decode(p) for p in batch.records]),
                         give_up_after=0.5)
    reader.close()
    assert first_try and not any(outcome.delivered for outcome in first_try)

    with LocalCollector(database, application_id=APPLICATION_ID, port=port) as collector:
        outcomes = post_all(url, entities.entity_requests(drain(ring)))

        assert all(outcome.delivered for outcome in outcomes)
        assert_same_in_order(collector.entities("user")[0], USER_OUT)
        assert_same_in_order(collector.entities("subscription")[0], SUBSCRIPTION_OUT)


def test_sync_update_is_retried_after_a_503_within_its_timeout(
        configured: LocalCollector) -> None:
    reply = requests.post(f"{configured.url}/_collector/faults",
                          json={"status": 503, "every": 2}, timeout=10)
    assert reply.status_code == 204
    assert entities.update_user({"user_id": "first"}, sync=True).delivered  # request 1: 201

    outcome = entities.update_user({"user_id": "second"}, sync=True, timeout=30)

    assert outcome.delivered and outcome.attempts == 2 and outcome.status == 201
    assert [user["user_id"] for user in configured.entities("user")] == ["first", "second"]
    assert configured.stats()["rejected"] == {"503": 1}


def test_sync_update_to_a_down_collector_returns_an_undelivered_outcome(tmp_path: Path) -> None:
    with moesif_settings(f"http://127.0.0.1:{unused_port()}", tmp_path):
        outcome = entities.update_company({"company_id": "c"}, sync=True, timeout=1.0)

    assert isinstance(outcome, Outcome)
    assert not outcome.delivered and not outcome.permanent
    assert outcome.status is None and outcome.attempts >= 1 and outcome.error


def test_sync_update_refused_by_the_collector_is_a_permanent_outcome(
        local_collector: LocalCollector, tmp_path: Path) -> None:
    with moesif_settings(local_collector.url, tmp_path, APPLICATION_ID="someone-else"):
        outcome = entities.update_user({"user_id": "u"}, sync=True)

    assert not outcome.delivered and outcome.permanent and outcome.status == 401


def test_invalid_moesif_settings_drop_updates_without_raising(
        caplog: pytest.LogCaptureFixture) -> None:
    with override_settings(MOESIF_MIDDLEWARE={"BASE_URI": "http://127.0.0.1:9"}), \
            caplog.at_level(logging.ERROR, logger="moesif_fast"):
        queued = entities.update_user({"user_id": "u"})
        sent = entities.update_user({"user_id": "u"}, sync=True)
        with pytest.raises(ValueError, match="user_id is required"):
            entities.update_user({})  # the caller's mistakes are still reported

    assert queued is False
    assert not sent.delivered and sent.permanent and "MOESIF_MIDDLEWARE" in (sent.error or "")
    [logged] = caplog.records  # once per process and problem
    assert "APPLICATION_ID" in logged.getMessage()
