"""A lock-free shared-memory ring of byte records: many producer processes, one reader.

Knows nothing of Django or HTTP. See `layout` for the file format, `producer` and `reader` for
the two sides. Typical use::

    ring = RingFile.open(path, Geometry.for_size(32 << 20, producers=8, max_records=100_000))
    Producer(ring).append(b"...")              # in each worker process
    reader = Reader(ring)                      # in the one shipper process
    batch = reader.read(max_records=100, max_bytes=1 << 20)
    ...deliver batch.records...
    reader.commit(batch)
"""

from .layout import (
    Geometry,
    LaneStats,
    RingBusyError,
    RingError,
    RingFile,
    RingFormatError,
    RingStats,
)
from .producer import Producer
from .reader import Batch, Reader

__all__ = [
    "Batch",
    "Geometry",
    "LaneStats",
    "Producer",
    "Reader",
    "RingBusyError",
    "RingError",
    "RingFile",
    "RingFormatError",
    "RingStats",
]
