"""Views of the example API: JSON in and out, text, streaming, chosen statuses, a database."""

import time

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

ITEMS = [{"id": number, "name": f"item {number}", "price": number * 1.5} for number in range(8)]


def items(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"items": ITEMS, "query": request.GET.dict()})


@csrf_exempt
def echo(request: HttpRequest) -> HttpResponse:
    """Answers with the request body, and the request's X-Test-Id header if any."""
    response = HttpResponse(request.body, status=201,
                            content_type=request.content_type or "application/octet-stream")
    response["X-Echo-Id"] = request.headers.get("X-Test-Id", "")
    return response


def text(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello from moesif_fast", content_type="text/plain")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse((f"chunk {number}\n".encode() for number in range(5)),
                                 content_type="text/plain")


def status(request: HttpRequest, code: int) -> JsonResponse:
    return JsonResponse({"status": code}, status=code)


def slow(request: HttpRequest) -> JsonResponse:
    time.sleep(float(request.GET.get("seconds", "0.05")))
    return JsonResponse({"slept": True})


def database(request: HttpRequest) -> JsonResponse:
    """A query through Django's connection (an in-memory SQLite database per connection)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 6 * 7")
        (answer,) = cursor.fetchone()
    return JsonResponse({"answer": answer})
