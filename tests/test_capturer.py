"""The compiled Capturer (`_recordpack.Capturer`) against the middleware's Python path, the
reference: the same request through two middlewares, one with the Capturer and one without
(`_gather` and `_record`), must leave the same record in the ring (all but its times and a
fresh transaction id), the same response headers and the same count of capture errors, for
every combination of options, request, response and user drawn here. The session shortcut's
own cases are in test_worker_cost.py."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

import pytest  # noqa: E402
from django.http import (  # noqa: E402
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.test import RequestFactory, override_settings  # noqa: E402
from django.utils.functional import SimpleLazyObject  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from records import captured  # noqa: E402

from moesif_fast import middleware  # noqa: E402
from moesif_fast.middleware import MoesifMiddleware  # noqa: E402
from moesif_fast.record import CapturedCall  # noqa: E402
from moesif_fast.ringbuffer import Reader  # noqa: E402

pytestmark = pytest.mark.skipif(middleware._recordpack is None,
                                reason="the compiled packer is not built or forced off")

BASE_OPTIONS = {"APPLICATION_ID": "app-id", "BASE_URI": "http://127.0.0.1:9"}
TRANSACTION_HEADER = "x-moesif-transaction-id"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}")


@dataclass(frozen=True)
class User:
    name: str
    is_authenticated: bool = True

    def get_username(self) -> str:
        return self.name


class BrokenUser:
    @property
    def is_authenticated(self) -> bool:
        raise RuntimeError("no database")


class OddSetup:
    """A lazy user's setup function whose attributes raise: the session shortcut's check
    fails, so the user is evaluated (as without the shortcut)."""

    @property
    def __code__(self) -> Any:
        raise RuntimeError("no code")

    def __call__(self) -> User:
        return User("carol")


class Session:
    """What capture reads of a session: its key."""

    def __init__(self, key: str | None) -> None:
        self.session_key = key


class ContentOfItsOwn(HttpResponse):
    """A response class whose `content` is not HttpResponse's."""

    @property
    def content(self) -> bytes:
        return b"own:" + HttpResponse.content.fget(self)

    @content.setter
    def content(self, value: Any) -> None:
        HttpResponse.content.fset(self, value)


class BrokenContent(ContentOfItsOwn):
    @property
    def content(self) -> bytes:
        raise ValueError("unreadable")

    @content.setter
    def content(self, value: Any) -> None:
        HttpResponse.content.fset(self, value)


def two_pieces() -> HttpResponse:
    response = HttpResponse(b"first,")
    response.write(b"second")
    return response


def odd_store() -> HttpResponse:
    response = JsonResponse({"ok": True})
    response.headers._store = type("Store", (dict,), {})(response.headers._store)
    return response


OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no bodies": {"LOG_BODY": False},
    "no transaction ids": {"DISABLE_TRANSACTION_ID": True},
    "small bodies": {"MAX_BODY_SIZE": 8},
    "huge bodies": {"MAX_BODY_SIZE": 2**80},
}
WIRING: dict[str, dict[str, Any]] = {
    "plain": {},
    "behind a proxy": {"SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
                       "USE_X_FORWARDED_HOST": True},
}
REQUESTS: dict[str, Callable[[], HttpRequest]] = {
    "JSON POST": lambda: RequestFactory().post(
        "/api/items?x=1", b'{"a": 1}', content_type="application/json",
        HTTP_AUTHORIZATION="Bearer abc.def.ghi"),
    "GET through a proxy": lambda: RequestFactory().get(
        "/api/items", {"q": "a b"}, HTTP_X_FORWARDED_PROTO="https",
        HTTP_X_FORWARDED_HOST="api.example.com", HTTP_HOST="internal:8000"),
    "HEAD": lambda: RequestFactory().head("/api/items"),
    "a path Django quotes": lambda: RequestFactory().get("/v1/ünï code"),
    "the client's transaction id": lambda: RequestFactory().get(
        "/", HTTP_X_MOESIF_TRANSACTION_ID="client-id-1"),
    "an empty transaction id": lambda: RequestFactory().get(
        "/", HTTP_X_MOESIF_TRANSACTION_ID=""),
    "a transaction id too long": lambda: RequestFactory().get(
        "/", HTTP_X_MOESIF_TRANSACTION_ID="x" * 201),
    "a transaction id at the limit": lambda: RequestFactory().get(
        "/", HTTP_X_MOESIF_TRANSACTION_ID="y" * 200),
    "a transaction id Django refuses": lambda: RequestFactory().get(
        "/", HTTP_X_MOESIF_TRANSACTION_ID="a\nb"),
}
RESPONSES: dict[str, Callable[[], HttpResponseBase]] = {
    "JSON": lambda: JsonResponse({"ok": True, "items": list(range(5))}),
    "empty": lambda: HttpResponse(status=204),
    "two pieces": two_pieces,
    "streaming": lambda: StreamingHttpResponse(iter([b"a", b"b"])),
    "content of its own": lambda: ContentOfItsOwn(b"body"),
    "content that raises": lambda: BrokenContent(b"body"),
    "a header store that is not a dict": odd_store,
}
USERS: dict[str, Callable[[HttpRequest], None]] = {
    "no user, no session": lambda request: None,
    "a user": lambda request: setattr(request, "user", User("alice")),
    "an anonymous user": lambda request: setattr(request, "user", User("", False)),
    "a lazy user": lambda request: setattr(request, "user",
                                           SimpleLazyObject(lambda: User("bob"))),
    "a lazy user whose check raises": lambda request: setattr(request, "user",
                                                              SimpleLazyObject(OddSetup())),
    "a user that raises": lambda request: setattr(request, "user", BrokenUser()),
    "a session": lambda request: setattr(request, "session", Session("s-key")),
    "a session without a key": lambda request: setattr(request, "session", Session(None)),
}


@dataclass
class Seen:
    calls: list[CapturedCall]  # times zeroed, a fresh transaction id as "fresh"
    headers: list[tuple[str, str]]  # the same
    capture_errors: int


def through(ring: Reader, options: dict[str, Any], wiring: dict[str, Any],
            make_request: Callable[[], HttpRequest],
            make_response: Callable[[], HttpResponseBase],
            set_user: Callable[[HttpRequest], None], *, compiled: bool) -> Seen:
    def view(request: HttpRequest) -> HttpResponseBase:
        set_user(request)
        return make_response()

    with override_settings(MOESIF_MIDDLEWARE={**BASE_OPTIONS, **options}, **wiring), \
            mock.patch.object(middleware, "_recordpack",
                              middleware._recordpack if compiled else None):
        capture = MoesifMiddleware(view)
        assert (capture._capturer is not None) is compiled
        response = capture(make_request())
    sent = response.get(TRANSACTION_HEADER)
    fresh = sent is not None and UUID4.fullmatch(sent) is not None

    def normal(value: Any) -> Any:
        return "fresh" if fresh and value == sent else value

    calls = [call._replace(request_time_ns=0, response_time_ns=0,
                           transaction_id=normal(call.transaction_id),
                           response_headers=tuple((name, normal(value))
                                                  for name, value in call.response_headers))
             for call in captured(ring)]
    return Seen(calls, [(name, normal(value)) for name, value in response.items()],
                capture.capture_errors)


def assert_same(ring: Reader, options: str, wiring: str, request: str, response: str,
                user: str) -> Seen:
    arguments = (ring, OPTIONS[options], WIRING[wiring], REQUESTS[request], RESPONSES[response],
                 USERS[user])
    compiled = through(*arguments, compiled=True)
    python = through(*arguments, compiled=False)
    assert compiled == python
    return compiled


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.sampled_from(list(OPTIONS)), wiring=st.sampled_from(list(WIRING)),
       request=st.sampled_from(list(REQUESTS)), response=st.sampled_from(list(RESPONSES)),
       user=st.sampled_from(list(USERS)))
def test_any_combination_is_captured_as_the_python_path_captures_it(
        ring: Reader, options: str, wiring: str, request: str, response: str, user: str) -> None:
    assert_same(ring, options, wiring, request, response, user)


@pytest.mark.parametrize("user", list(USERS))
def test_each_user_gives_the_same_user_id_and_session_token(ring: Reader, user: str) -> None:
    seen = assert_same(ring, "defaults", "plain", "JSON POST", "JSON", user)
    [call] = seen.calls
    expected = {"a user": ("alice", None), "a lazy user": ("bob", None),
                "a lazy user whose check raises": ("carol", None),
                "a session": (None, "s-key")}.get(user, (None, None))
    assert (call.user_id, call.session_token) == expected


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("response", list(RESPONSES))
def test_each_response_and_option(ring: Reader, options: str, response: str) -> None:
    seen = assert_same(ring, options, "plain", "JSON POST", response, "no user, no session")
    if response == "content that raises":
        assert seen.capture_errors == (0 if OPTIONS[options].get("LOG_BODY") is False else 1)
        return
    [call] = seen.calls
    assert seen.capture_errors == 0
    body = {"JSON": b'{"ok": true, "items": [0, 1, 2, 3, 4]}', "empty": None,
            "two pieces": b"first,second", "streaming": None, "content of its own": b"own:body",
            "a header store that is not a dict": b'{"ok": true}'}[response]
    if OPTIONS[options].get("LOG_BODY") is False:
        body = None
    elif body is not None and len(body) > OPTIONS[options].get("MAX_BODY_SIZE", 100_000):
        body = len(body)
    assert call.response_body == body
    sent = dict(seen.headers).get(TRANSACTION_HEADER)
    assert (sent, call.transaction_id) == ((None, None) if options == "no transaction ids"
                                           else ("fresh", "fresh"))


@pytest.mark.parametrize("request_name", [name for name in REQUESTS if "transaction" in name])
def test_each_client_transaction_id(ring: Reader, request_name: str) -> None:
    seen = assert_same(ring, "defaults", "plain", request_name, "JSON", "no user, no session")
    expected = {"the client's transaction id": "client-id-1",
                "a transaction id at the limit": "y" * 200}.get(request_name, "fresh")
    if request_name == "a transaction id Django refuses":
        assert seen.calls == [] and seen.capture_errors == 1
        return
    [call] = seen.calls
    assert call.transaction_id == expected and dict(seen.headers)[TRANSACTION_HEADER] == expected
