"""Gunicorn server hooks: one ring and one supervised shipper per gunicorn server.

Use the repository's `gunicorn_conf.py` (`gunicorn -c /path/to/gunicorn_conf.py mysite.wsgi`),
or import these hooks into your own config::

    from moesif_fast.gunicorn import when_ready, pre_fork, on_exit

- `when_ready` (arbiter, before the first fork): finds the Django settings module (from
  DJANGO_SETTINGS_MODULE, else the default `wsgi.py` sets), reads MOESIF_MIDDLEWARE, creates
  the ring, exports its path in MOESIF_FAST_RING for the workers, and starts the supervisor
  (`python -m moesif_fast supervise`), which keeps one `moesif_fast ship` process running.
- `pre_fork` (arbiter, before each worker fork): starts the supervisor again if it died.
- `on_exit` (arbiter, after the workers stopped): tells the supervisor to finish, waits while
  the shipper delivers what is left (up to SHUTDOWN_DEADLINE), and removes the ring file when
  it is empty.

Workers need no hook: the middleware attaches to the ring on its first event.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import ringfile
from .ringbuffer import RingError, RingFile
from .settings import MoesifOptions, load, problems

SETTINGS_ENV = "DJANGO_SETTINGS_MODULE"
EXIT_GRACE = 10.0  # seconds beyond SHUTDOWN_DEADLINE that on_exit waits for the supervisor


class _State:
    supervisor: subprocess.Popen[bytes] | None = None
    command: list[str] = []
    ring_path: str | None = None
    deadline: float = 0.0


def _never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """A hook that logs its own failure instead of stopping gunicorn: analytics must never
    keep a server from starting, forking workers or shutting down."""

    @functools.wraps(hook)
    def guarded(server: Any, *args: Any) -> None:
        try:
            hook(server, *args)
        except Exception:
            server.log.exception("moesif_fast: the %s hook failed; the server goes on",
                                 hook.__name__)

    return guarded


@_never_raises
def when_ready(server: Any) -> None:
    settings_module = os.environ.get(SETTINGS_ENV) or settings_module_of(
        getattr(server.app, "app_uri", None) or "")
    if not settings_module:
        server.log.error("moesif_fast: cannot tell the Django settings module (set %s); "
                         "events go through the middleware's fallback shipper", SETTINGS_ENV)
        return
    options = _options(server, settings_module)
    if options is None:
        return
    geometry = ringfile.geometry(options, ringfile.producers_for_workers(server.num_workers))
    path = ringfile.ring_path(options, settings_module, geometry)
    try:
        RingFile.open(path, geometry).close()
    except (OSError, RingError) as error:
        server.log.error("moesif_fast: cannot create the event ring %s: %s", path, error)
        return
    os.environ[ringfile.RING_ENV] = path
    _State.ring_path = path
    _State.deadline = options.SHUTDOWN_DEADLINE
    _State.command = [sys.executable, "-m", "moesif_fast", "supervise", "--ring", path,
                      "--settings", settings_module, "--parent", str(os.getpid()),
                      "--deadline", str(options.SHUTDOWN_DEADLINE)]
    _start_supervisor(server)
    server.log.info("moesif_fast: ring %s (%d MiB), shipper supervisor pid %d", path,
                    geometry.file_size >> 20, _State.supervisor.pid)


@_never_raises
def pre_fork(server: Any, worker: Any) -> None:
    if _State.supervisor is not None and not _alive(_State.supervisor.pid):
        server.log.warning("moesif_fast: the shipper supervisor is gone; starting it again")
        _start_supervisor(server)


@_never_raises
def on_exit(server: Any) -> None:
    supervisor = _State.supervisor
    if supervisor is None:
        return
    _State.supervisor = None
    if _alive(supervisor.pid):
        supervisor.send_signal(signal.SIGTERM)
        give_up_at = time.monotonic() + _State.deadline + EXIT_GRACE
        while _alive(supervisor.pid) and time.monotonic() < give_up_at:
            time.sleep(0.05)
    _remove_drained_ring(server)


def settings_module_of(app_uri: str) -> str | None:
    """The settings module the app's WSGI module defaults to, read from its source
    (`os.environ.setdefault("DJANGO_SETTINGS_MODULE", "...")`) without importing it."""
    module = app_uri.split(":", 1)[0]
    try:
        spec = importlib.util.find_spec(module)
        source = spec.loader.get_source(module) if spec and spec.loader else None
        tree = ast.parse(source or "")
    except (ImportError, SyntaxError, ValueError, AttributeError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and len(node.args) == 2
                and all(isinstance(arg, ast.Constant) for arg in node.args)
                and node.args[0].value == SETTINGS_ENV and isinstance(node.args[1].value, str)):
            return node.args[1].value
    return None


def _options(server: Any, settings_module: str) -> MoesifOptions | None:
    """MOESIF_MIDDLEWARE from the settings module, read without configuring Django in the
    arbiter (django.conf.Settings also sets the process's TZ; that is undone here)."""
    from django.conf import Settings

    timezone = os.environ.get("TZ")
    try:
        raw = getattr(Settings(settings_module), "MOESIF_MIDDLEWARE", None)
    except Exception as error:
        server.log.error("moesif_fast: cannot load settings %s: %s", settings_module, error)
        return None
    finally:
        if timezone is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = timezone
        time.tzset()
    found = problems(raw)
    for problem in found:
        log = server.log.error if problem.is_serious() else server.log.warning
        log("moesif_fast: %s (%s)", problem.msg, problem.id)
    if any(problem.is_serious() for problem in found):
        server.log.error("moesif_fast: nothing is captured until MOESIF_MIDDLEWARE is fixed")
        return None
    return load(raw)


def _start_supervisor(server: Any) -> None:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    _State.supervisor = subprocess.Popen(_State.command, env=environment,
                                         stdin=subprocess.DEVNULL, start_new_session=True)


def _alive(pid: int) -> bool:
    """True while `pid` has not exited (gunicorn's waitpid(-1) may reap it for us)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # already reaped by the arbiter
    return reaped == 0


def _remove_drained_ring(server: Any) -> None:
    if _State.ring_path is None:
        return
    try:
        ring = RingFile.attach(_State.ring_path)
    except (OSError, RingError):
        return
    try:
        stats = ring.stats()
        if stats.bytes_in_use == 0 and not ring.owned_lanes():
            ring.unlink()
            for companion in (ringfile.shipper_stats_path(_State.ring_path),
                              ringfile.policy_snapshot_path(_State.ring_path)):
                if os.path.exists(companion):
                    os.unlink(companion)
        else:
            server.log.warning("moesif_fast: %d events were not delivered; they stay in %s "
                               "and are sent by the next shipper", stats.records_in_use,
                               _State.ring_path)
    finally:
        ring.close()
