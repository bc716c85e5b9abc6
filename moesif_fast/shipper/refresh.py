"""Keeps the config/rules snapshot fresh: fetch `/v1/config` and `/v1/rules`, publish them.

A daemon thread of the shipper fetches both at start, again every REFRESH_INTERVAL (so a new
config arrives even when nothing is delivered: W17), and as soon as a batch response carries an
`X-Moesif-Config-ETag` or `X-Moesif-Rules-Tag` different from the published one. A failed fetch
(401, 404, timeout...) keeps the last good copy of that part; with none, workers keep the
defaults. A published snapshot that cannot be read is replaced by the next fetch. An unexpected
error in a refresh is logged and the thread goes on: it never dies with the shipper still
running.
"""

from __future__ import annotations

import logging
import threading
import time

from ..snapshot import Snapshot, SnapshotError, publish, read
from .transport import CollectorTransport

logger = logging.getLogger("moesif_fast.shipper")

REFRESH_INTERVAL = 60.0
FETCH_TIMEOUT = 15.0  # seconds one fetch (with its retries) may take


class PolicyRefresher:
    def __init__(self, transport: CollectorTransport, snapshot_path: str) -> None:
        self.transport = transport
        self.snapshot_path = snapshot_path
        previous = self._previous()
        self.config_etag = previous.config_etag if previous else None
        self.rules_tag = previous.rules_tag if previous else None
        self.fetched_ns = previous.fetched_ns if previous else 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="moesif-policy", daemon=True).start()

    def notice_tags(self, config_etag: str | None, rules_tag: str | None) -> None:
        """Called with the tags of each delivered batch: refresh now if either changed."""
        if (config_etag and config_etag != self.config_etag) or \
                (rules_tag and rules_tag != self.rules_tag):
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._refresh()
            except Exception:
                logger.exception("moesif_fast shipper: refreshing config and rules failed; "
                                 "trying again in %.0f s", REFRESH_INTERVAL)
            self._wake.wait(REFRESH_INTERVAL)
            self._wake.clear()

    def _previous(self) -> Snapshot | None:
        """The published snapshot, or None when there is none or it cannot be read."""
        try:
            return read(self.snapshot_path)
        except SnapshotError as error:
            logger.warning("moesif_fast shipper: ignoring the published snapshot (%s); the "
                           "next fetch replaces it", error)
            return None

    def _refresh(self) -> None:
        """Fetch both; publish what arrived, keeping the last good copy of what did not (a
        collector without /v1/rules must not hold back config changes)."""
        give_up_at = time.monotonic() + FETCH_TIMEOUT
        config_outcome, config = self.transport.get_json("/v1/config", stop=self._stop,
                                                         give_up_at=give_up_at)
        rules_outcome, rules = self.transport.get_json("/v1/rules", stop=self._stop,
                                                       give_up_at=give_up_at)
        previous = self._previous()
        for name, outcome in (("config", config_outcome), ("rules", rules_outcome)):
            if not outcome.delivered:
                logger.warning("moesif_fast shipper: could not fetch %s (%s); keeping the %s",
                               name, outcome.error, "last copy" if previous else "defaults")
        if not (config_outcome.delivered or rules_outcome.delivered):
            return
        if config_outcome.delivered:
            self.config_etag = config_outcome.config_etag
        else:
            config = previous.config if previous else None
        if rules_outcome.delivered:
            self.rules_tag = rules_outcome.rules_tag
        else:
            rules = previous.rules if previous else None
        self.fetched_ns = time.time_ns()
        publish(self.snapshot_path, Snapshot(config, rules, self.config_etag, self.rules_tag,
                                             self.fetched_ns))
