"""Gunicorn server hooks: one ring and one supervised shipper per gunicorn server.

Use the repository's `gunicorn_conf.py` (`gunicorn -c /path/to/gunicorn_conf.py mysite.wsgi`),
or import these hooks into your own config::

    from moesif_fast.gunicorn import when_ready, pre_fork, on_exit

- `when_ready` (arbiter, before the first fork): finds the Django settings module (from
  DJANGO_SETTINGS_MODULE, else the default `wsgi.py` sets), has `python -m moesif_fast
  prepare` read MOESIF_MIDDLEWARE and create the ring (Django is never imported in the
  arbiter: see `moesif_fast.prepare`), exports the ring's path in MOESIF_FAST_RING for the
  workers, and starts the supervisor (`python -m moesif_fast supervise`), which keeps one
  `moesif_fast ship` process running.
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
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import ringfile

SETTINGS_ENV = "DJANGO_SETTINGS_MODULE"
EXIT_GRACE = 10.0  # seconds beyond SHUTDOWN_DEADLINE that on_exit waits for the supervisor
PREPARE_TIMEOUT = 60.0  # seconds `moesif_fast prepare` may take (it imports the settings)


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
    name = ringfile.server_name() or "gunicorn " + " ".join(
        sorted(str(listener) for listener in server.LISTENERS))
    prepared = _prepare(server, settings_module, name)
    if prepared is None:
        return
    path = prepared["ring"]
    os.environ[ringfile.RING_ENV] = path
    _State.ring_path = path
    _State.deadline = float(prepared["deadline"])
    _State.command = [sys.executable, "-m", "moesif_fast", "supervise", "--ring", path,
                      "--settings", settings_module, "--server", name,
                      "--parent", str(os.getpid()),
                      "--deadline", str(_State.deadline)]
    _start_supervisor(server)
    server.log.info("moesif_fast: ring %s (%d MiB), shipper supervisor pid %d", path,
                    prepared["size_mib"], _State.supervisor.pid)


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


def _prepare(server: Any, settings_module: str, name: str) -> dict[str, Any] | None:
    """Check the settings and create the ring in `python -m moesif_fast prepare` (no Django in
    the arbiter: see `moesif_fast.prepare`); its messages go to gunicorn's log. None when
    nothing can be captured."""
    command = [sys.executable, "-m", "moesif_fast", "prepare", "--settings", settings_module,
               "--workers", str(server.num_workers), "--server", name]
    try:
        finished = subprocess.run(command, env=_child_environment(), capture_output=True,
                                  text=True, timeout=PREPARE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as error:
        server.log.error("moesif_fast: could not prepare the event ring (%s); nothing is "
                         "captured", error)
        return None
    try:
        prepared = json.loads(finished.stdout)
    except ValueError:
        server.log.error("moesif_fast: could not prepare the event ring (`%s` exited with %s: "
                         "%s); nothing is captured", " ".join(command[1:]), finished.returncode,
                         finished.stderr.strip()[-2000:])
        return None
    for level, message in prepared["messages"]:
        (server.log.error if level == "ERROR" else server.log.warning)("moesif_fast: %s",
                                                                        message)
    return prepared if prepared["ring"] else None


def _child_environment() -> dict[str, str]:
    """The arbiter's environment, with its import path (the app's folder, --pythonpath)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def _start_supervisor(server: Any) -> None:
    _State.supervisor = subprocess.Popen(_State.command, env=_child_environment(),
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
    left = ringfile.remove_drained(_State.ring_path)
    if left is not None:
        server.log.warning("moesif_fast: %d events were not delivered; they stay in %s and "
                           "are sent by the next shipper", left, _State.ring_path)
