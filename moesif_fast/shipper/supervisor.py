"""Keeps one shipper running for a gunicorn arbiter: `python -m moesif_fast supervise ...`.

The arbiter starts this small process (in a session of its own, so a terminal's Ctrl-C reaches
only gunicorn) from its `when_ready` hook. It runs `python -m moesif_fast ship ...` as its
child and starts it again within two seconds whenever it exits. When it is told to stop
(SIGTERM from the arbiter's `on_exit` hook) or sees that the arbiter is gone, it asks the
shipper to finish (SIGTERM: deliver what is left within the deadline) and waits for it.

A shipper that is stuck is killed and started again: while its child is the ring's reader, the
supervisor watches the reader's heartbeat in the ring header, which the shipper refreshes at
least every pass of its loop (every second when idle, waiting for the collector or finishing)
and before each record it decodes. If the heartbeat has not changed for STALL_TIMEOUT seconds
of the supervisor's own monotonic clock (a wall-clock step cannot fake a stall), the shipper
is hung, most likely on one record, which its mark in the ring header names: it gets SIGKILL,
and the record is read again by the next shipper, which is skipped if that one hangs or dies on
it too (see `ringbuffer.reader`).

Between checks it sleeps: where Linux gives pidfds (`parent.py`), until the shipper or the
arbiter exits, a signal arrives, or CHECK_INTERVAL passes (for the heartbeat); elsewhere POLL at
a time. (Waking every POLL cost ~2 ms of CPU per second, all day.)

It is a separate process rather than a thread in the arbiter because gunicorn forks its
workers from the arbiter and reaps every child with waitpid(-1); a thread there would make
each fork a multi-threaded fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from types import FrameType

from ..ringbuffer import RingError, RingFile
from ..ringbuffer.layout import WORD_READER_PID
from .parent import ParentWatch, exit_fd_of

logger = logging.getLogger("moesif_fast.supervisor")

POLL = 0.2  # seconds between checks of the shipper and the arbiter, without pidfds
CHECK_INTERVAL = 1.0  # seconds between checks of the heartbeat, sleeping on pidfds
RESTART_DELAYS = (0.0, 0.5, 1.0, 1.5)  # waits before successive quick restarts (≤ 2 s)
STABLE_AFTER = 10.0  # a shipper that ran this long resets the restart delay
EXIT_GRACE = 5.0  # seconds beyond the shipper's deadline before it is killed
STALL_TIMEOUT = 30.0  # seconds without a reader heartbeat before the shipper is killed


class StallWatch:
    """Whether the supervised shipper, while it is the ring's reader, stopped heartbeating."""

    def __init__(self, ring_path: str | None, timeout: float = STALL_TIMEOUT) -> None:
        self.ring_path = ring_path
        self.timeout = timeout
        self._ring: RingFile | None = None
        self._seen: tuple[int, int] | None = None  # (reader pid, heartbeat) last seen
        self._since = 0.0  # monotonic time it was first seen

    def stalled(self, pid: int) -> float | None:
        """Seconds since the heartbeat of the reader `pid` last changed, when that is more
        than the timeout; None otherwise (also while `pid` is not the reader: starting, a
        standby, or the ring cannot be read)."""
        ring = self._attached()
        if ring is None:
            return None
        seen = (ring.words[WORD_READER_PID], ring.reader_heartbeat_ns)
        now = time.monotonic()
        if seen[0] != pid:
            self._seen = None
            return None
        if seen != self._seen:
            self._seen, self._since = seen, now
            return None
        quiet = now - self._since
        return quiet if quiet > self.timeout else None

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _attached(self) -> RingFile | None:
        if self._ring is None and self.ring_path is not None:
            try:
                self._ring = RingFile.attach(self.ring_path)
            except (OSError, RingError):
                return None  # not there yet, or not a ring: nothing to watch
        return self._ring


def ring_of(ship_command: list[str]) -> str | None:
    """The --ring argument of a ship command, if it has one."""
    for index, argument in enumerate(ship_command):
        if argument == "--ring" and index + 1 < len(ship_command):
            return ship_command[index + 1]
        if argument.startswith("--ring="):
            return argument.partition("=")[2]
    return None


def supervise(ship_command: list[str], parent: ParentWatch, deadline: float,
              stall_timeout: float = STALL_TIMEOUT) -> int:
    """Run `ship_command` until told to stop or the parent is gone. Returns the exit code."""
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    watch = StallWatch(ring_of(ship_command), stall_timeout)
    signals = _signal_pipe()
    quick_restarts = 0
    try:
        while not stopping and parent.alive():
            started = time.monotonic()
            shipper = subprocess.Popen(ship_command, stdin=subprocess.DEVNULL)
            with _Sleep(shipper, parent, signals) as sleep:
                while shipper.poll() is None and not stopping and parent.alive():
                    sleep()
                    _kill_if_stalled(shipper, watch)
                if shipper.returncode is None:  # we are stopping: let the shipper finish
                    shipper.send_signal(signal.SIGTERM)
                    give_up_at = time.monotonic() + deadline + EXIT_GRACE
                    while shipper.poll() is None and time.monotonic() < give_up_at:
                        sleep()
                        _kill_if_stalled(shipper, watch)
                    if shipper.poll() is None:
                        logger.error("moesif_fast supervisor: shipper %d did not finish in "
                                     "time; killing it", shipper.pid)
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
    finally:
        watch.close()
        if signals is not None:
            signal.set_wakeup_fd(-1)
            os.close(signals[0])
            os.close(signals[1])
    logger.info("moesif_fast supervisor %d: done", os.getpid())
    return 0


def _signal_pipe() -> tuple[int, int] | None:
    """A pipe that Python writes a byte to on every signal (`signal.set_wakeup_fd`), so that a
    sleep on file descriptors ends when SIGTERM asks to stop; None if it cannot be set up."""
    reading, writing = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        signal.set_wakeup_fd(writing, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(reading)
        os.close(writing)
        return None
    return reading, writing


class _Sleep:
    """The supervisor's wait between two checks: until the shipper or the parent exits or a
    signal arrives, at most CHECK_INTERVAL; POLL without pidfds (see the module docstring)."""

    def __init__(self, shipper: subprocess.Popen[bytes], parent: ParentWatch,
                 signals: tuple[int, int] | None) -> None:
        self._shipper_fd = exit_fd_of(shipper.pid)  # our child: its pid is not reused before
        # we reap it
        self._signal_fd = signals[0] if signals is not None else -1
        self._parent_fd = parent.exit_fd
        self._poll: select.poll | None = None
        if self._shipper_fd is not None and signals is not None \
                and (parent.pid is None or parent.exit_fd is not None):
            self._poll = select.poll()
            for fd in (self._shipper_fd, signals[0], parent.exit_fd):
                if fd is not None:
                    self._poll.register(fd, select.POLLIN)

    def __call__(self) -> None:
        if self._poll is None:
            time.sleep(POLL)
            return
        for fd, _ in self._poll.poll(CHECK_INTERVAL * 1000):
            if fd == self._signal_fd:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 512)  # drained: the signal handler itself sets the flags
            elif fd == self._parent_fd:  # exited: readable from now on; the caller sees it
                self._poll.unregister(fd)  # gone through `parent.alive()`

    def __enter__(self) -> _Sleep:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._shipper_fd is not None:
            os.close(self._shipper_fd)


def _kill_if_stalled(shipper: subprocess.Popen[bytes], watch: StallWatch) -> None:
    quiet = watch.stalled(shipper.pid)
    if quiet is None:
        return
    logger.error("moesif_fast supervisor: shipper %d has not heartbeated for %.0f s (stuck, "
                 "most likely decoding or building one event); killing it. The record it was "
                 "working on is skipped if it stops the next shipper too", shipper.pid, quiet)
    shipper.kill()
    shipper.wait()
