"""MoesifMiddlewarePre19: the old-style (process_request / process_response) middleware.

For projects that still list moesifdjango's `MoesifMiddlewarePre19`: it captures exactly what
`MoesifMiddleware` captures, through Django's MiddlewareMixin, on every Django version this
package supports (4.2 and later; MIDDLEWARE_CLASSES itself is gone since Django 2.0). Unlike the
reference, it keeps per-request state on the request, not on the shared instance, so concurrent
requests never swap transaction ids (W14), and it honours LOG_BODY.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

from .middleware import MoesifMiddleware

STARTED_ATTRIBUTE = "_moesif_fast_started"


class MoesifMiddlewarePre19(MiddlewareMixin):
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        super().__init__(get_response)
        self._capture = MoesifMiddleware(get_response)

    def process_request(self, request: HttpRequest) -> None:
        if self._capture.options is not None:
            setattr(request, STARTED_ATTRIBUTE, self._capture.start(request))

    def process_response(self, request: HttpRequest,
                         response: HttpResponseBase) -> HttpResponseBase:
        started = getattr(request, STARTED_ATTRIBUTE, None)
        if started is not None:
            self._capture.finish(request, response, started)
        return response
