"""Whether the process a shipper or supervisor serves (the gunicorn arbiter) is still alive.

A pid alone can be reused after its process exits, so the watch remembers the process's start
time too; a zombie counts as gone.
"""

from __future__ import annotations

import psutil


class ParentWatch:
    """Watches one process; with no pid, `alive()` is always true (a standalone shipper)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._process: psutil.Process | None = None
        if pid is not None:
            try:
                self._process = psutil.Process(pid)
            except psutil.NoSuchProcess:
                self._process = None

    def alive(self) -> bool:
        if self.pid is None:
            return True
        if self._process is None:
            return False
        try:
            return self._process.is_running() and \
                self._process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
