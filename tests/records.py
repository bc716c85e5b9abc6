"""Reading back what a test's captures appended to its ring."""

from moesif_fast.record import CapturedCall, decode
from moesif_fast.ringbuffer import Reader


def captured(reader: Reader) -> list[CapturedCall]:
    """Every call appended since the last read, committed, each a valid record."""
    batch = reader.read(1000, 1 << 30)
    reader.commit(batch)
    calls = [decode(record) for record in batch.records]
    assert None not in calls
    return calls
