"""Keeps one shipper running for a gunicorn arbiter: `python -m moesif_fast supervise ...`.

The arbiter starts this small process (in a session of its own, so a terminal's Ctrl-C reaches
only gunicorn) from its `when_ready` hook. It runs `python -m moesif_fast ship ...` as its
child and starts it again within two seconds whenever it exits. When it is told to stop
(SIGTERM from the arbiter's `on_exit` hook) or sees that the arbiter is gone, it asks the
shipper to finish (SIGTERM: deliver what is left within the deadline) and waits for it.

It is a separate process rather than a thread in the arbiter because gunicorn forks its
workers from the arbiter and reaps every child with waitpid(-1); a thread there would make
each fork a multi-threaded fork.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from types import FrameType

from .parent import ParentWatch

logger = logging.getLogger("moesif_fast.supervisor")

POLL = 0.2  # seconds between checks of the shipper and the arbiter
RESTART_DELAYS = (0.0, 0.5, 1.0, 1.5)  # waits before successive quick restarts (≤ 2 s)
STABLE_AFTER = 10.0  # a shipper that ran this long resets the restart delay
EXIT_GRACE = 5.0  # seconds beyond the shipper's deadline before it is killed


def supervise(ship_command: list[str], parent: ParentWatch, deadline: float) -> int:
    """Run `ship_command` until told to stop or the parent is gone. Returns the exit code."""
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    quick_restarts = 0
    while not stopping and parent.alive():
        started = time.monotonic()
        shipper = subprocess.Popen(ship_command, stdin=subprocess.DEVNULL)
        while shipper.poll() is None and not stopping and parent.alive():
            time.sleep(POLL)
        if shipper.returncode is None:  # we are stopping: let the shipper finish
            shipper.send_signal(signal.SIGTERM)
            try:
                shipper.wait(deadline + EXIT_GRACE)
            except subprocess.TimeoutExpired:
                logger.error("moesif_fast supervisor: shipper %d did not finish in time; "
                             "killing it", shipper.pid)
                shipper.kill()
                shipper.wait()
            break
        if time.monotonic() - started >= STABLE_AFTER:
            quick_restarts = 0
        delay = RESTART_DELAYS[min(quick_restarts, len(RESTART_DELAYS) - 1)]
        quick_restarts += 1
        logger.warning("moesif_fast supervisor: shipper %d exited with %s; restarting in "
                       "%.1f s", shipper.pid, shipper.returncode, delay)
        time.sleep(delay)
    logger.info("moesif_fast supervisor %d: done", os.getpid())
    return 0
