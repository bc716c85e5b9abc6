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

    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self.totals = totals  # → {reason, as logged: its current total}, read once per report
        self._logged = totals()
        self._next = dict.fromkeys(self._logged, 0.0)

    @classmethod
    def for_shipper(cls, ring: RingFile, spool: Spool | None, counters: Any,
                    transport: CollectorTransport) -> DropReport:
        """The reasons of a shipper: its ring, spool, counters and transport, each read once
        per report (a ring snapshot reads every lane)."""

        def totals() -> dict[str, int]:
            lanes = ring.stats().lanes
            result = {
                "events dropped by workers: the ring was full":
                    sum(lane.dropped_full for lane in lanes),
                "events dropped by workers: larger than the ring takes":
                    sum(lane.dropped_oversize for lane in lanes),
                "events dropped by workers: the shared overflow lane stayed busy":
                    sum(lane.dropped_busy for lane in lanes),
                "events dropped by MASK_EVENT_MODEL": counters.masked_out,
                COLLECTOR_FAILURES: transport.failed_attempts,
            }
            if spool is not None:
                held = spool.stats()
                result.update({
                    "events dropped: the spool was full": held.dropped_full,
                    "damaged spool records skipped": held.dropped_corrupt,
                    "events the spool could not write (kept in the ring)": held.write_errors,
                })
            return result

        return cls(totals)

    def report(self, last_failure: str | None = None) -> None:
        """Log each reason whose count grew, unless it was logged less than REPORT_INTERVAL
        ago; `last_failure` (the collector's latest) goes with the collector's."""
        now = time.monotonic()
        for reason, current in self.totals().items():
            if now < self._next[reason]:
                continue
            grown = current - self._logged[reason]
            if grown <= 0:
                continue
            self._logged[reason] = current
            self._next[reason] = now + REPORT_INTERVAL
            detail = f"; the latest: {last_failure}" if reason == COLLECTOR_FAILURES else ""
            logger.warning("moesif_fast shipper: %d %s since the last report (%d in all)%s",
                           grown, reason, current, detail)
