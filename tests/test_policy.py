"""Policy: sampling (§2.11) and governance (§2.12) decisions compiled from /v1/config and
/v1/rules, the weak points it fixes (W1, W10, W15), and that nothing in it ever raises."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesif_fast.policy import MISSING_TAG_VALUE, Block, Policy, RequestFacts, Ruling


def facts(**fields: Any) -> RequestFacts:
    defaults: dict[str, Any] = {
        "verb": "GET", "route": "/items", "ip_address": "10.0.0.1", "headers": {},
        "body": None, "user_id": None, "company_id": None, "status": None,
    }
    return RequestFacts(**{**defaults, **fields})


def condition(path: str, value: Any) -> dict[str, Any]:
    return {"path": path, "value": value}


def group(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"conditions": list(conditions)}


def rule(rule_id: str = "r1", kind: str = "regex", *, groups: list[Any] | None = None,
         block: bool = True, status: int = 429, headers: Any = None, body: Any = None,
         **fields: Any) -> dict[str, Any]:
    """A well-formed rule; a regex rule matches GET /blocked unless `groups` says otherwise."""
    if groups is None and kind == "regex":
        groups = [group(condition("request.route", "/blocked"))]
    response: dict[str, Any] = {"status": status, "headers": headers or {}}
    if body is not None:
        response["body"] = body
    raw = {"_id": rule_id, "type": kind, "block": block, "response": response, **fields}
    if groups is not None:
        raw["regex_config"] = groups
    return raw


def ruling(policy: Policy, after_view: bool = False, **fields: Any) -> Ruling | None:
    return policy.govern(facts(**fields), after_view=after_view)


def block_of(policy: Policy, after_view: bool = False, **fields: Any) -> Block | None:
    result = ruling(policy, after_view, **fields)
    return None if result is None else result.block


# Sampling

PRECEDENCE_CONFIG = {
    "sample_rate": 40,
    "user_sample_rate": {"alice": 20, "42": 25},
    "company_sample_rate": {"acme": 30, "7": 35},
    "regex_config": [
        {"conditions": [condition("request.route", "^/special")], "sample_rate": 10},
        {"conditions": [condition("request.verb", "POST"), condition("request.route", "/x")],
         "sample_rate": 5},
    ],
}


@pytest.mark.parametrize(("fields", "rate"), [
    ({"route": "/special/1", "user_id": "alice", "company_id": "acme"}, 10),  # regex first
    ({"route": "/items", "user_id": "alice", "company_id": "acme"}, 20),  # then user
    ({"route": "/items", "user_id": "bob", "company_id": "acme"}, 30),  # then company
    ({"route": "/items", "user_id": "bob", "company_id": "other"}, 40),  # then global
    ({"route": "/items"}, 40),
    ({"route": "/items", "user_id": "", "company_id": ""}, 40),  # "" is no id
    ({"route": "/items", "user_id": 42}, 25),  # int ids match their string keys (W15)
    ({"route": "/items", "company_id": 7}, 35),
    ({"verb": "POST", "route": "/x"}, 5),  # both conditions of the second rule hold
    ({"verb": "GET", "route": "/x"}, 40),  # only one does
    ({"route": "/not/special", "user_id": "alice"}, 20),  # "^" anchors the unanchored search
])
def test_sample_rate_precedence(fields: dict[str, Any], rate: int) -> None:
    policy = Policy.compile(PRECEDENCE_CONFIG, [])
    assert policy.problems == []
    assert policy.sample_rate(facts(**fields)) == rate


@pytest.mark.parametrize(("rate", "weight"), [(100, 1), (50, 2), (33, 3), (30, 3), (1, 100),
                                              (0, 1)])
def test_weight(rate: int, weight: int) -> None:
    assert Policy.weight(rate) == weight


@pytest.mark.parametrize(("rate", "draw", "kept"), [
    (100, 0.0, True), (100, 0.999999999, True), (30, 0.2999, True), (30, 0.3, False),
    (0, 0.0, False), (0, 0.5, False),  # rate 0 never keeps
])
def test_keep(rate: int, draw: float, kept: bool) -> None:
    assert Policy.keep(rate, draw) is kept


def test_sample_rate_30_keeps_about_30_percent_with_weight_3() -> None:
    policy = Policy.compile({"sample_rate": 30}, None)
    rate = policy.sample_rate(facts())
    draws = random.Random(20251124)
    kept = sum(Policy.keep(rate, draws.random()) for _ in range(10_000))
    assert 2_700 <= kept <= 3_300
    assert Policy.weight(rate) == 3


@pytest.mark.parametrize("path", ["request.query.page", "user.plan", "request.headers.",
                                  "request.body.", "request.body.a..b", ""])
def test_an_unknown_regex_path_does_not_force_100(path: str) -> None:
    config = {"sample_rate": 40,
              "regex_config": [{"conditions": [condition(path, ".*")], "sample_rate": 100}]}
    policy = Policy.compile(config, None)
    assert policy.sample_rate(facts()) == 40
    assert "never matches" in policy.problems[0]


@pytest.mark.parametrize(("fields", "rate"), [
    ({"ip_address": None}, 40),  # an absent fact: the condition does not hold (W15)
    ({"ip_address": "10.1.2.3"}, 60),
])
def test_an_absent_fact_does_not_force_100(fields: dict[str, Any], rate: int) -> None:
    config = {"sample_rate": 40, "regex_config": [
        {"conditions": [condition("request.ip_address", r"^10\.")], "sample_rate": 60}]}
    assert Policy.compile(config, None).sample_rate(facts(**fields)) == rate


@pytest.mark.parametrize(("path", "value", "fields", "matches"), [
    ("request.route", "tems", {"route": "/items"}, True),  # unanchored
    ("request.route", "", {"route": "/items"}, False),  # an empty match does not count
    ("request.route", "x*", {"route": "/items"}, False),  # the first match is empty
    ("request.verb", "GET|PUT", {"verb": "PUT"}, True),
    ("response.status", "^5", {"status": 503}, True),
    ("response.status", 503, {"status": 503}, True),  # an int value is a regex too
    ("response.status", "^5", {"status": None}, False),
    ("request.headers.X-Tenant", "^blue$", {"headers": {"x-tenant": "blue"}}, True),
    ("request.body.kind", "bulk", {"body": {"kind": "bulk"}}, True),
])
def test_sampling_conditions(path: str, value: Any, fields: dict[str, Any],
                             matches: bool) -> None:
    config = {"regex_config": [{"conditions": [condition(path, value)], "sample_rate": 7}]}
    assert Policy.compile(config, None).sample_rate(facts(**fields)) == (7 if matches else 100)


@pytest.mark.parametrize(("config", "needs"), [
    (None, set()),
    ({"sample_rate": 5}, set()),
    ({"user_sample_rate": {"a": 5}}, {"user_id"}),
    ({"user_sample_rate": {}, "company_sample_rate": {"c": 5}}, {"company_id"}),
    ({"regex_config": [{"conditions": [condition("request.route", "/a"),
                                       condition("response.status", "5..")],
                        "sample_rate": 1}]}, {"route", "status"}),
    ({"regex_config": [{"conditions": [condition("request.ip_address", "a")], "sample_rate": 1},
                       {"conditions": [condition("request.headers.a", "b")], "sample_rate": 1},
                       {"conditions": [condition("request.body.a", "b")], "sample_rate": 1},
                       {"conditions": [condition("request.verb", "b")], "sample_rate": 1}]},
     {"ip_address", "headers", "body", "verb"}),
    ({"regex_config": [{"conditions": [condition("request.route", "(")], "sample_rate": 1}],
      "user_sample_rate": {"a": "x"}}, set()),  # nothing usable
])
def test_sampling_needs(config: Any, needs: set[str]) -> None:
    assert Policy.compile(config, None).sampling_needs() == needs


@pytest.mark.parametrize(("config", "rate", "problem"), [
    ({"sample_rate": "50"}, 100, "config.sample_rate"),
    ({"sample_rate": 150}, 100, "config.sample_rate"),
    ({"sample_rate": True}, 100, "config.sample_rate"),
    ({"sample_rate": 40, "user_sample_rate": {"u": "10"}}, 40, "config.user_sample_rate"),
    ({"sample_rate": 40, "user_sample_rate": {"u": -1}}, 40, "config.user_sample_rate"),
    ({"sample_rate": 40, "user_sample_rate": ["u"]}, 40, "config.user_sample_rate"),
    ({"sample_rate": 40, "regex_config": {"a": 1}}, 40, "config.regex_config"),
    ({"sample_rate": 40, "regex_config": ["x"]}, 40, "config.regex_config[0]"),
    ({"sample_rate": 40, "regex_config": [{"conditions": [condition("request.route", ".")],
                                           "sample_rate": 101}]}, 40, "config.regex_config[0]"),
    ({"sample_rate": 40, "regex_config": [{"conditions": [condition("request.route", "[")],
                                           "sample_rate": 1}]}, 40, "does not compile"),
    ({"sample_rate": 40, "regex_config": [{"conditions": [], "sample_rate": 1}]}, 40,
     "no conditions"),
    ({"sample_rate": 40, "regex_config": [{"sample_rate": 1}]}, 40, "conditions is not a list"),
    ([], 100, "config is not a JSON object"),
    ("x", 100, "config is not a JSON object"),
])
def test_malformed_sampling_config_is_ignored(config: Any, rate: int, problem: str) -> None:
    policy = Policy.compile(config, None)
    assert policy.sample_rate(facts(user_id="u")) == rate
    assert any(problem in text for text in policy.problems), policy.problems


def test_default_policy_samples_everything_and_governs_nothing() -> None:
    policy = Policy.DEFAULT
    assert policy.problems == []
    assert policy.sample_rate(facts(user_id="u", company_id="c")) == 100
    assert policy.global_sample_rate == 100
    assert policy.sampling_needs() == frozenset()
    assert not policy.governs()
    assert not policy.needs_response()
    assert policy.governance_needs() == frozenset()
    assert ruling(policy, route="/blocked") is None
    assert policy.captures_all


@pytest.mark.parametrize("config, rules", [
    ({"sample_rate": 99}, None),
    ({"user_sample_rate": {"u": 50}}, None),
    ({"regex_config": [{"conditions": [{"path": "request.route", "value": "/x"}],
                        "sample_rate": 10}]}, None),
    (None, [rule("block-1", status=403)]),
], ids=["global rate", "user rate", "sampling rule", "governance rule"])
def test_a_decision_to_take_is_not_capturing_all(config: Any, rules: Any) -> None:
    """captures_all lets the middleware skip sampling and governance: any rate below 100 %,
    any rate that depends on the request and any rule that can apply must turn it off."""
    policy = Policy.compile(config, rules)
    assert policy.problems == []
    assert not policy.captures_all


# Governance: regex rules

def test_a_regex_rule_blocks_with_its_status_headers_and_body() -> None:
    policy = Policy.compile(None, [rule("block-1", status=403, headers={"X-Reason": "banned"},
                                        body={"error": "banned", "codes": [1, 2]})])
    assert policy.problems == []
    assert policy.governs()
    result = ruling(policy, route="/blocked")
    assert result == Ruling(
        {"X-Reason": "banned", "Content-Type": "application/json"},
        Block("block-1", 403, json.dumps({"error": "banned", "codes": [1, 2]}).encode()))
    assert ruling(policy, route="/items") is None


@pytest.mark.parametrize(("body", "encoded"), [
    ("Too many requests", b'"Too many requests"'),  # a string body is a JSON string
    (None, b""),  # no body: an empty one, not "null"
    ([1, "two"], b'[1, "two"]'),
    (0, b"0"),
])
def test_block_body_is_json(body: Any, encoded: bytes) -> None:
    policy = Policy.compile(None, [rule(body=body)])
    assert block_of(policy, route="/blocked") == Block("r1", 429, encoded)


def test_a_rule_content_type_is_kept() -> None:
    policy = Policy.compile(None, [rule(headers={"content-type": "text/plain"}, body="no")])
    assert ruling(policy, route="/blocked").headers == {"content-type": "text/plain"}


@pytest.mark.parametrize(("route", "blocked"), [
    ("/blocked", True),  # the route is the path: a rule for /blocked matches it (W10)
    ("/blocked/1", False),  # governance conditions are anchored
    ("/api/blocked", False),
])
def test_route_is_the_path_and_conditions_are_anchored(route: str, blocked: bool) -> None:
    policy = Policy.compile(None, [rule()])
    assert (block_of(policy, route=route) is not None) is blocked


@pytest.mark.parametrize(("path", "value", "fields", "blocked"), [
    ("request.verb", "POST|PUT", {"verb": "PUT"}, True),
    ("request.verb", "POST|PUT", {"verb": "GET"}, False),
    ("request.ip_address", r"10\.0\..*", {"ip_address": "10.0.9.9"}, True),
    ("request.ip_address", r"10\.0\..*", {"ip_address": None}, False),
    ("request.headers.X-Api-Key", "secret-.*", {"headers": {"x-api-key": "secret-1"}}, True),
    ("request.headers.x-api-key", "secret-.*", {"headers": {"x-api-key": "public"}}, False),
    ("request.headers.x-api-key", ".*", {"headers": {}}, False),  # absent header
    ("request.body.operationName", "Delete.*", {"body": {"operationName": "DeleteAll"}}, True),
    ("request.body.operationName", ".*", {"body": ["operationName"]}, False),  # not an object
    ("request.body.operationName", ".*", {"body": "operationName"}, False),
    ("request.body.operationName", ".*", {"body": None}, False),
    ("request.body.user.plan", "free", {"body": {"user": {"plan": "free"}}}, True),  # nested
    ("request.body.user.plan", "free", {"body": {"user": "free"}}, False),
    ("request.body.count", "1[0-9]", {"body": {"count": 12}}, True),  # numbers as JSON text
    ("request.body.dry", "true", {"body": {"dry": True}}, True),
    ("request.body.items", ".*", {"body": {"items": [1]}}, False),  # arrays never match
    ("request.body.gone", ".*", {"body": {"gone": None}}, False),
    ("response.status", "5..", {"status": 503}, False),  # status rules wait for the view
])
def test_condition_paths(path: str, value: str, fields: dict[str, Any], blocked: bool) -> None:
    policy = Policy.compile(None, [rule(groups=[group(condition(path, value))])])
    assert policy.problems == []
    assert (block_of(policy, **fields) is not None) is blocked


OR_OF_ANDS = [
    group(condition("request.verb", "POST"), condition("request.route", "/orders")),
    group(condition("request.verb", "DELETE")),
]


@pytest.mark.parametrize(("verb", "route", "blocked"), [
    ("POST", "/orders", True),  # the first group: both conditions
    ("POST", "/items", False),  # the first group: one condition only
    ("GET", "/orders", False),
    ("DELETE", "/anything", True),  # the second group
])
def test_groups_are_or_of_ands(verb: str, route: str, blocked: bool) -> None:
    policy = Policy.compile(None, [rule(groups=OR_OF_ANDS)])
    assert (block_of(policy, verb=verb, route=route) is not None) is blocked


def test_a_group_on_an_unknown_path_never_matches_but_the_others_do() -> None:
    policy = Policy.compile(None, [rule(groups=[group(condition("request.cookie", ".*")),
                                                group(condition("request.verb", "DELETE"))])])
    assert block_of(policy, verb="GET") is None
    assert block_of(policy, verb="DELETE") is not None
    assert "never match" in policy.problems[0]


def test_a_response_status_rule_is_decided_after_the_view_only() -> None:
    policy = Policy.compile(None, [
        rule("late", groups=[group(condition("response.status", "5.."))], status=503),
        rule("early"),
    ])
    assert policy.needs_response()
    assert policy.governance_needs() == {"route", "status"}
    assert block_of(policy, route="/items") is None
    assert block_of(policy, route="/items", status=500) is None  # before the view: not yet
    assert block_of(policy, True, route="/items", status=500) == Block("late", 503, b"")
    assert block_of(policy, True, route="/items", status=200) is None
    # A rule decided before the view is not decided again after it.
    assert block_of(policy, route="/blocked").rule_id == "early"
    assert block_of(policy, True, route="/blocked", status=200) is None


def test_non_blocking_rules_add_their_headers() -> None:
    policy = Policy.compile(None, [
        rule("deprecated", block=False, status=200, headers={"X-API-Warn": "deprecated"},
             groups=[group(condition("request.route", "/v1/.*"))]),
        rule("tagged", block=False, status=200, headers={"X-Tag": "one"},
             groups=[group(condition("request.verb", "GET"))]),
    ])
    assert ruling(policy, route="/v1/items") == Ruling(
        {"X-API-Warn": "deprecated", "X-Tag": "one"}, None)
    assert ruling(policy, verb="POST", route="/v2/items") is None


def test_blocking_and_non_blocking_headers_merge_case_insensitively() -> None:
    policy = Policy.compile(None, [
        rule("warn", block=False, status=200, headers={"X-Warn": "old", "X-Limit": "10"},
             groups=[group(condition("request.verb", "GET"))]),
        rule("stop", headers={"x-limit": "0"}),
    ])
    assert ruling(policy, route="/blocked") == Ruling(
        {"X-Warn": "old", "x-limit": "0", "Content-Type": "application/json"},
        Block("stop", 429, b""))


# Governance: user and company rules

USER_TEMPLATE = {
    "message": "Hi {{0}}, your plan {{plan}} is over its {{1}} calls",
    "nested": [{"who": "{{0}}"}, ["{{plan}}", 3, None, True]],
    "missing": "{{nope}} {{nope|fallback}} {{plan|unused}}",
}


def user_policy(**rule_fields: Any) -> Policy:
    return Policy.compile(
        {"user_rules": {
            "alice": [{"rules": "quota", "values": {"0": "Alice", "1": 1000, "plan": "free"}}],
            "42": [{"rules": "quota", "values": {"0": "Forty-two"}}],
        }},
        [rule("quota", "user", status=402, body=USER_TEMPLATE,
              headers={"X-Plan": "{{plan}}", "X-Who": "{{0}}", "X-Static": "s"}, **rule_fields)],
    )


def test_a_user_rule_fills_positional_and_named_merge_tags_everywhere() -> None:
    policy = user_policy()
    assert policy.problems == []
    assert policy.governance_needs() == {"user_id"}
    result = ruling(policy, user_id="alice")
    assert result.headers == {"X-Plan": "free", "X-Who": "Alice", "X-Static": "s",
                              "Content-Type": "application/json"}
    assert result.block.rule_id == "quota"
    assert result.block.status == 402
    assert json.loads(result.block.body) == {
        "message": "Hi Alice, your plan free is over its 1000 calls",
        "nested": [{"who": "Alice"}, ["free", 3, None, True]],
        "missing": f"{MISSING_TAG_VALUE} fallback free",
    }


def test_merge_tags_without_a_value_become_unknown() -> None:
    result = ruling(user_policy(), user_id=42)  # an int id matches the key "42"
    assert result.headers["X-Plan"] == MISSING_TAG_VALUE
    assert json.loads(result.block.body)["message"] == (
        f"Hi Forty-two, your plan {MISSING_TAG_VALUE} is over its {MISSING_TAG_VALUE} calls")


@pytest.mark.parametrize("user_id", ["bob", None, ""])
def test_a_user_rule_skips_users_it_does_not_target(user_id: str | None) -> None:
    assert ruling(user_policy(), user_id=user_id) is None


def test_a_user_rule_with_conditions_needs_them_to_hold() -> None:
    policy = user_policy(groups=[group(condition("request.verb", "POST"))])
    assert ruling(policy, user_id="alice", verb="GET") is None
    assert block_of(policy, user_id="alice", verb="POST").rule_id == "quota"


def test_a_merge_tag_value_cannot_break_a_header() -> None:
    policy = Policy.compile(
        {"user_rules": {"eve": [{"rules": "r", "values": {"0": "a\r\nSet-Cookie: x=1"}}]}},
        [rule("r", "user", headers={"X-Who": "{{0}}"})])
    assert ruling(policy, user_id="eve").headers["X-Who"] == "a  Set-Cookie: x=1"


def test_a_company_rule() -> None:
    policy = Policy.compile(
        {"company_rules": {"acme": [{"rules": "overdue", "values": {"0": "ACME"}}]}},
        [rule("overdue", "company", status=402, body={"error": "{{0}} has overdue invoices"})])
    assert policy.governance_needs() == {"company_id"}
    block = block_of(policy, company_id="acme", user_id="alice")
    assert block == Block("overdue", 402, b'{"error": "ACME has overdue invoices"}')
    assert block_of(policy, company_id="other") is None
    assert block_of(policy, company_id=None) is None


PRECEDENCE_RULES = [
    rule("by-user", "user", status=401, headers={"X-From": "user", "X-User": "u"}),
    rule("by-company", "company", status=402, headers={"X-From": "company", "X-Company": "c"}),
    rule("by-regex", status=403, headers={"X-From": "regex", "X-Regex": "r"}),
]
PRECEDENCE_ENTITIES = {"user_rules": {"alice": [{"rules": "by-user"}]},
                       "company_rules": {"acme": [{"rules": "by-company"}]}}


@pytest.mark.parametrize(("fields", "blocked_by", "status", "headers"), [
    ({"route": "/blocked", "user_id": "alice", "company_id": "acme"}, "by-user", 401,
     {"X-From": "user", "X-Regex": "r", "X-Company": "c", "X-User": "u"}),
    ({"route": "/blocked", "user_id": "bob", "company_id": "acme"}, "by-company", 402,
     {"X-From": "company", "X-Regex": "r", "X-Company": "c"}),
    ({"route": "/items", "user_id": "alice", "company_id": "acme"}, "by-user", 401,
     {"X-From": "user", "X-Company": "c", "X-User": "u"}),
    ({"route": "/blocked", "user_id": "bob"}, "by-regex", 403,
     {"X-From": "regex", "X-Regex": "r"}),
])
def test_user_beats_company_beats_regex(fields: dict[str, Any], blocked_by: str, status: int,
                                        headers: dict[str, str]) -> None:
    result = ruling(Policy.compile(PRECEDENCE_ENTITIES, PRECEDENCE_RULES), **fields)
    assert result.block.rule_id == blocked_by
    assert result.block.status == status
    assert result.headers == {**headers, "Content-Type": "application/json"}


NOT_MATCHING = rule("outsiders", "user", applied_to="not_matching", status=403)


@pytest.mark.parametrize(("user_id", "blocked"), [
    ("insider", False),  # listed in user_rules for the rule: not targeted
    ("stranger", True),  # not listed: targeted
    ("other-rule", True),  # listed for another rule only
    (None, False),  # unidentified requests only get applied_to_unidentified rules
])
def test_applied_to_not_matching(user_id: str | None, blocked: bool) -> None:
    policy = Policy.compile({"user_rules": {"insider": [{"rules": "outsiders"}],
                                            "other-rule": [{"rules": "elsewhere"}]}},
                            [NOT_MATCHING])
    assert policy.governs()
    assert (block_of(policy, user_id=user_id) is not None) is blocked


@pytest.mark.parametrize(("fields", "blocked"), [
    ({"user_id": None}, True),
    ({"user_id": ""}, True),
    ({"user_id": "bob"}, False),  # identified but not targeted
    ({"user_id": None, "verb": "POST"}, False),  # the rule's conditions still apply
])
def test_applied_to_unidentified(fields: dict[str, Any], blocked: bool) -> None:
    policy = Policy.compile(None, [
        rule("anonymous", "user", applied_to_unidentified=True, status=401,
             groups=[group(condition("request.verb", "GET"))],
             body={"error": "sign in, {{0}}", "hint": "{{0|guest}}"})])
    assert policy.governs()
    block = block_of(policy, **fields)
    assert (block is not None) is blocked
    if block is not None:  # no entry, so no values: defaults, else UNKNOWN
        assert json.loads(block.body) == {"error": f"sign in, {MISSING_TAG_VALUE}",
                                          "hint": "guest"}


def test_an_unidentified_company_rule_needs_no_company_id() -> None:
    policy = Policy.compile(None, [rule("no-company", "company", applied_to_unidentified=True)])
    assert block_of(policy, company_id=None).rule_id == "no-company"
    assert block_of(policy, company_id="acme") is None


@pytest.mark.parametrize(("config", "rules", "needs", "needs_response"), [
    (None, [rule()], {"route"}, False),
    (None, [rule(groups=[group(condition("request.headers.x-a", "1"),
                               condition("request.body.a", "1"))])], {"headers", "body"}, False),
    (None, [rule(groups=[group(condition("request.ip_address", "1")),
                         group(condition("response.status", "5.."))])],
     {"ip_address", "status"}, True),
    ({"user_rules": {"a": [{"rules": "u"}]}}, [rule("u", "user")], {"user_id"}, False),
    (None, [rule("c", "company", applied_to="not_matching",
                 groups=[group(condition("request.verb", "GET"))])], {"company_id", "verb"},
     False),
    (None, [rule("u", "user", groups=[group(condition("request.verb", "GET"))])], set(),
     False),  # nobody is targeted
])
def test_governance_needs(config: Any, rules: list[Any], needs: set[str],
                          needs_response: bool) -> None:
    policy = Policy.compile(config, rules)
    assert policy.governance_needs() == needs
    assert policy.needs_response() is needs_response
    assert policy.governs() is bool(needs)


def test_entity_rules_without_targets_do_not_govern() -> None:
    policy = Policy.compile({"user_rules": {}}, [rule("quota", "user")])
    assert not policy.governs()
    assert policy.governance_needs() == frozenset()
    assert ruling(policy, user_id="alice") is None


@pytest.mark.parametrize("entries", [
    "quota", None, 7, {"rules": "quota"}, ["quota"], [None], [{"rules": ["quota"]}],
    [{"rules": "unknown"}], [{"values": {"0": "x"}}],
    [{"rules": "quota", "values": "x"}],  # tags then fall back to UNKNOWN
])
def test_malformed_user_rule_entries_are_skipped(entries: Any) -> None:
    policy = Policy.compile({"user_rules": {"alice": entries}},
                            [rule("quota", "user", headers={"X-Who": "{{0}}"})])
    result = ruling(policy, user_id="alice")
    assert result is None or result.headers["X-Who"] == MISSING_TAG_VALUE


# Governance: malformed rules

VALID = rule("valid")
MALFORMED_RULES = [
    (None, "not an object"),
    ([], "not an object"),
    ("x", "not an object"),
    (1, "not an object"),
    ({"_id": 1}, "_id is not a non-empty string"),
    ({}, "_id is not a non-empty string"),
    ({**VALID, "_id": ""}, "_id is not a non-empty string"),
    ({**VALID, "type": "cohort"}, "type 'cohort'"),
    ({**VALID, "type": ["regex"]}, "type ['regex']"),
    ({**VALID, "block": "yes"}, "block is not a boolean"),
    ({key: value for key, value in VALID.items() if key != "response"}, "response is not"),
    ({**VALID, "response": "403"}, "response is not an object"),
    ({**VALID, "response": {"headers": {}}}, "response.status"),
    ({**VALID, "response": {"status": "429"}}, "response.status"),
    ({**VALID, "response": {"status": 99}}, "response.status"),
    ({**VALID, "response": {"status": 600}}, "response.status"),
    ({**VALID, "response": {"status": True}}, "response.status"),
    ({**VALID, "response": {"status": 429, "headers": ["X-A"]}}, "response.headers"),
    ({**VALID, "response": {"status": 429, "body": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
     "nests more than"),
    ({**VALID, "regex_config": None}, "a regex rule without conditions"),
    ({**VALID, "regex_config": []}, "a regex rule without conditions"),
    ({**VALID, "regex_config": [{"conditions": []}]}, "a regex rule without conditions"),
    ({**VALID, "regex_config": {"conditions": []}}, "regex_config is not a list"),
    ({**VALID, "regex_config": ["x"]}, "group is not an object"),
    ({**VALID, "regex_config": [{"conditions": "x"}]}, "conditions is not a list"),
    ({**VALID, "regex_config": [group("x")]}, "a condition is not an object"),
    ({**VALID, "regex_config": [group({"path": 1, "value": "x"})]}, "path is not a string"),
    ({**VALID, "regex_config": [group(condition("request.route", None))]}, "not a string"),
    ({**VALID, "regex_config": [group(condition("request.route", "(unclosed"))]},
     "does not compile"),
    ({**VALID, "regex_config": [group(condition("request.verb", "GET"),
                                      condition("request.route", "*"))]}, "does not compile"),
    ({**VALID, "regex_config": [group(condition("request.nothing", "x"))]},
     "never matches"),
    (rule("u", "user", applied_to="everyone"), "applied_to 'everyone'"),
    (rule("u", "user", applied_to_unidentified="yes"), "applied_to_unidentified"),
]


@pytest.mark.parametrize(("raw_rule", "problem"), MALFORMED_RULES)
def test_a_malformed_rule_is_ignored(raw_rule: Any, problem: str) -> None:
    policy = Policy.compile({"user_rules": {"alice": [{"rules": "u"}]}}, [raw_rule, VALID])
    assert len(policy.problems) == 1, policy.problems
    assert problem in policy.problems[0]
    assert policy.problems[0].startswith("rules[0]")
    assert policy.problems[0].endswith("rule ignored")
    for fields in ({"route": "/blocked"}, {"route": "/items", "user_id": "alice"}):
        result = ruling(policy, **fields)
        assert result is None or result.block.rule_id == "valid"


def test_a_rejected_rule_reports_only_why_it_was_rejected() -> None:
    raw = rule("r", headers={"Bad Name": "x"}, groups=[group(condition("request.nothing", "."))])
    del raw["response"]["status"]
    policy = Policy.compile(None, [raw])
    assert len(policy.problems) == 1
    assert "never matches" in policy.problems[0]


def test_a_duplicate_id_is_ignored() -> None:
    policy = Policy.compile(None, [rule("same", status=403), rule("same", status=404)])
    assert "_id of an earlier rule" in policy.problems[0]
    assert block_of(policy, route="/blocked").status == 403


@pytest.mark.parametrize(("headers", "kept", "problem"), [
    ({"X-Ok": "1", "Bad Name": "x"}, {"X-Ok": "1"}, "not an HTTP token"),
    ({"X-Ok": "1", "": "x"}, {"X-Ok": "1"}, "not an HTTP token"),
    ({"X-Ok": "1", "X-Dict": {"a": 1}}, {"X-Ok": "1"}, "not a string, number or boolean"),
    ({"X-Ok": "1", "X-None": None}, {"X-Ok": "1"}, "not a string, number or boolean"),
    ({"X-Ok": "1", "Transfer-Encoding": "chunked"}, {"X-Ok": "1"}, "cannot set"),
    ({"X-Ok": "1", "Content-Length": "5"}, {"X-Ok": "1"}, "cannot set"),
    ({"X-Limit": 100, "X-Flag": False, "X-Ratio": 0.5}, {"X-Limit": "100", "X-Flag": "false",
                                                         "X-Ratio": "0.5"}, None),
    ({"X-Lines": "a\nb\x00c\td"}, {"X-Lines": "a b c\td"}, None),
])
def test_unusable_headers_are_left_out(headers: dict[str, Any], kept: dict[str, str],
                                       problem: str | None) -> None:
    policy = Policy.compile(None, [rule(block=False, status=200, headers=headers)])
    assert ruling(policy, route="/blocked") == Ruling(kept, None)
    if problem is None:
        assert policy.problems == []
    else:
        assert problem in policy.problems[0] and policy.problems[0].endswith("header ignored")


@pytest.mark.parametrize(("config", "rules", "problem"), [
    (None, {"_id": "r1"}, "rules is not a JSON array"),
    (None, "x", "rules is not a JSON array"),
    (None, 3, "rules is not a JSON array"),
    ({"user_rules": ["alice"]}, [], "config.user_rules is not a JSON object"),
    ({"company_rules": "acme"}, [], "config.company_rules is not a JSON object"),
])
def test_garbage_shapes_are_ignored(config: Any, rules: Any, problem: str) -> None:
    policy = Policy.compile(config, rules)
    assert problem in policy.problems[0]
    assert not policy.governs()
    assert ruling(policy, route="/blocked", user_id="alice", company_id="acme") is None


def test_missing_config_and_rules_are_not_problems() -> None:
    assert Policy.compile(None, None).problems == []
    assert Policy.compile({}, []).problems == []


# Nothing raises

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
PATHS = st.sampled_from(["request.verb", "request.route", "request.ip_address",
                         "request.headers.x-a", "request.headers.X-A", "request.body.a",
                         "request.body.a.b", "response.status", "request.body.", "nowhere"])
REGEXES = st.sampled_from(["", ".*", "GET", "/a.*", "(", "[a-", "5..", "{{0}}", "a|b", "x*"])
CONDITION = st.fixed_dictionaries({}, optional={"path": PATHS | JSON_VALUES,
                                                "value": REGEXES | JSON_VALUES})
GROUPS = st.lists(st.fixed_dictionaries({}, optional={"conditions": st.lists(CONDITION,
                                                                            max_size=3)})
                  | JSON_VALUES, max_size=3) | JSON_VALUES
TEMPLATES = st.sampled_from(["{{0}}", "{{plan}}", "{{x|d}}", "a{{0}}b{{1}}", "plain"])
PLAUSIBLE_RULE = st.fixed_dictionaries({}, optional={
    "_id": st.sampled_from(["r1", "r2", "r3"]) | JSON_VALUES,
    "type": st.sampled_from(["regex", "user", "company"]) | JSON_VALUES,
    "block": st.booleans() | JSON_VALUES,
    "applied_to": st.sampled_from(["matching", "not_matching"]) | JSON_VALUES,
    "applied_to_unidentified": st.booleans() | JSON_VALUES,
    "regex_config": GROUPS,
    "variables": JSON_VALUES,
    "response": st.fixed_dictionaries({}, optional={
        "status": st.integers(90, 610) | JSON_VALUES,
        "headers": st.dictionaries(st.text(max_size=6) | st.sampled_from(["X-A", "Content-Type"]),
                                   TEMPLATES | JSON_VALUES, max_size=3) | JSON_VALUES,
        "body": JSON_VALUES | st.dictionaries(st.text(max_size=4), TEMPLATES, max_size=3),
    }) | JSON_VALUES,
})
GOOD_REGEXES = st.sampled_from([".*", "GET", "POST|GET", "/a.*", "/blocked", "5..", "[0-9]+"])
GOOD_RULE = st.fixed_dictionaries({
    "_id": st.sampled_from(["r1", "r2", "r3"]),
    "type": st.sampled_from(["regex", "user", "company"]),
    "block": st.booleans(),
    "regex_config": st.lists(st.fixed_dictionaries({"conditions": st.lists(
        st.fixed_dictionaries({"path": PATHS, "value": GOOD_REGEXES}), min_size=1, max_size=2)}),
        min_size=1, max_size=2),
    "response": st.fixed_dictionaries({
        "status": st.integers(100, 599),
        "headers": st.dictionaries(st.sampled_from(["X-A", "x-a", "Content-Type", "X-B"]),
                                   TEMPLATES, max_size=3),
    }, optional={"body": JSON_VALUES | st.lists(TEMPLATES, max_size=3)}),
}, optional={"applied_to": st.sampled_from(["matching", "not_matching"]),
             "applied_to_unidentified": st.booleans()})
ENTITY_IDS = st.sampled_from(["alice", "42", ""]) | st.text(max_size=4)
ENTRY = st.fixed_dictionaries({
    "rules": st.sampled_from(["r1", "r2", "r3"]),
    "values": st.dictionaries(st.sampled_from(["0", "1", "plan"]), JSON_VALUES),
})
ENTRIES = st.dictionaries(
    ENTITY_IDS,
    st.lists(ENTRY | st.fixed_dictionaries({}, optional={
        "rules": st.sampled_from(["r1", "r2", "r3"]) | JSON_VALUES,
        "values": st.dictionaries(st.sampled_from(["0", "1", "plan"]), JSON_VALUES) | JSON_VALUES,
    }) | JSON_VALUES, max_size=3) | JSON_VALUES,
    max_size=3) | JSON_VALUES
PLAUSIBLE_CONFIG = st.fixed_dictionaries({}, optional={
    "sample_rate": st.integers(-5, 105) | JSON_VALUES,
    "user_sample_rate": st.dictionaries(ENTITY_IDS, st.integers(-5, 105) | JSON_VALUES)
    | JSON_VALUES,
    "company_sample_rate": st.dictionaries(ENTITY_IDS, st.integers(-5, 105)) | JSON_VALUES,
    "regex_config": st.lists(st.fixed_dictionaries({}, optional={
        "conditions": st.lists(CONDITION, max_size=3) | JSON_VALUES,
        "sample_rate": st.integers(-5, 105) | JSON_VALUES,
    }) | JSON_VALUES, max_size=3) | JSON_VALUES,
    "user_rules": ENTRIES,
    "company_rules": ENTRIES,
})
FACTS = st.builds(
    RequestFacts,
    verb=st.sampled_from(["GET", "POST"]) | st.text(max_size=6),
    route=st.sampled_from(["/a", "/blocked"]) | st.text(max_size=8),
    ip_address=st.none() | st.text(max_size=8),
    headers=st.dictionaries(st.sampled_from(["x-a", "content-type"]) | st.text(max_size=4),
                            st.text(max_size=6), max_size=3),
    body=JSON_VALUES | st.fixed_dictionaries({"a": JSON_VALUES}),
    user_id=st.none() | ENTITY_IDS | st.integers(),
    company_id=st.none() | ENTITY_IDS | st.integers(),
    status=st.none() | st.integers(100, 599),
)
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FORBIDDEN_IN_HEADER_VALUES = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
NO_DEADLINE = settings(max_examples=300, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])


@NO_DEADLINE
@given(config=PLAUSIBLE_CONFIG | JSON_VALUES,
       rules=st.lists(GOOD_RULE | PLAUSIBLE_RULE | JSON_VALUES, max_size=4) | JSON_VALUES)
def test_compile_never_raises(config: Any, rules: Any) -> None:
    policy = Policy.compile(config, rules)
    assert all(type(problem) is str for problem in policy.problems)
    assert 0 <= policy.global_sample_rate <= 100


@NO_DEADLINE
@given(config=PLAUSIBLE_CONFIG, rules=st.lists(GOOD_RULE | PLAUSIBLE_RULE, max_size=4),
       request=FACTS)
def test_decisions_never_raise_and_are_well_formed(config: Any, rules: Any,
                                                    request: RequestFacts) -> None:
    policy = Policy.compile(config, rules)
    assert 0 <= policy.sample_rate(request) <= 100
    for after_view in (False, True):
        result = policy.govern(request, after_view=after_view)
        if result is None:
            continue
        assert result.headers or result.block is not None
        for name, value in result.headers.items():
            assert HEADER_NAME.fullmatch(name)
            assert not FORBIDDEN_IN_HEADER_VALUES.search(value)
        if result.block is not None:
            assert 100 <= result.block.status <= 599
            assert any(name.lower() == "content-type" for name in result.headers)
            if result.block.body:
                json.loads(result.block.body)
