"""Every lost event, and every failed delivery attempt, logged by reason at most once a minute.

The ring, the spool, the transport and the loop each count what they drop or fail (the ring in
its shared header, so the workers' drops are there too). Refusals, unreadable and poison
records and events that cannot be built are logged where they happen; the rest is here.
`DropReport.report()`, called by the loop about once a second, compares each count with the one
it last logged and logs a WARNING for each reason that grew: at once the first time, then at
most every REPORT_INTERVAL with what accumulated meanwhile. Nothing is lost silently, and an
outage does not flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..ringbuffer import RingFile
from ..spool import Spool
from .transport import CollectorTransport

logger = logging.getLogger("moesif_fast.shipper")

REPORT_INTERVAL = 60.0  # seconds between two warnings for the same reason
COLLECTOR_FAILURES = "attempts to reach the collector failed (retried; the events wait)"


class DropReport:
    """Logs what each counter gained since it was last logged (see the module docstring)."""

    def __init__(self, reasons: dict[str, Callable[[], int]]) -> None:
        self.reasons = reasons  # reason, as logged → its current total
        self._logged = {reason: total() for reason, total in reasons.items()}
        self._next = dict.fromkeys(reasons, 0.0)

    @classmethod
    def for_shipper(cls, ring: RingFile, spool: Spool | None, counters: Any,
                    transport: CollectorTransport) -> DropReport:
        """The reasons of a shipper: its ring, spool, counters and transport."""

        def ring_total(field: str) -> Callable[[], int]:
            return lambda: sum(getattr(lane, field) for lane in ring.stats().lanes)

        def counter(name: str) -> Callable[[], int]:
            return lambda: getattr(counters, name)

        reasons: dict[str, Callable[[], int]] = {
            "events dropped by workers: the ring was full": ring_total("dropped_full"),
            "events dropped by workers: larger than the ring takes": ring_total(
                "dropped_oversize"),
            "events dropped by workers: the shared overflow lane stayed busy": ring_total(
                "dropped_busy"),
            "events dropped by MASK_EVENT_MODEL": counter("masked_out"),
            COLLECTOR_FAILURES: lambda: transport.failed_attempts,
        }
        if spool is not None:
            reasons.update({
                "events dropped: the spool was full": lambda: spool.stats().dropped_full,
                "damaged spool records skipped": lambda: spool.stats().dropped_corrupt,
                "events the spool could not write (kept in the ring)":
                    lambda: spool.stats().write_errors,
            })
        return cls(reasons)

    def report(self, last_failure: str | None = None) -> None:
        """Log each reason whose count grew, unless it was logged less than REPORT_INTERVAL
        ago; `last_failure` (the collector's latest) goes with the collector's."""
        now = time.monotonic()
        for reason, total in self.reasons.items():
            if now < self._next[reason]:
                continue
            current = total()
            grown = current - self._logged[reason]
            if grown <= 0:
                continue
            self._logged[reason] = current
            self._next[reason] = now + REPORT_INTERVAL
            detail = f"; the latest: {last_failure}" if reason == COLLECTOR_FAILURES else ""
            logger.warning("moesif_fast shipper: %d %s since the last report (%d in all)%s",
                           grown, reason, current, detail)
