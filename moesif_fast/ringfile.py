"""Which ring file a server uses: its geometry and path, derived from MOESIF_MIDDLEWARE.

The gunicorn hooks, the middleware's fallback, the shipper and `stats` all call these, so every
process of one server agrees on the file without talking to the others. The path encodes the
geometry: a changed EVENT_QUEUE_SIZE or worker count gives a new file, never a mismatch.

A server is named by the settings module, the collector and a server name: under the gunicorn
hooks, MOESIF_FAST_SERVER if set, else the addresses gunicorn listens on; elsewhere (runserver,
uvicorn, uWSGI, a sidecar shipper) MOESIF_FAST_SERVER, empty if unset. So two servers of one
project on one host have their own rings, spools and shippers, and a server restarted on the
same addresses finds what its last run left.

Where: every ring of a user, with its companion files, is in that user's private state folder
`<RING_DIR>/moesif_fast-<euid>/` (mode 0700, checked before use: see `moesif_fast.private`):

    <digest>.ring               the ring (`ringbuffer.layout`)
    <digest>.ring.locks/        its lock files
    <digest>.ring.policy.json   config and rules the shipper fetched (`snapshot`)
    <digest>.ring.shipper.json  the shipper's counters (`stats`)
    <digest>.ring.shipper.log   the log of a shipper a worker started (fallback mode)

The spool (`moesif_fast.spool`) is on disk, in the state folder of the same name in SPOOL_DIR:
`<SPOOL_DIR>/moesif_fast-<euid>/<digest>.spool/`.

Sizing rule (documented in the README): the ring holds at most `options.ring_bytes` of lane data
(RING_BYTES, or EVENT_QUEUE_SIZE × 4 KiB clamped to [4 MiB, 32 MiB]), split into power-of-two
lanes, one per producer process plus one shared overflow lane, each large enough for an event
whose two bodies are at MAX_BODY_SIZE (so the ring may exceed ring_bytes with many workers);
each lane (so each process, as moesifdjango's per-process queue) holds at most
EVENT_QUEUE_SIZE events. Beyond either bound new events are dropped and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import TYPE_CHECKING

from . import private
from .ringbuffer import Geometry, RingError, RingFile

if TYPE_CHECKING:  # not imported at run time: the gunicorn arbiter imports this module, and
    from .settings import MoesifOptions  # settings imports Django (see moesif_fast.prepare)

RING_ENV = "MOESIF_FAST_RING"  # set by the gunicorn hooks; workers attach to this path
SERVER_ENV = "MOESIF_FAST_SERVER"  # names a server (see the module docstring)
FALLBACK_PRODUCERS = 16  # dedicated lanes when no hook told us the number of workers
MAX_PRODUCERS = 64
RECORD_HEADROOM = 64 << 10  # room for headers, URI and callback results in the largest record


def producers_for_workers(workers: int) -> int:
    """Dedicated lanes for a server of `workers` processes: one each plus one spare, so that a
    replacement worker (max_requests recycling, a crash) finds a free lane while the old one's
    lock is released. Few lanes make each one large: with the default 32 MiB and 2 workers,
    lanes of 8 MiB, ~7,000 events of 1.1 KB per worker between two passes of the shipper.
    During a reload (HUP) the new workers that find no free lane share the overflow lane until
    the old ones have exited."""
    return max(2, min(MAX_PRODUCERS, workers + 1))


def geometry(options: MoesifOptions, producers: int) -> Geometry:
    """Lanes hold an event with both bodies at MAX_BODY_SIZE plus RECORD_HEADROOM of headers,
    even when that makes the ring larger than ring_bytes."""
    return Geometry.for_size(options.ring_bytes, producers, options.EVENT_QUEUE_SIZE,
                             largest_record=2 * options.MAX_BODY_SIZE + RECORD_HEADROOM)


def state_folder(ring_dir: str) -> str:
    """This user's private state folder in `ring_dir` (RING_DIR)."""
    return os.path.join(ring_dir, f"moesif_fast-{os.geteuid()}")


def server_name() -> str:
    """This process's server name outside the gunicorn hooks: MOESIF_FAST_SERVER, or ""."""
    return os.environ.get(SERVER_ENV, "")


def ring_path(options: MoesifOptions, settings_module: str, ring_geometry: Geometry,
              server: str) -> str:
    """A path unique to this user, settings module, collector, server and geometry."""
    return os.path.join(state_folder(options.ring_dir),
                        f"{_digest(options, settings_module, server, repr(ring_geometry))}.ring")


def spool_folder(options: MoesifOptions, settings_module: str, server: str) -> str:
    """The server's spool folder, in this user's state folder in SPOOL_DIR. Unlike the ring's
    name it does not depend on the geometry: a server restarted with more workers still
    delivers what the last one spooled."""
    return os.path.join(state_folder(options.spool_dir),
                        f"{_digest(options, settings_module, server)}.spool")


def _digest(options: MoesifOptions, settings_module: str, *parts: str) -> str:
    identity = "\0".join([settings_module, options.base_uri, options.APPLICATION_ID or "",
                          *parts])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def open_ring(path: str, ring_geometry: Geometry) -> RingFile:
    """The ring at `path`, created (with its private folder) if missing. Raises
    `private.UnsafePathError` naming the path when the folder is not this user's alone."""
    private.make_folder(os.path.dirname(path))
    return RingFile.open(path, ring_geometry)


def remove_drained(path: str) -> int | None:
    """Remove the ring at `path` and its companion files when it holds nothing and no process
    owns a lane in it; the state folder goes too when nothing else is in it. None when removed
    (or not a ring), else the records the ring still holds."""
    try:
        ring = RingFile.attach(path)
    except (OSError, RingError):
        return None
    try:
        stats = ring.stats()
        if stats.bytes_in_use or ring.owned_lanes():
            return stats.records_in_use
        ring.unlink()
    finally:
        ring.close()
    for companion in (shipper_stats_path(path), policy_snapshot_path(path),
                      shipper_log_path(path)):
        private.remove_file(companion)
    remove_empty_folder(os.path.dirname(path))
    return None


def remove_empty_folder(path: str) -> None:
    """rmdir `path` if it is empty (a state folder, when a server's last file is gone)."""
    with contextlib.suppress(OSError):  # not empty (another server's files), or gone
        os.rmdir(path)


def shipper_stats_path(path: str) -> str:
    """Where the shipper of the ring at `path` publishes its counters."""
    return path + ".shipper.json"


def policy_snapshot_path(path: str) -> str:
    """Where the shipper of the ring at `path` publishes the collector's config and rules."""
    return path + ".policy.json"


def shipper_log_path(path: str) -> str:
    """Where a shipper that a worker started (fallback mode) writes its log."""
    return path + ".shipper.log"
