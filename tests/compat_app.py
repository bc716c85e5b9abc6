"""The Django application the acceptance tests (test_compat.py) send requests to: a URLconf
whose views cover every kind of body and response the reference's capture rules distinguish,
and two small middlewares that stand in for an authentication layer.

Why a stand-in for authentication: the demo settings have no database, so Django's own User
model cannot be loaded. `LoginFromHeaderMiddleware` sets `request.user` to a plain object with
the attributes the middleware may read (is_authenticated, get_username, username), which is all
moesifdjango ever looks at; Django's AuthenticationMiddleware is still used where a test needs
the real AnonymousUser (it needs no database for an anonymous request).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

LOGIN_HEADER = "X-Test-Login"  # the user name LoginFromHeaderMiddleware logs in
LOGIN_WITHOUT_GET_USERNAME_HEADER = "X-Test-Login-Username-Only"
STREAM_CHUNKS = (b"chunk-one ", b"chunk-two")
FILE_PATH = Path(__file__)  # FileResponse serves this module's own source
JSON_OBJECT = {"ok": True, "password": "p", "nested": {"secret": 1, "keep": 2}}
JSON_ARRAY = [1, {"password": "p", "keep": 2}, "three"]
TEXT = "hello world"
BINARY = bytes(range(256))
GZIPPED_JSON = b'{"zipped": true}'


@dataclass(frozen=True)
class LoggedInUser:
    """An authenticated user as an auth backend would give it."""

    name: str
    is_authenticated: bool = True

    def get_username(self) -> str:
        return self.name


@dataclass(frozen=True)
class UsernameOnlyUser:
    """A custom user object with only a `username` attribute, which moesifdjango reads."""

    username: str
    is_authenticated: bool = True


class LoginFromHeaderMiddleware:
    """Sets request.user from the test's login headers, when one is sent."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        name = request.headers.get(LOGIN_HEADER)
        if name:
            request.user = LoggedInUser(name)
        username_only = request.headers.get(LOGIN_WITHOUT_GET_USERNAME_HEADER)
        if username_only:
            request.user = UsernameOnlyUser(username_only)
        return self.get_response(request)


class OuterHeaderMiddleware:
    """Listed before (outside) Moesif: adds a header Moesif must not see."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        response["X-Added-Outside"] = "outer"
        return response


class AnnotateMetaMiddleware:
    """Listed before Moesif: writes non-string values into request.META, as some tenant or
    proxy middlewares do (the reference flattens them: None → "", others → JSON)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        request.META["HTTP_X_TENANT_ID"] = 42
        request.META["HTTP_X_EMPTY"] = None
        return self.get_response(request)


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    """The request body back, with the request's content type and the status asked for."""
    return HttpResponse(request.body, status=int(request.GET.get("status", 200)),
                        content_type=request.content_type or "application/octet-stream")


@csrf_exempt
def describe(request: HttpRequest) -> HttpResponse:
    """What the view saw: every HTTP header and a digest of the body (for the property tests,
    which compare the answer with and without the middleware)."""
    seen = {
        "method": request.method,
        "path": request.get_full_path(),
        "headers": sorted((key, value) for key, value in request.META.items()
                          if key.startswith("HTTP_") or key.startswith("CONTENT_")),
        "body_sha256": hashlib.sha256(request.body).hexdigest(),
        "body_length": len(request.body),
    }
    response = JsonResponse(seen, status=int(request.GET.get("status", 200)))
    response["X-Body-Length"] = str(len(request.body))
    return response


@csrf_exempt
def upload_size(request: HttpRequest) -> HttpResponse:
    """Reads the upload itself, in chunks, and answers its size."""
    size = 0
    while chunk := request.read(4096):
        size += len(chunk)
    return HttpResponse(str(size), content_type="text/plain")


def json_object(request: HttpRequest) -> HttpResponse:
    return JsonResponse(JSON_OBJECT)


def json_array(request: HttpRequest) -> HttpResponse:
    return JsonResponse(JSON_ARRAY, safe=False)


def text(request: HttpRequest) -> HttpResponse:
    return HttpResponse(TEXT, content_type="text/plain")


def json_after_whitespace(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b' {"a": 1}', content_type="application/json")


def binary(request: HttpRequest) -> HttpResponse:
    return HttpResponse(BINARY, content_type="application/octet-stream")


def gzipped(request: HttpRequest) -> HttpResponse:
    # mtime=0: responses compared byte for byte must not differ by the second they were made
    response = HttpResponse(gzip.compress(GZIPPED_JSON, mtime=0),
                            content_type="application/json")
    response["Content-Encoding"] = "gzip"
    return response


def empty(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=204)


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter(STREAM_CHUNKS), content_type="text/plain")


def file(request: HttpRequest) -> FileResponse:
    return FileResponse(FILE_PATH.open("rb"), content_type="text/x-python")


def large(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"L" * int(request.GET["size"]), content_type="text/plain")


def status(request: HttpRequest, code: int) -> HttpResponse:
    return JsonResponse({"status": code}, status=code)


def crash(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view failed")


def with_cookie(request: HttpRequest) -> HttpResponse:
    response = HttpResponse("cookie set", content_type="text/plain")
    response.set_cookie("flavour", "oatmeal")
    response["X-Custom"] = "custom-value"
    response["X-Secret-Header"] = "response-secret"
    return response


def host(request: HttpRequest) -> HttpResponse:
    """Validates the host itself (raises DisallowedHost for one not in ALLOWED_HOSTS)."""
    return HttpResponse(request.get_host(), content_type="text/plain")


def session_save(request: HttpRequest) -> HttpResponse:
    """Starts a session and saves it in the view, so that its key exists during capture."""
    request.session["seen"] = True
    request.session.save()
    return HttpResponse(request.session.session_key, content_type="text/plain")


async def async_json(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"async": True, "body": json.loads(request.body or b"null")})


urlpatterns = [
    path("echo", echo),
    path("describe", describe),
    path("upload", upload_size),
    path("json-object", json_object),
    path("json-array", json_array),
    path("text", text),
    path("json-after-whitespace", json_after_whitespace),
    path("binary", binary),
    path("gzipped", gzipped),
    path("empty", empty),
    path("stream", stream),
    path("file", file),
    path("large", large),
    path("status/<int:code>", status),
    path("crash", crash),
    path("cookie", with_cookie),
    path("host", host),
    path("session", session_save),
    path("async", async_json),
]
