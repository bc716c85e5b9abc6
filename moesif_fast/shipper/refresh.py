"""Keeps the config/rules snapshot fresh: fetch `/v1/config` and `/v1/rules`, publish them.

A daemon thread of the shipper fetches both at start and every REFRESH_INTERVAL after the last
refresh (so a new config arrives even when nothing is delivered: W17). A delivered batch whose
response carries an `X-Moesif-Config-ETag` or `X-Moesif-Rules-Tag` other than the one known
brings the next refresh sooner, but never sooner than TAG_REFRESH_SPACING after the previous
one began: whatever tags a collector sends, at most one refresh per TAG_REFRESH_SPACING besides
the poll.

The tags known after a refresh: on one the batch tags brought, the tags that brought it, the
latest ones batch responses carried when it began (moesifdjango keeps the batch response's
rules tag and ignores the rules response's headers, protocol §1.3), else the fetch's own; on a
poll, the fetch's own, else those batch tags. So a collector that tags batch responses but not
`GET /v1/rules` costs one refresh, not one per batch.

A failed fetch (401, 404, timeout...) keeps the last good copy of that part, and its known tag;
with none, workers keep the defaults. A refresh that brings what is published already (config,
rules and tags) does not publish it again, so workers do not re-read it; a published snapshot
that cannot be read is replaced by the next fetch. An unexpected error in a refresh is logged
and the thread goes on: it never dies with the shipper still running.
"""

from __future__ import annotations

import logging
import threading
import time

from ..snapshot import Snapshot, SnapshotError, publish, read
from .transport import CollectorTransport, Stop

logger = logging.getLogger("moesif_fast.shipper")

REFRESH_INTERVAL = 60.0
TAG_REFRESH_SPACING = 10.0  # seconds from one refresh's start to a tag-brought one's
FETCH_TIMEOUT = 15.0  # seconds one fetch (with its retries) may take


class PolicyRefresher:
    def __init__(self, transport: CollectorTransport, snapshot_path: str) -> None:
        self.transport = transport
        self.snapshot_path = snapshot_path
        previous = self._previous()
        self.config_etag = previous.config_etag if previous else None  # the known tags
        self.rules_tag = previous.rules_tag if previous else None
        self._batch_tags: tuple[str | None, str | None] = (None, None)  # the latest seen
        self._wake = threading.Event()
        self._stop = Stop()
        threading.Thread(target=self._run, name="moesif-policy", daemon=True).start()

    def notice_tags(self, config_etag: str | None, rules_tag: str | None) -> None:
        """Called with the tags of each delivered batch's response: refresh soon if either
        differs from the one known."""
        seen_config, seen_rules = self._batch_tags
        self._batch_tags = (config_etag or seen_config, rules_tag or seen_rules)
        if self._tags_changed():
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _tags_changed(self) -> bool:
        config_etag, rules_tag = self._batch_tags
        return (config_etag is not None and config_etag != self.config_etag) or \
            (rules_tag is not None and rules_tag != self.rules_tag)

    def _run(self) -> None:
        by_tags = False
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._refresh(by_tags)
            except Exception:
                logger.exception("moesif_fast shipper: refreshing config and rules failed; "
                                 "trying again in %.0f s", REFRESH_INTERVAL)
            by_tags = self._wait_for_next(began)

    def _wait_for_next(self, began: float) -> bool:
        """Wait until the next refresh is due (or stop): True when batch tags brought it,
        False for the poll."""
        poll_at = time.monotonic() + REFRESH_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= poll_at:
                return False
            if self._tags_changed():
                self._stop.wait(max(0.0, min(poll_at, began + TAG_REFRESH_SPACING) - now))
                return True
            self._wake.wait(poll_at - now)
            self._wake.clear()
        return False

    def _previous(self) -> Snapshot | None:
        """The published snapshot, or None when there is none or it cannot be read."""
        try:
            return read(self.snapshot_path)
        except SnapshotError as error:
            logger.warning("moesif_fast shipper: ignoring the published snapshot (%s); the "
                           "next fetch replaces it", error)
            return None

    def _refresh(self, by_tags: bool) -> None:
        """Fetch both; publish what arrived, keeping the last good copy of what did not (a
        collector without /v1/rules must not hold back config changes)."""
        batch_config_etag, batch_rules_tag = self._batch_tags
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
            self.config_etag = _known_tag(by_tags, batch_config_etag, config_outcome.config_etag)
        else:
            config = previous.config if previous else None
        if rules_outcome.delivered:
            self.rules_tag = _known_tag(by_tags, batch_rules_tag, rules_outcome.rules_tag)
        else:
            rules = previous.rules if previous else None
        fresh = Snapshot(config, rules, self.config_etag, self.rules_tag, time.time_ns())
        if previous is None or not fresh.same_content(previous):
            publish(self.snapshot_path, fresh)


def _known_tag(by_tags: bool, batch_tag: str | None, fetched_tag: str | None) -> str | None:
    """The tag known after a successful fetch (see the module docstring)."""
    return (batch_tag or fetched_tag) if by_tags else (fetched_tag or batch_tag)
