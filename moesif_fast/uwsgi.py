"""The shipper as a daemon of the uWSGI master: `python -m moesif_fast.uwsgi [ship options]`.

uWSGI's master runs it with `--attach-daemon2` (docs/uwsgi.md has the whole command line)::

    --env MOESIF_FAST_SHIPPER=external --reload-mercy 30
    --attach-daemon2 "cmd=exec /path/to/venv/bin/python -m moesif_fast.uwsgi,reloadsignal=1"

It is `python -m moesif_fast ship` (the deployment's default ring, the one the workers derive
from the same settings and MOESIF_FAST_SERVER) with `--parent` set to the uWSGI master, so that

- it waits as a standby while another shipper still drains the ring (one left by an earlier
  setup, a sidecar) and takes over when that one exits, instead of exiting at once and being
  respawned by the master over and over;
- it finishes if the master is gone.

How the master treats it (uWSGI 2.0, `core/daemons.c`): it starts the daemon once the workers
are up and starts it again whenever it exits. On a stop (master FIFO `q`, SIGINT, SIGQUIT, or
SIGTERM with `--die-on-term`) it sends `stopsignal` (SIGTERM: the shipper delivers what is left
within SHUTDOWN_DEADLINE, spools the rest) and waits for it, up to `--reload-mercy` seconds
(3 when unset), then SIGKILLs it: hence `--reload-mercy` above SHUTDOWN_DEADLINE. On a reload
(SIGHUP, `--touch-reload`, FIFO `r`) it sends `reloadsignal` and waits the same way, *before*
the workers are reloaded; SIGHUP makes the shipper hand over at once (the batches in flight
settle, the rest stays in the ring and spool), and the master starts a new shipper after the
reload, which delivers it.

The master runs the command through `/bin/sh -c` and waits for the pid it forked: without
`exec` that is the shell, which dies on the first signal, and the master would go on while the
shipper is still delivering. This module notices a shell between itself and the master, warns,
and still watches the master.
"""

from __future__ import annotations

import logging
import os
import sys

import psutil

from .sink import SHIPPER_ENV  # "external" in the workers' environment: no fallback shippers

logger = logging.getLogger("moesif_fast.uwsgi")

SHELLS = frozenset({"sh", "dash", "bash", "ash", "busybox", "zsh"})


def master_pid() -> int:
    """The uWSGI master: this process's parent, or its grandparent when a shell (a `cmd=`
    without `exec`) is in between."""
    parent = os.getppid()
    try:
        if psutil.Process(parent).name() in SHELLS:
            logger.warning("moesif_fast: the uWSGI daemon command does not start with `exec`: "
                           "the master waits for the shell, not for the shipper, at stop and "
                           "reload (use --attach-daemon2 \"cmd=exec ...\")")
            return psutil.Process(parent).ppid() or parent
    except psutil.Error:
        pass
    return parent


def ship_arguments(arguments: list[str]) -> list[str]:
    """The `python -m moesif_fast` arguments of the shipper: `ship`, the caller's options
    (--settings, --server), and the master as --parent unless given."""
    if any(argument == "--ring" or argument.startswith("--ring=") for argument in arguments):
        raise SystemExit("moesif_fast.uwsgi: --ring is not for uWSGI: the shipper uses the ring "
                         "the workers derive from the settings")
    parent = [] if any(argument == "--parent" or argument.startswith("--parent=")
                       for argument in arguments) else ["--parent", str(master_pid())]
    return ["ship", *parent, *arguments]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as moesif_main

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    if os.environ.get(SHIPPER_ENV) != "external":
        logger.warning("moesif_fast: %s=external is not in the environment: the workers will "
                       "start fallback shippers of their own (add --env %s=external to the "
                       "uwsgi command line)", SHIPPER_ENV, SHIPPER_ENV)
    return moesif_main(ship_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
