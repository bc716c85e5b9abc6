"""The config/rules snapshot: the shipper publishes it, workers read it without the network.

The shipper writes `/v1/config` and `/v1/rules` (with their tags and fetch time) as one JSON
file next to the ring, replaced atomically (write, then rename). A worker's `PolicySource`
looks at the file's identity (inode, size, mtime) at most once per CHECK_INTERVAL and, only when
it changed, parses it and compiles a `Policy` (precompiled regexes, dict lookups). Until a
snapshot exists, or when it cannot be read, workers use `Policy.DEFAULT`: sample everything,
block nothing (W1).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .policy import Policy

logger = logging.getLogger("moesif_fast")

CHECK_INTERVAL = 1.0  # seconds between looks at the snapshot file from one worker


@dataclass(frozen=True)
class Snapshot:
    config: Any
    rules: Any
    config_etag: str | None
    rules_tag: str | None
    fetched_ns: int


def publish(path: str, snapshot: Snapshot) -> None:
    """Replace the snapshot at `path` atomically."""
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(descriptor, "w") as file:
        json.dump(snapshot.__dict__, file)
    os.replace(temporary, path)


def read(path: str) -> Snapshot | None:
    """The snapshot at `path`, or None if there is none or it is unreadable."""
    try:
        with open(path) as file:
            data = json.load(file)
        return Snapshot(data.get("config"), data.get("rules"), data.get("config_etag"),
                        data.get("rules_tag"), int(data.get("fetched_ns") or 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


class PolicySource:
    """A worker's current Policy, following the snapshot file at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.policy = Policy.DEFAULT
        self._identity: tuple[int, int, int] | None = None
        self._next_check = 0.0

    def current(self) -> Policy:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            self._reload_if_changed()
        return self.policy

    def _reload_if_changed(self) -> None:
        try:
            status = os.stat(self.path)
        except OSError:
            return  # no snapshot yet: keep what we have (the default at first)
        identity = (status.st_ino, status.st_size, status.st_mtime_ns)
        if identity == self._identity:
            return
        self._identity = identity
        snapshot = read(self.path)
        if snapshot is None:
            return
        self.policy = Policy.compile(snapshot.config, snapshot.rules)
        for problem in self.policy.problems:
            logger.warning("moesif_fast: ignoring part of the Moesif config/rules: %s", problem)
