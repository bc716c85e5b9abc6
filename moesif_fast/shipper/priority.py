"""The shipper's CPU priority: below the workers' while it keeps up, equal while it catches up.

The shipper shares the host's cores with the workers serving requests. While the ring is less
than HIGH_WATER full, its work runs in threads at nice LOW_NICE (Linux gives each thread a nice
value of its own), so that the workers get the CPU first and the shipper uses what they leave.
When the fullest lane passes HIGH_WATER (the host has been too busy for the shipper for a
while), the work moves to threads at the process's own priority until the ring is back under
LOW_WATER: a long busy spell then costs the application some CPU rather than costing events.
Shutting down is always done at the process's priority, to deliver within the deadline.

An unprivileged thread can raise its nice value but never lower it again, hence two sets of
threads: `drive` hands the shipper's loop, one pass at a time, to whichever of two threads has
the wanted priority, and the loop hands each batch to a sender of that priority.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Generator
from typing import TypeVar

LOW_NICE = 19
HIGH_WATER = 0.5  # fill of the fullest lane (bytes or records) that starts a catch-up
LOW_WATER = 0.125  # fill under which the shipper goes back to the low priority

Result = TypeVar("Result")


def lower_this_thread() -> None:
    """Give the calling thread nice value LOW_NICE. Where a thread has no nice value of its own
    (not Linux) or the change is refused, it keeps the process's."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_NICE)


class CatchUp:
    """Whether the shipper is catching up, from the ring's fill, with hysteresis between
    HIGH_WATER and LOW_WATER."""

    def __init__(self) -> None:
        self.active = False
        self.started = 0  # catch-ups begun so far

    def update(self, fill: float) -> bool:
        was_active = self.active
        self.active = fill >= (LOW_WATER if was_active else HIGH_WATER)
        if self.active and not was_active:
            self.started += 1
        return self.active


def drive(passes: Generator[None, None, Result], wants_normal: Callable[[], bool]) -> Result:
    """Run the generator `passes` to its end and return its value. Each pass (one `next`) runs
    in this thread while `wants_normal()` is true after the previous pass, else in a thread at
    nice LOW_NICE. An exception from a pass is raised here."""
    turn = _Turn(normal=wants_normal())
    low = threading.Thread(target=turn.take_turns, args=(passes, wants_normal, False),
                           name="moesif-shipper-low", daemon=True)
    low.start()
    try:
        turn.take_turns(passes, wants_normal, True)
    except BaseException:  # interrupted while waiting for its turn: stop the other thread too
        turn.stop()
        raise
    low.join()
    if turn.error is not None:
        raise turn.error
    return turn.result


class _Turn:
    """Which of the two threads runs the next pass, and how the passes ended."""

    def __init__(self, normal: bool) -> None:
        self.normal = normal
        self.done = False
        self.result: object = None
        self.error: BaseException | None = None
        self._changed = threading.Condition()

    def take_turns(self, passes: Generator[None, None, Result],
                   wants_normal: Callable[[], bool], normal: bool) -> None:
        if not normal:
            lower_this_thread()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self.done or self.normal == normal)
                if self.done:
                    return
            try:
                next(passes)
            except StopIteration as end:
                self._finish(result=end.value)
                return
            except BaseException as error:  # raised by drive() in the calling thread
                self._finish(error=error)
                return
            try:
                switch = wants_normal() != normal
            except BaseException as error:
                self._finish(error=error)
                return
            if switch:
                with self._changed:
                    self.normal = not normal
                    self._changed.notify_all()

    def stop(self) -> None:
        """No more passes: the thread running one stops after it."""
        with self._changed:
            self.done = True
            self._changed.notify_all()

    def _finish(self, result: object = None, error: BaseException | None = None) -> None:
        with self._changed:
            self.result, self.error, self.done = result, error, True
            self._changed.notify_all()
