"""The worker's shortcuts against the behaviour they stand for.

Capture would evaluate `request.user` on every request (the reference does), which makes
Django's session authentication load the session and build an AnonymousUser even when the
client sent no session cookie. The middleware skips that work when it can tell the result for
certain (`_session_user_is_anonymous`). Every test here sends the same request through the
same middleware stack twice, with the shortcut and with it disabled, and asserts the same
captured call (all but times and the transaction id), the same response (status, body, every
header: `Vary: Cookie` included, which SessionMiddleware adds because the user was looked at),
the same session state and the same `request.user` for whatever runs after capture; and
whether the shortcut was taken: only it leaves the lazy user unevaluated with the session marked
accessed. The shortcut runs in the compiled Capturer when it is built (the pure-Python run of
this suite checks the Python one); disabling it disables both.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "moesif_fast.demo.settings")

import django  # noqa: E402

django.setup()

import pytest  # noqa: E402
from django.contrib import auth  # noqa: E402
from django.contrib.auth.middleware import AuthenticationMiddleware  # noqa: E402
from django.contrib.sessions.backends.cache import SessionStore as CacheSession  # noqa: E402
from django.contrib.sessions.middleware import SessionMiddleware  # noqa: E402
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse  # noqa: E402
from django.test import RequestFactory, override_settings  # noqa: E402
from django.utils.functional import SimpleLazyObject, empty  # noqa: E402
from records import captured  # noqa: E402

from moesif_fast import middleware  # noqa: E402
from moesif_fast.middleware import MoesifMiddleware  # noqa: E402
from moesif_fast.record import CapturedCall  # noqa: E402
from moesif_fast.ringbuffer import Reader  # noqa: E402

OPTIONS = {"APPLICATION_ID": "app-id", "BASE_URI": "http://127.0.0.1:9"}
SIGNED = "django.contrib.sessions.backends.signed_cookies"
CACHED = "django.contrib.sessions.backends.cache"
BACKEND = f"{__name__}.NamedUserBackend"
JWT_AUTHORIZATION = "Bearer e30.eyJzdWIiOiAiand0LXVzZXIifQ.c2ln"  # sub: jwt-user


@dataclass(frozen=True)
class NamedUser:
    """A user as a custom authentication backend returns it (no database)."""

    pk: int
    name: str
    is_authenticated: bool = True
    is_active: bool = True

    def get_username(self) -> str:
        return self.name


class NamedUserBackend:
    """An authentication backend whose users need no database: user 7 is "alice"."""

    def get_user(self, user_id: Any) -> NamedUser | None:
        return NamedUser(7, "alice") if str(user_id) == "7" else None


class LazyHeaderUserMiddleware:
    """A custom authentication middleware after Django's: a lazy user of its own."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        name = request.headers.get("X-User")
        if name:
            request.user = SimpleLazyObject(lambda: NamedUser(1, name))
        return self.get_response(request)


class PlainHeaderUserMiddleware(LazyHeaderUserMiddleware):
    """The same, setting a plain user object."""

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        name = request.headers.get("X-User")
        if name:
            request.user = NamedUser(1, name)
        return self.get_response(request)


class ExtraKeySession(CacheSession):
    """A session class that reads its data differently from SessionBase."""

    def __getitem__(self, key: str) -> Any:
        return {auth.SESSION_KEY: "7", auth.BACKEND_SESSION_KEY: BACKEND}[key]


class ExtraKeySessionMiddleware(SessionMiddleware):
    def process_request(self, request: HttpRequest) -> None:
        request.session = ExtraKeySession(None)


# --- views -----------------------------------------------------------------------------------


def plain_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"echo": json.loads(request.body or b"null")})


def user_view(request: HttpRequest) -> HttpResponse:
    """Evaluates request.user, as a view that checks permissions does."""
    return JsonResponse({"authenticated": request.user.is_authenticated})


def session_reading_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"visits": request.session.get("visits", 0)})


def session_writing_view(request: HttpRequest) -> HttpResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"visits": request.session["visits"]})


def login_view(request: HttpRequest) -> HttpResponse:
    """What auth.login does, for a user without a model (login needs one)."""
    request.session.cycle_key()
    request.session.update(LOGGED_IN)
    request.user = NamedUser(7, "alice")
    return JsonResponse({"logged_in": True})


def session_with_user_id_view(request: HttpRequest) -> HttpResponse:
    """Puts a user id in the session without logging in (request.user stays lazy)."""
    request.session[auth.SESSION_KEY] = "7"
    request.session[auth.BACKEND_SESSION_KEY] = BACKEND
    return JsonResponse({})


# --- the differential harness ----------------------------------------------------------------


@dataclass
class Outcome:
    call: CapturedCall  # without its times and transaction id
    status: int
    content: bytes
    headers: list[tuple[str, str]]  # as sent, Set-Cookie values and the transaction id out
    cookies: dict[str, tuple[str, ...]]  # name: the cookie's attributes (not its value)
    session_accessed: bool | None
    user_after: tuple[str, bool, str]  # request.user evaluated after the response
    shortcut_taken: bool


def run(ring: Reader, view: Callable[[HttpRequest], HttpResponse], *, shortcut: bool,
        inner: tuple[type, ...] = (), session_middleware: type = SessionMiddleware,
        auth_middleware: bool = True, cookie: str = "", options: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None) -> Outcome:
    """One POST through Session → Authentication → `inner` → Moesif → view."""
    disabled = () if shortcut else (  # in Python and in the compiled Capturer
        mock.patch.object(middleware, "_session_user_is_anonymous", lambda request: False),
        mock.patch.object(middleware, "_recordpack", None))
    with override_settings(MOESIF_MIDDLEWARE={**OPTIONS, **(options or {})}), \
            contextlib.ExitStack() as patches:
        for patch in disabled:
            patches.enter_context(patch)
        handler: Callable[[HttpRequest], HttpResponseBase] = MoesifMiddleware(view)
        for layer in reversed(inner):
            handler = layer(handler)
        if auth_middleware:
            handler = AuthenticationMiddleware(handler)
        handler = session_middleware(handler)
        extra = {f"HTTP_{name.upper().replace('-', '_')}": value
                 for name, value in (headers or {}).items()}
        if cookie:
            extra["HTTP_COOKIE"] = cookie
        request = RequestFactory().post("/api/call?q=1", b'{"a": 1}',
                                        content_type="application/json", **extra)
        response = handler(request)
        session = getattr(request, "session", None)
        accessed = session.accessed if session is not None else None
        lazy = request.__dict__.get("user")  # the shortcut's mark: looked at, not evaluated
        taken = accessed is True and type(lazy) is SimpleLazyObject \
            and object.__getattribute__(lazy, "__dict__")["_wrapped"] is empty
        user = getattr(request, "user", None)
        authenticated = bool(user) and user.is_authenticated  # evaluates a lazy user
        real = user._wrapped if isinstance(user, SimpleLazyObject) else user
        user_after = (type(real).__name__, authenticated,
                      real.get_username() if hasattr(real, "get_username") else "")
    [call] = captured(ring)
    transaction_id = response["x-moesif-transaction-id"]
    assert call.transaction_id == transaction_id
    return Outcome(
        call=call._replace(request_time_ns=0, response_time_ns=0, transaction_id=None,
                           response_headers=tuple(pair for pair in call.response_headers
                                                  if pair[0] != "x-moesif-transaction-id")),
        status=response.status_code,
        content=response.content,
        headers=[(name, value) for name, value in response.items()
                 if name.lower() not in ("set-cookie", "x-moesif-transaction-id")],
        cookies={name: tuple(sorted((key, str(value)) for key, value in morsel.items()
                                    if key != "expires"))
                 for name, morsel in response.cookies.items()},
        session_accessed=accessed,
        user_after=user_after,
        shortcut_taken=taken,
    )


def same_either_way(ring: Reader, view: Callable[[HttpRequest], HttpResponse],
                    **arguments: Any) -> Outcome:
    """The outcome with the shortcut, asserted equal to the outcome without it (but for
    whether it was taken)."""
    fast = run(ring, view, shortcut=True, **arguments)
    slow = run(ring, view, shortcut=False, **arguments)
    assert not slow.shortcut_taken
    fast_fields = {**fast.__dict__, "shortcut_taken": None}
    slow_fields = {**slow.__dict__, "shortcut_taken": None}
    assert fast_fields == slow_fields
    return fast


@pytest.fixture(autouse=True)
def sessions_without_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Signed-cookie sessions and a backend without a database; Django's functions looked up
    again by the middleware in each test (a test patches one)."""
    monkeypatch.setattr(middleware, "_session_auth", None)
    monkeypatch.setattr(middleware, "_session_auth_resolved", False)
    with override_settings(SESSION_ENGINE=SIGNED, AUTHENTICATION_BACKENDS=[BACKEND]):
        yield


def signed_session_cookie(data: dict[str, Any]) -> str:
    from django.contrib.sessions.backends.signed_cookies import SessionStore
    store = SessionStore()
    store.update(data)
    store.save()
    return f"sessionid={store.session_key}"


LOGGED_IN = {auth.SESSION_KEY: "7", auth.BACKEND_SESSION_KEY: BACKEND}


# --- the shortcut is taken ------------------------------------------------------------------


def test_no_session_cookie_takes_the_shortcut(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view)
    assert outcome.shortcut_taken
    assert outcome.call.user_id is None  # none from request.user
    assert ("Vary", "Cookie") in outcome.headers  # as when capture evaluates request.user
    assert outcome.session_accessed is True
    assert outcome.user_after == ("AnonymousUser", False, "")


def test_no_session_cookie_with_a_bearer_token_the_shipper_reads(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, headers={"Authorization": JWT_AUTHORIZATION})
    assert outcome.shortcut_taken and outcome.call.user_id is None  # the shipper reads the JWT


def test_the_view_read_the_session_of_a_request_without_cookie(ring: Reader) -> None:
    outcome = same_either_way(ring, session_reading_view)
    assert outcome.shortcut_taken


@pytest.mark.parametrize("engine", [SIGNED, CACHED])
def test_the_view_wrote_the_session_without_logging_in(ring: Reader, engine: str) -> None:
    with override_settings(SESSION_ENGINE=engine):
        outcome = same_either_way(ring, session_writing_view)
    assert outcome.shortcut_taken
    assert "sessionid" in outcome.cookies  # the new session is saved either way


def test_identify_user_returning_nothing_then_the_shortcut(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view,
                              options={"IDENTIFY_USER": lambda request, response: None})
    assert outcome.shortcut_taken


# --- the shortcut is not taken --------------------------------------------------------------


def test_a_session_cookie_of_a_logged_in_user(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, cookie=signed_session_cookie(LOGGED_IN))
    assert not outcome.shortcut_taken
    assert outcome.call.user_id == "alice"


def test_a_session_cookie_without_a_user(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, cookie=signed_session_cookie({"visits": 3}))
    assert not outcome.shortcut_taken  # a key to load: decided by loading it
    assert outcome.call.user_id is None


def test_an_invalid_session_cookie(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, cookie="sessionid=not-a-signed-value")
    assert not outcome.shortcut_taken and outcome.call.user_id is None


def test_the_view_evaluated_request_user(ring: Reader) -> None:
    outcome = same_either_way(ring, user_view)
    assert not outcome.shortcut_taken and outcome.call.user_id is None


def test_the_view_evaluated_request_user_of_a_logged_in_session(ring: Reader) -> None:
    outcome = same_either_way(ring, user_view, cookie=signed_session_cookie(LOGGED_IN))
    assert not outcome.shortcut_taken and outcome.call.user_id == "alice"


def test_the_view_logged_a_user_in(ring: Reader) -> None:
    outcome = same_either_way(ring, login_view)
    assert not outcome.shortcut_taken and outcome.call.user_id == "alice"


def test_the_view_put_a_user_id_in_the_session(ring: Reader) -> None:
    outcome = same_either_way(ring, session_with_user_id_view)
    assert not outcome.shortcut_taken and outcome.call.user_id == "alice"


@pytest.mark.parametrize("custom", [LazyHeaderUserMiddleware, PlainHeaderUserMiddleware])
def test_a_custom_authentication_middleware_sets_request_user(ring: Reader,
                                                               custom: type) -> None:
    outcome = same_either_way(ring, plain_view, inner=(custom,), headers={"X-User": "bob"})
    assert not outcome.shortcut_taken and outcome.call.user_id == "bob"


def test_a_custom_authentication_middleware_that_leaves_django_s_user(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, inner=(LazyHeaderUserMiddleware,))
    assert outcome.shortcut_taken and outcome.call.user_id is None


def test_no_authentication_middleware(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, auth_middleware=False)
    assert not outcome.shortcut_taken and outcome.call.user_id is None


def test_a_session_class_that_reads_its_data_otherwise(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view, session_middleware=ExtraKeySessionMiddleware)
    assert not outcome.shortcut_taken and outcome.call.user_id == "alice"


def test_a_patched_get_user(ring: Reader) -> None:
    with mock.patch("django.contrib.auth.get_user", lambda request: NamedUser(2, "mocked")):
        outcome = same_either_way(ring, plain_view)
    assert not outcome.shortcut_taken and outcome.call.user_id == "mocked"


def test_identify_user_first(ring: Reader) -> None:
    outcome = same_either_way(ring, plain_view,
                              options={"IDENTIFY_USER": lambda request, response: "given"})
    assert not outcome.shortcut_taken and outcome.call.user_id == "given"
    assert ("Vary", "Cookie") not in outcome.headers  # request.user is not looked at at all


def test_the_shortcut_is_never_taken_when_django_s_functions_were_replaced_at_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(middleware, "_session_auth", None)
    monkeypatch.setattr(middleware, "_session_auth_resolved", False)
    with mock.patch("django.contrib.auth.middleware.get_user", lambda request: None):
        assert middleware._resolve_session_auth() is None
    assert middleware._session_auth_resolved
    request = RequestFactory().get("/")
    SessionMiddleware(lambda request: HttpResponse()).process_request(request)
    AuthenticationMiddleware(lambda request: HttpResponse()).process_request(request)
    assert not middleware._session_user_is_anonymous(request)
    assert not request.session.accessed
