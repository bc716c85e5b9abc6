"""Whether the process a shipper or supervisor serves (the gunicorn arbiter) is still alive.

A pid alone can be reused after its process exits, so the watch remembers the process's start
time too; a zombie counts as gone. Where Linux gives a pidfd (5.3 and newer, unless a seccomp
policy refuses it), the watch holds one instead: it names that very process, turns readable when
the process exits, and costs one `poll` per check (psutil reads /proc twice, ~35 µs); a
supervisor can also sleep on it (`exit_fd`).
"""

from __future__ import annotations

import os
import select

import psutil


def exit_fd_of(pid: int) -> int | None:
    """A pidfd of process `pid` (readable once it exits), or None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux, a kernel before 5.3, or refused (seccomp)
        return None


def has_exited(exit_fd: int) -> bool:
    """Whether the process of the pidfd `exit_fd` has exited (zombie or reaped)."""
    waiting = select.poll()
    waiting.register(exit_fd, select.POLLIN)
    return bool(waiting.poll(0))


class ParentWatch:
    """Watches one process; with no pid, `alive()` is always true (a standalone shipper)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._process: psutil.Process | None = None
        self.exit_fd: int | None = None
        """A pidfd of the process, or None (no pid, no such process, or no pidfd here)."""
        if pid is not None:
            try:
                self._process = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return
            self.exit_fd = exit_fd_of(pid)
            if self.exit_fd is not None and not self._process.is_running():
                os.close(self.exit_fd)  # the pid was reused in between: the fd names another
                self.exit_fd = None  # process; psutil now answers "gone"

    def alive(self) -> bool:
        if self.pid is None:
            return True
        if self._process is None:
            return False
        if self.exit_fd is not None:
            return not has_exited(self.exit_fd)
        try:
            return self._process.is_running() and \
                self._process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
