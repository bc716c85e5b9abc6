"""`python -m moesif_fast prepare`: a gunicorn server's ring, made in a process of its own.

The gunicorn arbiter must not import Django: worker classes that monkey-patch (gevent,
eventlet) patch in each worker after the fork, and objects Django makes when its modules are
imported (the database connection handler among them) would keep the unpatched threading
primitives, so that every request touching the database fails. So the `when_ready` hook runs
this command, which reads MOESIF_MIDDLEWARE from the settings module (without configuring
Django), checks it, creates the ring for the server's workers, and prints one JSON object:

    {"ring": path or null, "deadline": SHUTDOWN_DEADLINE,
     "messages": [["ERROR" | "WARNING", text], ...]}

`ring` is null when nothing can be captured (a bad configuration, an unusable state folder);
the messages say why. The exit code is 0 whenever that object was printed.
"""

from __future__ import annotations

import json

from . import ringfile
from .ringbuffer import RingError
from .settings import MoesifOptions, load, problems


def prepare(settings_module: str, workers: int, server: str) -> dict[str, object]:
    messages: list[list[str]] = []
    result: dict[str, object] = {"ring": None, "deadline": MoesifOptions.SHUTDOWN_DEADLINE,
                                 "messages": messages}
    raw = _moesif_middleware(settings_module, messages)
    if raw is _UNREADABLE:
        return result
    found = problems(raw)
    for problem in found:
        messages.append(["ERROR" if problem.is_serious() else "WARNING",
                         f"{problem.msg} ({problem.id})"])
    if any(problem.is_serious() for problem in found):
        messages.append(["ERROR", "nothing is captured until MOESIF_MIDDLEWARE is fixed"])
        return result
    options = load(raw)
    geometry = ringfile.geometry(options, ringfile.producers_for_workers(workers))
    path = ringfile.ring_path(options, settings_module, geometry, server)
    try:
        ringfile.open_ring(path, geometry).close()
    except (OSError, RingError) as error:
        messages.append(["ERROR", f"cannot create the event ring {path}: {error}"])
        return result
    result.update(ring=path, deadline=options.SHUTDOWN_DEADLINE,
                  size_mib=geometry.file_size >> 20)
    return result


_UNREADABLE = object()


def _moesif_middleware(settings_module: str, messages: list[list[str]]) -> object:
    """MOESIF_MIDDLEWARE of the settings module, read without configuring Django (which would
    also set this process's TZ: harmless here, in a process of its own)."""
    from django.conf import Settings

    try:
        return getattr(Settings(settings_module), "MOESIF_MIDDLEWARE", None)
    except Exception as error:
        messages.append(["ERROR", f"cannot load settings {settings_module}: {error}"])
        return _UNREADABLE


def main(settings_module: str, workers: int, server: str) -> int:
    print(json.dumps(prepare(settings_module, workers, server)), flush=True)
    return 0

