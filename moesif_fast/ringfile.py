"""Which ring file a deployment uses: its geometry and path, derived from MOESIF_MIDDLEWARE.

The gunicorn hooks, the middleware's fallback, the shipper and `stats` all call these, so every
process of one deployment agrees on the file without talking to each other. The path encodes
the geometry: a changed EVENT_QUEUE_SIZE or worker count gives a new file, never a mismatch.

Sizing rule (documented in the README): the ring holds at most `options.ring_bytes` of lane data
(RING_BYTES, or EVENT_QUEUE_SIZE × 4 KiB clamped to [4 MiB, 32 MiB]), split into power-of-two
lanes, one per producer process plus one shared overflow lane, each large enough for an event
whose two bodies are at MAX_BODY_SIZE (so the ring may exceed ring_bytes with many workers);
each lane (so each process, as moesifdjango's per-process queue) holds at most
EVENT_QUEUE_SIZE events. Beyond either bound new events are dropped and counted.
"""

from __future__ import annotations

import hashlib
import os

from .ringbuffer import Geometry
from .settings import MoesifOptions

RING_ENV = "MOESIF_FAST_RING"  # set by the gunicorn hooks; workers attach to this path
FALLBACK_PRODUCERS = 16  # dedicated lanes when no hook told us the number of workers
MAX_PRODUCERS = 64
RECORD_HEADROOM = 64 << 10  # room for headers, URI and callback results in the largest record


def producers_for_workers(workers: int) -> int:
    """Dedicated lanes for a server of `workers` processes: room for a full set of
    replacements during a reload (HUP) or recycling overlap, plus two spare."""
    return max(4, min(MAX_PRODUCERS, 2 * workers + 2))


def geometry(options: MoesifOptions, producers: int) -> Geometry:
    """Lanes hold an event with both bodies at MAX_BODY_SIZE plus RECORD_HEADROOM of headers,
    even when that makes the ring larger than ring_bytes."""
    return Geometry.for_size(options.ring_bytes, producers, options.EVENT_QUEUE_SIZE,
                             largest_record=2 * options.MAX_BODY_SIZE + RECORD_HEADROOM)


def ring_path(options: MoesifOptions, settings_module: str, ring_geometry: Geometry) -> str:
    """A path unique to this user, settings module, collector and geometry."""
    identity = "\0".join([settings_module, options.base_uri, options.APPLICATION_ID or "",
                          repr(ring_geometry)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return os.path.join(options.ring_dir, f"moesif_fast-{os.getuid()}-{digest}.ring")


def shipper_stats_path(path: str) -> str:
    """Where the shipper of the ring at `path` publishes its counters."""
    return path + ".shipper.json"


def policy_snapshot_path(path: str) -> str:
    """Where the shipper of the ring at `path` publishes the collector's config and rules."""
    return path + ".policy.json"


def shipper_log_path(path: str) -> str:
    """Where a shipper that a worker started (fallback mode) writes its log."""
    return path + ".shipper.log"
