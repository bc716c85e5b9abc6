"""The config/rules snapshot: the shipper publishes it, workers read it without the network.

The shipper writes `/v1/config` and `/v1/rules` (with their tags and fetch time) as one JSON
file next to the ring, in the private state folder, replaced atomically (`private.replace_file`),
and only when what it fetched differs from what the file holds (`Snapshot.same_content`): the
fetch time is when this content was first fetched. A worker's `PolicySource` looks at the file's
identity (inode, size, mtime) at most once per CHECK_INTERVAL and, only when it changed, reads
it and compiles a `Policy` (precompiled regexes, dict lookups). So a worker re-reads the file
only after its content changed. Until a snapshot exists, workers use `Policy.DEFAULT`: sample
everything, block nothing (W1). The file is untrusted input: one that is not a private regular
file of this user, larger than MAX_SNAPSHOT_BYTES, not JSON or not of this shape is ignored
with a warning, and workers use the defaults until a good one replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from . import private
from .policy import Policy

logger = logging.getLogger("moesif_fast")

CHECK_INTERVAL = 1.0  # seconds between looks at the snapshot file from one worker
MAX_SNAPSHOT_BYTES = 16 << 20  # a larger file is not a snapshot the shipper wrote


class SnapshotError(Exception):
    """The snapshot file exists but cannot be used; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    config: Any
    rules: Any
    config_etag: str | None
    rules_tag: str | None
    fetched_ns: int  # time.time_ns() when the shipper first fetched this content

    def same_content(self, other: Snapshot) -> bool:
        """Whether both hold the same config, rules and tags, as JSON (fetch times aside)."""
        return _content(self) == _content(other)


def _content(snapshot: Snapshot) -> str:
    return json.dumps([snapshot.config, snapshot.rules, snapshot.config_etag, snapshot.rules_tag])


def publish(path: str, snapshot: Snapshot) -> None:
    """Replace the snapshot at `path` atomically."""
    private.replace_file(path, json.dumps(snapshot.__dict__).encode())


def read(path: str) -> Snapshot | None:
    """The snapshot at `path`, or None if there is none. Raises SnapshotError when the file
    is there but unusable."""
    try:
        data = json.loads(private.read_file(path, MAX_SNAPSHOT_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON, not UTF-8
        raise SnapshotError(f"{path}: {error}") from None
    if type(data) is not dict:
        raise SnapshotError(f"{path}: not a JSON object")
    tags = data.get("config_etag"), data.get("rules_tag")
    fetched_ns = data.get("fetched_ns", 0)
    if not all(tag is None or type(tag) is str for tag in tags) or type(fetched_ns) is not int:
        raise SnapshotError(f"{path}: tags that are not strings or a fetch time that is not "
                            "an integer")
    return Snapshot(data.get("config"), data.get("rules"), *tags, fetched_ns)


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
            status = os.lstat(self.path)
        except OSError:
            return  # no snapshot yet: keep what we have (the default at first)
        identity = (status.st_ino, status.st_size, status.st_mtime_ns)
        if identity == self._identity:
            return
        self._identity = identity
        try:
            snapshot = read(self.path)
        except SnapshotError as error:
            logger.warning("moesif_fast: ignoring the config snapshot (%s); sampling "
                           "everything and blocking nothing until the shipper replaces it",
                           error)
            self.policy = Policy.DEFAULT
            return
        if snapshot is None:
            return
        self.policy = Policy.compile(snapshot.config, snapshot.rules)
        for problem in self.policy.problems:
            logger.warning("moesif_fast: ignoring part of the Moesif config/rules: %s", problem)
