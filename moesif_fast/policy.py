"""Sampling and governance decisions for a worker, compiled once per config/rules change.

`Policy.compile(config, rules)` turns the bodies of `GET /v1/config` (§1.6 of the protocol
notes) and `GET /v1/rules` (§1.7) into plain dicts, tuples and precompiled regexes. It never
raises: whatever part is malformed is left out and described in `Policy.problems`. Per request
a worker then asks, using nothing but dict lookups and the compiled regexes:

- `sample_rate(facts)` (§2.11): the first `regex_config` rule whose conditions all hold, else
  `user_sample_rate[user id]`, else `company_sample_rate[company id]`, else `sample_rate`
  (default 100). `keep(rate, draw)` and `weight(rate)` finish the decision. `sampling_needs()`
  says which facts the rate can depend on: when it is empty the rate is `global_sample_rate`
  and the middleware can decide before it computes anything else.
- `govern(facts, after_view=...)` (§2.12): regex rules, then company rules, then user rules;
  every matched rule adds its headers, the last matched blocking rule gives the status, the
  body and `blocked_by`. Rules that do not look at `response.status` are decided before the
  view (`after_view=False`), so a blocked request never reaches the view; the others after it.
  `governs()` is False when no rule can ever apply: the middleware then skips governance;
  `governance_needs()` and `needs_response()` say which facts and which phases it needs.

Semantics, where the protocol notes leave a choice:

- Sampling conditions match like the reference: an unanchored `re.search` that must find a
  non-empty text. Governance conditions are anchored (`re.fullmatch`), also like the reference.
- Condition paths: `request.verb`, `request.route` (the path without the query string),
  `request.ip_address`, `request.headers.<name>` (case-insensitive), `request.body.<field>`
  (dots walk nested JSON objects: `request.body.user.id`; a number or boolean there matches
  as its JSON text, an object, array or null never matches), `response.status`. A condition
  on any other path, or on a fact that is absent (no IP, no such header, a body that is not a
  JSON object, no status yet), does not hold; it never raises.
- A rule's `regex_config` is a list of OR-ed groups of AND-ed conditions. A group without
  conditions is left out. A user or company rule with no conditions at all applies to every
  request of the entities it targets; a regex rule with none is ignored (it would block or
  tag the whole API by accident). A malformed condition (not a string path with a string or
  integer regex, or a regex that does not compile) makes its whole rule ignored.
- User and company ids are compared as strings (`str(user_id)`), so the int id 42 matches the
  JSON key "42". None and "" mean "not identified".
- Who a user rule targets: with `applied_to` "matching" (the default) the users whose entries in
  `config.user_rules` name the rule; with "not_matching" every identified user whose entries do
  not name it. A request without a user id gets exactly the user rules with
  `applied_to_unidentified: true` whose conditions hold, whatever their `applied_to`, and
  without merge-tag values. Company rules work the same way with `company_rules` and the
  company id. Entries of `user_rules`/`company_rules` are read when a request uses them (so
  that compiling stays proportional to the rules, not to the number of users); a malformed
  entry is skipped then, and is not listed in `problems`.
- Merge tags: every `{{name}}` in a header value or in a string anywhere in the body (through
  objects and arrays) becomes `values[name]` of the config entry that applied the rule, where
  name is a position ("0", "1"...) or a variable name ("plan"). `{{name|text}}` falls back to
  text; otherwise a missing value becomes "UNKNOWN", as in Moesif's other SDKs. The rule's
  `variables` list is not consulted: the entry's `values` are keyed by the same names.
- The response of a rule: `response.status` must be an int in 100..599 (for every rule, as in
  the reference), `response.headers` an object or absent. A header whose name is not an HTTP
  token, whose value is not a string, number or boolean, or that is hop-by-hop or
  Content-Length, is left out. Control characters in header values (after merge tags) become
  spaces, so the WSGI server never refuses them.
- A block's body is the rule's body encoded as JSON (a string body becomes a JSON string, as in
  the reference); no body gives an empty one. Its headers are those of every matched rule,
  merged case-insensitively with later rules winning, plus `Content-Type: application/json`
  unless one of them sets a Content-Type.
- Non-blocking rules that match add their headers to the normal response (Moesif documents
  rules that only add a header, e.g. a deprecation warning); `govern` then returns a `Ruling`
  without a `Block`.
- A rule on `response.status` can only run after the view: when a rule decided before the view
  blocks, the view and these rules do not run.
- Sampling: `keep(rate, draw)` keeps when `draw * 100 < rate`, so rate 100 always keeps and
  rate 0 never does (the reference keeps rate 0 when the draw is exactly 0.0).
  `weight(rate)` is floor(100 / rate), and 1 for rate 0, as in the reference.

Differences from moesifdjango 2.3.13 (all deliberate):

- `request.route` is the path without the query string; the reference matched the full URI
  (scheme, host and query), so a rule written for `/echo` never matched (W10).
- Governance is decided before the view, so a blocked request has no side effects; the
  reference ran the view and then replaced its response (W10). `response.status` conditions
  work, after the view; the reference could never match them.
- The rules' headers are applied to the response and the Content-Type is correct; the
  reference kept the view's headers, including its Content-Type, and recorded only the rules'
  headers in the event (W10). Non-blocking rules' headers are applied too.
- `applied_to` and `applied_to_unidentified` are honoured; the reference ignored them (W10).
- Named merge tags, `{{name|default}}`, and merge tags inside arrays work; in the reference
  named tags and arrays made the request fail with a 500 (W10). Regex and unidentified rules
  also get their tags replaced (by defaults or "UNKNOWN") instead of showing `{{0}}`.
- Conditions on request headers and on any (nested) body field are supported; the reference
  only knew `request.body.operationName` and `request.body.query`.
- A rule without a body blocks with an empty body instead of the JSON text `null`.
- A malformed rule, condition or header is ignored; the reference could turn requests into 500s
  (W2 and the KeyErrors of §2.12).
- Sampling: a condition on an unknown path simply does not hold; the reference returned 100 %
  for every request (W15). Integer user and company ids match their string keys (W15). All
  conditions of a sampling rule are AND-ed; the reference kept only the last condition per path.
- The config is parsed once per change, not on every request (W4); a missing or refused config
  or rules list gives `Policy.DEFAULT`: sample everything, block nothing (W1).
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar

MISSING_TAG_VALUE = "UNKNOWN"  # a merge tag without a value or a default
JSON_CONTENT_TYPE = "application/json"
MAX_BODY_DEPTH = 64  # deeper rule bodies are refused: filling them must not run out of stack
FULL_RATE = 100

# RFC 9110 token characters: what gunicorn and Django accept as a header name.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What gunicorn refuses in a header value: the control characters, except tab.
_HEADER_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers a rule must not set: they describe the connection or the framing, not the response.
_FORBIDDEN_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "content-length",
})
_MERGE_TAG = re.compile(r"\{\{([^{}|]+)(?:\|([^{}]*))?\}\}")
_RULE_TYPES = ("regex", "company", "user")


@dataclass(slots=True)
class RequestFacts:
    """What the middleware knows about a request when it asks for a decision. Read-only by
    convention: a frozen dataclass takes 1.5 µs to build, most of a sampled-out request's
    budget, this one 0.3 µs."""

    verb: str
    route: str  # the path, without the query string
    ip_address: str | None
    headers: Mapping[str, str]  # lower-case dashed names ("x-api-key") → value
    body: Any  # the parsed JSON request body, or None when absent or not JSON
    user_id: str | int | None  # compared as str(user_id); None or "" when not identified
    company_id: str | int | None  # the same
    status: int | None = None  # the response status; None before the view


@dataclass(frozen=True, slots=True)
class Block:
    """The response that replaces the view's (or is sent instead of running it)."""

    rule_id: str  # the event's blocked_by
    status: int
    body: bytes  # JSON


@dataclass(frozen=True, slots=True)
class Ruling:
    """What governance decided for a request in one phase (before or after the view)."""

    headers: dict[str, str]  # set these on the response, blocked or not
    block: Block | None  # None: keep the view's response (with the headers above)


FactReader = Callable[[RequestFacts], Any]  # a fact as text, or None when absent
RegexTest = Callable[[str], Any]  # truthy when the condition's regex accepts the text
Condition = tuple[str, FactReader, RegexTest]  # (the RequestFacts field it reads, ...)
Conditions = tuple[Condition, ...]  # AND-ed


class Policy:
    """The compiled sampling and governance policy (see the module docstring). Built by
    `compile`."""

    DEFAULT: ClassVar[Policy]  # sample everything, block nothing

    __slots__ = ("problems", "global_sample_rate", "_sampling_rules", "_user_rates",
                 "_company_rates", "_sampling_needs", "_regex_rules", "_users", "_companies",
                 "_governs", "_governs_phase", "_needs_response", "_governance_needs",
                 "captures_all")

    def __init__(self, problems: list[str], global_sample_rate: int,
                 sampling_rules: tuple[tuple[Conditions, int], ...], user_rates: dict[str, int],
                 company_rates: dict[str, int], regex_rules: list[_Rule],
                 users: _EntityRules, companies: _EntityRules) -> None:
        self.problems = problems
        self.global_sample_rate = global_sample_rate
        self._sampling_rules = sampling_rules
        self._user_rates = user_rates
        self._company_rates = company_rates
        sampling_needs = {field for conditions, _ in sampling_rules
                          for field, _, _ in conditions}
        if user_rates:
            sampling_needs.add("user_id")
        if company_rates:
            sampling_needs.add("company_id")
        self._sampling_needs = frozenset(sampling_needs)
        self._regex_rules = _by_phase(regex_rules)
        self._users = users
        self._companies = companies
        reachable = list(regex_rules)
        governance_needs = set()
        for entity_rules, field in ((users, "user_id"), (companies, "company_id")):
            if entity_rules.reachable():
                reachable.extend(entity_rules.by_id.values())
                governance_needs.add(field)
        governance_needs.update(field for rule in reachable for conditions in rule.groups
                                for field, _, _ in conditions)
        self._governs = bool(reachable)
        self.captures_all = not reachable and not sampling_needs \
            and global_sample_rate >= FULL_RATE
        """No rule can apply and every call is sampled: the middleware captures every call
        with no decision to take (the common case, read on every request)."""
        self._needs_response = any(rule.after_view for rule in reachable)
        self._governs_phase = (any(not rule.after_view for rule in reachable),
                               self._needs_response)  # indexed by after_view
        self._governance_needs = frozenset(governance_needs)

    @classmethod
    def compile(cls, config: object, rules: object) -> Policy:
        """The policy of a config body and a rules body (parsed JSON, or None when missing).
        Never raises: malformed parts are left out and described in `problems`."""
        problems: list[str] = []
        config = _as_object(config, "config", problems)
        global_sample_rate = FULL_RATE
        if config.get("sample_rate") is not None:
            try:
                global_sample_rate = _rate(config["sample_rate"])
            except _Unusable as error:
                problems.append(f"config.sample_rate: {error}; using {FULL_RATE}")
        by_type: dict[str, list[_Rule]] = {kind: [] for kind in _RULE_TYPES}
        seen_ids: set[str] = set()
        for index, raw_rule in enumerate(_as_list(rules, "rules", problems)):
            where = f"rules[{index}]{_id_note(raw_rule)}"
            notes: list[str] = []  # about parts of a rule that is used nevertheless
            try:
                rule = _compile_rule(raw_rule, notes)
            except _Unusable as error:
                problems.append(f"{where}: {error}; rule ignored")
                continue
            if rule.rule_id in seen_ids:
                problems.append(f"{where}: the _id of an earlier rule; rule ignored")
                continue
            seen_ids.add(rule.rule_id)
            by_type[rule.kind].append(rule)
            problems.extend(f"{where}: {note}" for note in notes)
        return cls(
            problems, global_sample_rate,
            _compile_sampling_rules(config.get("regex_config"), problems),
            _compile_rates(config.get("user_sample_rate"), "user_sample_rate", problems),
            _compile_rates(config.get("company_sample_rate"), "company_sample_rate", problems),
            by_type["regex"],
            _EntityRules(by_type["user"], _as_object(config.get("user_rules"),
                                                     "config.user_rules", problems)),
            _EntityRules(by_type["company"], _as_object(config.get("company_rules"),
                                                        "config.company_rules", problems)),
        )

    # Sampling

    def sample_rate(self, facts: RequestFacts) -> int:
        """The sampling rate (0..100) of a request, in the order of §2.11."""
        for conditions, rate in self._sampling_rules:
            if _all_hold(conditions, facts):
                return rate
        if self._user_rates:
            user_key = _entity_key(facts.user_id)
            if user_key is not None:
                rate = self._user_rates.get(user_key)
                if rate is not None:
                    return rate
        if self._company_rates:
            company_key = _entity_key(facts.company_id)
            if company_key is not None:
                rate = self._company_rates.get(company_key)
                if rate is not None:
                    return rate
        return self.global_sample_rate

    def sampling_needs(self) -> frozenset[str]:
        """The RequestFacts fields `sample_rate` can read. Empty: the rate is always
        `global_sample_rate`, whatever the request."""
        return self._sampling_needs

    @staticmethod
    def weight(rate: int) -> int:
        """The event's weight: how many calls a kept event stands for (floored, as in the
        reference; 1 for rate 0)."""
        return 1 if rate <= 0 else FULL_RATE // rate

    @staticmethod
    def keep(rate: int, draw: float) -> bool:
        """Whether to keep a call sampled at `rate`, given a uniform `draw` in [0, 1)."""
        return draw * FULL_RATE < rate

    # Governance

    def governs(self) -> bool:
        """Whether any rule can ever apply. False: the middleware can skip governance."""
        return self._governs

    def needs_response(self) -> bool:
        """Whether some rule looks at `response.status`, so that `govern` must also be asked
        after the view."""
        return self._needs_response

    def governance_needs(self) -> frozenset[str]:
        """The RequestFacts fields `govern` can read (e.g. parse the request body for
        governance only when "body" is here)."""
        return self._governance_needs

    def govern(self, facts: RequestFacts, *, after_view: bool) -> Ruling | None:
        """The rules' decision for a request: before the view (`after_view=False`) from the
        rules that do not look at the response, after it from the others. None when no rule
        applies."""
        if not self._governs_phase[after_view]:
            return None
        matched: list[tuple[_Rule, object]] = []
        for rule in self._regex_rules[after_view]:
            if rule.matches(facts):
                matched.append((rule, None))
        self._companies.collect(facts.company_id, facts, after_view, matched)
        self._users.collect(facts.user_id, facts, after_view, matched)
        return _combine(matched) if matched else None


class _Unusable(ValueError):
    """A part of the config or rules that cannot be evaluated; the message says why."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """A usable governance rule, compiled."""

    rule_id: str
    kind: str  # "regex", "company" or "user"
    block: bool
    status: int
    not_matching: bool  # applied_to "not_matching"
    unidentified: bool  # applied_to_unidentified
    groups: tuple[Conditions, ...]  # OR-ed; empty: every request
    after_view: bool  # some condition reads response.status
    headers: tuple[tuple[str, str], ...]  # (name, value or merge-tag template)
    body: Any  # the body template; None: no body
    encoded_body: bytes  # the body when it has no merge tags
    has_merge_tags: bool

    def matches(self, facts: RequestFacts) -> bool:
        if not self.groups:
            return True
        # A loop, not any(<generator>): that costs 3 times as much on this per-request path.
        for conditions in self.groups:  # noqa: SIM110
            if _all_hold(conditions, facts):
                return True
        return False

    def headers_with(self, values: object) -> tuple[tuple[str, str], ...]:
        """The rule's headers, merge tags filled from `values` (a config entry's values)."""
        if not self.has_merge_tags:
            return self.headers
        return tuple((name, _safe_header_value(_fill_text(template, values)))
                     for name, template in self.headers)

    def body_with(self, values: object) -> bytes:
        """The rule's body as JSON, merge tags filled from `values`."""
        if not self.has_merge_tags or self.body is None:
            return self.encoded_body
        return json.dumps(_fill_tree(self.body, values)).encode()


class _EntityRules:
    """The user (or company) rules, and the config entries that say whom they target."""

    __slots__ = ("by_id", "entries", "not_matching", "unidentified")

    def __init__(self, rules: list[_Rule], entries: dict[str, Any]) -> None:
        self.by_id = {rule.rule_id: rule for rule in rules}
        self.entries = entries  # {entity id: [{"rules": rule id, "values": {...}}, ...]}
        self.not_matching = _by_phase([rule for rule in rules if rule.not_matching])
        self.unidentified = _by_phase([rule for rule in rules if rule.unidentified])

    def reachable(self) -> bool:
        """Whether some request can get one of these rules."""
        return bool(self.by_id) and bool(self.entries or any(self.not_matching)
                                         or any(self.unidentified))

    def collect(self, entity_id: object, facts: RequestFacts, after_view: bool,
                matched: list[tuple[_Rule, object]]) -> None:
        """Append the rules of the phase that target the entity and whose conditions hold,
        each with the merge-tag values of its config entry."""
        if not self.by_id:
            return
        key = _entity_key(entity_id)
        if key is None:
            if self.unidentified[after_view]:
                matched.extend((rule, None) for rule in self.unidentified[after_view]
                               if rule.matches(facts))
            return
        entries = self.entries.get(key)
        listed: set[str] = set()
        if type(entries) is list:
            for entry in entries:
                rule_id = entry.get("rules") if type(entry) is dict else None
                if type(rule_id) is not str:
                    continue
                listed.add(rule_id)
                rule = self.by_id.get(rule_id)
                if (rule is not None and not rule.not_matching
                        and rule.after_view == after_view and rule.matches(facts)):
                    matched.append((rule, entry.get("values")))
        if self.not_matching[after_view]:
            matched.extend((rule, None) for rule in self.not_matching[after_view]
                           if rule.rule_id not in listed and rule.matches(facts))


def _combine(matched: list[tuple[_Rule, object]]) -> Ruling | None:
    """Step F of §2.12: the headers of every matched rule (later ones win), the status and body
    of the last blocking one."""
    headers: dict[str, tuple[str, str]] = {}  # lower-case name → (name, value)
    blocking: tuple[_Rule, object] | None = None
    for rule, values in matched:
        for name, value in rule.headers_with(values):
            headers[name.lower()] = (name, value)
        if rule.block:
            blocking = (rule, values)
    if blocking is None:
        return Ruling(dict(headers.values()), None) if headers else None
    rule, values = blocking
    if "content-type" not in headers:
        headers["content-type"] = ("Content-Type", JSON_CONTENT_TYPE)
    return Ruling(dict(headers.values()), Block(rule.rule_id, rule.status, rule.body_with(values)))


def _all_hold(conditions: Conditions, facts: RequestFacts) -> bool:
    for _, read, test in conditions:
        text = read(facts)
        if text is None or not test(text):
            return False
    return True


def _entity_key(entity_id: object) -> str | None:
    """The config key of a user or company id; None when the request is not identified."""
    if entity_id is None or entity_id == "":
        return None
    return entity_id if type(entity_id) is str else str(entity_id)


def _by_phase(rules: list[_Rule]) -> tuple[tuple[_Rule, ...], tuple[_Rule, ...]]:
    """(the rules decided before the view, the rules decided after it): indexed by after_view."""
    return (tuple(rule for rule in rules if not rule.after_view),
            tuple(rule for rule in rules if rule.after_view))


# Compiling

def _compile_rule(raw: object, notes: list[str]) -> _Rule:
    """A governance rule; raises _Unusable when it cannot be evaluated, and adds to `notes`
    what it leaves out of a rule it can use."""
    if type(raw) is not dict:
        raise _Unusable("not an object")
    rule_id = raw.get("_id")
    if type(rule_id) is not str or not rule_id:
        raise _Unusable("_id is not a non-empty string")
    kind = raw.get("type")
    if kind not in _RULE_TYPES:
        raise _Unusable(f"type {reprlib.repr(kind)} is not one of {', '.join(_RULE_TYPES)}")
    block = _flag(raw, "block")
    not_matching = unidentified = False
    if kind != "regex":
        applied_to = raw.get("applied_to")
        if applied_to not in (None, "matching", "not_matching"):
            raise _Unusable(f"applied_to {reprlib.repr(applied_to)} is not matching or "
                            "not_matching")
        not_matching = applied_to == "not_matching"
        unidentified = _flag(raw, "applied_to_unidentified")
    groups = _compile_groups(raw.get("regex_config"), notes)
    if kind == "regex" and not groups:
        raise _Unusable("a regex rule without conditions")
    response = raw.get("response")
    if type(response) is not dict:
        raise _Unusable("response is not an object")
    status = response.get("status")
    if type(status) is not int or not 100 <= status <= 599:
        raise _Unusable("response.status is not an int in 100..599")
    headers = _compile_headers(response.get("headers"), notes)
    body = response.get("body")
    if _nested_too_deep(body):
        raise _Unusable(f"response.body nests more than {MAX_BODY_DEPTH} levels")
    try:
        encoded_body = b"" if body is None else json.dumps(body).encode()
    except (TypeError, ValueError) as error:
        raise _Unusable(f"response.body cannot be encoded as JSON ({error})") from None
    has_merge_tags = (any(_MERGE_TAG.search(value) for _, value in headers)
                      or _has_merge_tag(body))
    after_view = any(field == "status" for conditions in groups for field, _, _ in conditions)
    return _Rule(rule_id, kind, block, status, not_matching, unidentified, groups, after_view,
                 headers, body, encoded_body, has_merge_tags)


def _compile_groups(raw: object, notes: list[str]) -> tuple[Conditions, ...]:
    """A governance `regex_config`: OR-ed groups of anchored conditions."""
    if raw is None:
        return ()
    if type(raw) is not list:
        raise _Unusable("regex_config is not a list")
    groups = []
    never_matching = 0
    for group in raw:
        if type(group) is not dict:
            raise _Unusable("a regex_config group is not an object")
        conditions = _compile_conditions(group.get("conditions"), anchored=True)
        if conditions is None:
            never_matching += 1
        elif conditions:
            groups.append(conditions)
    if never_matching:
        if not groups:
            raise _Unusable("every condition group reads an unknown path, so it never matches")
        notes.append(f"{never_matching} condition groups read an unknown path and never match")
    return tuple(groups)


def _compile_conditions(raw: object, *, anchored: bool) -> Conditions | None:
    """AND-ed conditions; None when one of them reads an unknown path (they never all hold)."""
    if type(raw) is not list:
        raise _Unusable("conditions is not a list")
    conditions = []
    reads_unknown_path = False
    for condition in raw:
        if type(condition) is not dict:
            raise _Unusable("a condition is not an object")
        path, value = condition.get("path"), condition.get("value")
        if type(path) is not str:
            raise _Unusable("a condition's path is not a string")
        if type(value) is int:
            value = str(value)
        elif type(value) is not str:
            raise _Unusable(f"the value of condition {reprlib.repr(path)} is not a string")
        try:
            pattern = re.compile(value)
        except (re.error, RecursionError, OverflowError) as error:
            raise _Unusable(f"the regex of condition {reprlib.repr(path)} does not compile "
                            f"({error})") from None
        reader = _reader(path)
        if reader is None:
            reads_unknown_path = True
            continue
        test = pattern.fullmatch if anchored else _non_empty_search(pattern)
        conditions.append((*reader, test))
    return None if reads_unknown_path else tuple(conditions)


def _compile_sampling_rules(raw: object, problems: list[str]) -> tuple[tuple[Conditions, int], ...]:
    """Config `regex_config`: [{"conditions": [...], "sample_rate": int}], first match wins."""
    compiled = []
    for index, rule in enumerate(_as_list(raw, "config.regex_config", problems)):
        try:
            if type(rule) is not dict:
                raise _Unusable("not an object")
            rate = _rate(rule.get("sample_rate"))
            conditions = _compile_conditions(rule.get("conditions"), anchored=False)
            if conditions is None:
                raise _Unusable("a condition reads an unknown path, so the rule never matches")
            if not conditions:
                raise _Unusable("no conditions")
        except _Unusable as error:
            problems.append(f"config.regex_config[{index}]: {error}; rule ignored")
            continue
        compiled.append((conditions, rate))
    return tuple(compiled)


def _compile_rates(raw: object, key: str, problems: list[str]) -> dict[str, int]:
    """A {id: rate} map, without the entries whose rate is not an int in 0..100."""
    rates: dict[str, int] = {}
    refused: list[str] = []
    for entity_id, rate in _as_object(raw, f"config.{key}", problems).items():
        if type(rate) is int and 0 <= rate <= FULL_RATE:
            rates[entity_id] = rate
        else:
            refused.append(entity_id)
    if refused:
        problems.append(f"config.{key}: {len(refused)} entries whose rate is not an int in "
                        f"0..100 ignored (e.g. {reprlib.repr(refused[0])})")
    return rates


def _compile_headers(raw: object, notes: list[str]) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if type(raw) is not dict:
        raise _Unusable("response.headers is not an object")
    headers = []
    for name, value in raw.items():
        text = _scalar_text(value)
        if type(name) is not str or not _HEADER_NAME.fullmatch(name):
            notes.append(f"header name {reprlib.repr(name)} is not an HTTP token; header ignored")
        elif name.lower() in _FORBIDDEN_HEADERS:
            notes.append(f"a rule cannot set {name}; header ignored")
        elif text is None:
            notes.append(f"the value of header {name} is not a string, number or boolean; "
                         "header ignored")
        else:
            headers.append((name, _safe_header_value(text)))
    return tuple(headers)


def _reader(path: str) -> tuple[str, FactReader] | None:
    """The RequestFacts field a condition path reads, and how; None for an unknown path."""
    if path in _FIELD_READERS:
        return _FIELD_READERS[path]
    if path.startswith(_HEADERS_PREFIX) and len(path) > len(_HEADERS_PREFIX):
        return "headers", _header_reader(path[len(_HEADERS_PREFIX):].lower())
    if path.startswith(_BODY_PREFIX):
        keys = tuple(path[len(_BODY_PREFIX):].split("."))
        if all(keys):
            return "body", _body_reader(keys)
    return None


def _read_status(facts: RequestFacts) -> str | None:
    return None if facts.status is None else str(facts.status)


def _header_reader(name: str) -> FactReader:
    def read_header(facts: RequestFacts) -> str | None:
        value = facts.headers.get(name)
        return value if type(value) is str else None

    return read_header


def _body_reader(keys: tuple[str, ...]) -> FactReader:
    def read_body_field(facts: RequestFacts) -> str | None:
        value = facts.body
        for key in keys:
            if type(value) is not dict:
                return None
            value = value.get(key)
        return _scalar_text(value)

    return read_body_field


_HEADERS_PREFIX = "request.headers."
_BODY_PREFIX = "request.body."
_FIELD_READERS: dict[str, tuple[str, FactReader]] = {
    "request.verb": ("verb", attrgetter("verb")),
    "request.route": ("route", attrgetter("route")),
    "request.ip_address": ("ip_address", attrgetter("ip_address")),
    "response.status": ("status", _read_status),
}


def _non_empty_search(pattern: re.Pattern[str]) -> RegexTest:
    """The sampling test: the regex finds a non-empty text (the reference's rule)."""
    search = pattern.search

    def finds_text(text: str) -> bool:
        found = search(text)
        return found is not None and found.end() > found.start()

    return finds_text


def _rate(raw: object) -> int:
    if type(raw) is not int or not 0 <= raw <= FULL_RATE:
        raise _Unusable(f"sample_rate {reprlib.repr(raw)} is not an int in 0..100")
    return raw


def _flag(rule: dict[str, Any], key: str) -> bool:
    value = rule.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise _Unusable(f"{key} is not a boolean")
    return value


def _as_object(raw: object, where: str, problems: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if type(raw) is not dict:
        problems.append(f"{where} is not a JSON object; ignored")
        return {}
    return raw


def _as_list(raw: object, where: str, problems: list[str]) -> list[Any]:
    if raw is None:
        return []
    if type(raw) is not list:
        problems.append(f"{where} is not a JSON array; ignored")
        return []
    return raw


def _id_note(raw_rule: object) -> str:
    rule_id = raw_rule.get("_id") if type(raw_rule) is dict else None
    return f" (_id {reprlib.repr(rule_id)})" if type(rule_id) is str else ""


def _nested_too_deep(value: object) -> bool:
    """Whether a JSON value nests more than MAX_BODY_DEPTH arrays/objects deep."""
    level = [value]
    for _ in range(MAX_BODY_DEPTH):
        level = [child for item in level if type(item) in (dict, list)
                 for child in (item.values() if type(item) is dict else item)]
        if not level:
            return False
    return any(type(item) in (dict, list) for item in level)


# Merge tags and header values

def _has_merge_tag(value: object) -> bool:
    if type(value) is str:
        return _MERGE_TAG.search(value) is not None
    if type(value) is dict:
        return any(_has_merge_tag(item) for item in value.values())
    if type(value) is list:
        return any(_has_merge_tag(item) for item in value)
    return False


def _fill_tree(value: object, values: object) -> object:
    """A JSON value with the merge tags of all its strings filled."""
    if type(value) is str:
        return _fill_text(value, values)
    if type(value) is dict:
        return {key: _fill_tree(item, values) for key, item in value.items()}
    if type(value) is list:
        return [_fill_tree(item, values) for item in value]
    return value


def _fill_text(template: str, values: object) -> str:
    """A string with its merge tags replaced: the value named in `values` (a config entry's
    values), else the tag's default, else MISSING_TAG_VALUE."""
    if "{{" not in template:
        return template
    known = values if type(values) is dict else {}

    def value_of(tag: re.Match[str]) -> str:
        text = _scalar_text(known.get(tag.group(1)))
        if text is not None:
            return text
        default = tag.group(2)
        return MISSING_TAG_VALUE if default is None else default

    return _MERGE_TAG.sub(value_of, template)


def _scalar_text(value: object) -> str | None:
    """A string, number or boolean as text (booleans as in JSON); None for anything else."""
    if type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) in (int, float):
        return str(value)
    return None


def _safe_header_value(text: str) -> str:
    return _HEADER_VALUE_CONTROL.sub(" ", text)


Policy.DEFAULT = Policy.compile(None, None)
