"""`python -m moesif_fast stats`: what the ring and its shipper are doing, from any process.

Reads the ring's counters (never writes, so it does not disturb the writers) and the shipper's
published counters next to it, and prints them as text or JSON. It looks only in this user's
private state folder (`ringfile.state_folder`); a file there that cannot be read (not a ring,
not this user's, damaged) is reported as such and the others are still shown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from . import private
from .ringbuffer import RingError, RingFile
from .ringfile import policy_snapshot_path, shipper_stats_path, state_folder
from .shipper.priority import LOW_NICE
from .snapshot import SnapshotError
from .snapshot import read as read_snapshot

MAX_COUNTERS_BYTES = 1 << 20  # the shipper's counters are a few hundred bytes


def find_rings(directory: str) -> list[str]:
    """The ring files in this user's state folder in `directory` (RING_DIR). Raises OSError
    (`private.UnsafePathError`) when that folder is not this user's alone."""
    folder = state_folder(directory)
    try:
        private.check_folder(folder)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith(".ring"))


def collect(path: str) -> dict[str, Any]:
    """Ring and shipper counters of the ring at `path`, as plain data."""
    ring = RingFile.attach(path)
    try:
        stats = ring.stats()
    finally:
        ring.close()
    try:
        shipper = json.loads(private.read_file(shipper_stats_path(path), MAX_COUNTERS_BYTES))
    except (OSError, ValueError, RecursionError):
        shipper = None
    if type(shipper) is not dict:
        shipper = None
    lanes = [dict(asdict(lane), records_in_use=lane.records_in_use) for lane in stats.lanes]
    try:
        snapshot = read_snapshot(policy_snapshot_path(path))
    except SnapshotError:
        snapshot = None
    return {
        "ring": path,
        "capacity_bytes": stats.capacity,
        "lane_capacity": stats.lane_capacity,
        "max_record": stats.max_record,
        "bytes_in_use": stats.bytes_in_use,
        "records_in_use": stats.records_in_use,
        "appended": stats.appended,
        "dropped": stats.dropped,
        "committed": stats.committed_records,
        "reader_pid": stats.reader_pid,
        "reader_heartbeat_age_s": _age(stats.reader_heartbeat_ns),
        "lanes": lanes,
        "shipper": shipper,
        "policy": None if snapshot is None else {
            "age_s": _age(snapshot.fetched_ns), "config_etag": snapshot.config_etag,
            "rules_tag": snapshot.rules_tag,
            "rules": len(snapshot.rules) if isinstance(snapshot.rules, list) else 0},
    }


def render(report: dict[str, Any]) -> str:
    lanes = report["lanes"]
    lines = [
        f"ring {report['ring']}",
        f"  {len(lanes)} lanes x {report['lane_capacity'] >> 10} KiB (last one shared), "
        f"largest event {report['max_record'] >> 10} KiB",
        f"  held now    {report['records_in_use']} events, {report['bytes_in_use'] >> 10} KiB "
        f"({100 * report['bytes_in_use'] / report['capacity_bytes']:.1f} % full)",
        f"  appended    {report['appended']}   committed {report['committed']}   "
        f"dropped {report['dropped']} (full {_sum(lanes, 'dropped_full')}, too large "
        f"{_sum(lanes, 'dropped_oversize')}, busy {_sum(lanes, 'dropped_busy')})   "
        f"corrupt resets {_sum(lanes, 'corrupt_resets')}",
        f"  reader      pid {report['reader_pid']}, heartbeat "
        f"{_seconds(report['reader_heartbeat_age_s'])} ago",
    ]
    shipper = report["shipper"]
    if shipper:
        lines.append(
            f"  shipper     pid {shipper['pid']}: delivered {shipper['delivered']}, refused "
            f"{shipper['refused']}, undecodable {shipper['undecodable']}, poison "
            f"{shipper.get('poison', 0)}, masked out "
            f"{shipper['masked_out']}, build errors {shipper['build_errors']}, in flight "
            f"{shipper['in_flight']} batches; last delivery "
            f"{_seconds(_age(shipper['last_delivery_ns']))} ago; counters "
            f"{_seconds(_age(shipper['heartbeat_ns']))} old")
        lines.append("  priority    " + (
            "the process's own: catching up (the ring passed half full)"
            if shipper.get("catching_up") else f"below the workers' (nice {LOW_NICE}, on Linux)")
            + f"; {shipper.get('catch_ups', 0)} catch-ups so far")
        lines.append(f"  updates     delivered {shipper['updates_delivered']}, refused "
                     f"{shipper['updates_refused']} (users, companies, subscriptions)")
        spool = shipper.get("spool")
        lines.append("  spool       none (SPOOL_BYTES 0, or its folder could not be used: see "
                     "the shipper's log)" if not spool else
                     f"  spool       {spool['records']} events, {spool['bytes'] >> 10} KiB in "
                     f"{spool['segments']} segments, oldest {_seconds(spool['oldest_age_s'])}; "
                     f"dropped: full {spool['dropped_full']}, damaged "
                     f"{spool['dropped_corrupt']}; write errors {spool['write_errors']}")
        if shipper.get("last_error"):
            lines.append(f"  last error  {shipper['last_error']}")
    else:
        lines.append("  shipper     no counters published yet")
    policy = report["policy"]
    lines.append("  config      none fetched yet: sampling everything, blocking nothing"
                 if policy is None else
                 f"  config      fetched {_seconds(policy['age_s'])} ago, config ETag "
                 f"{policy['config_etag']}, rules tag {policy['rules_tag']}, "
                 f"{policy['rules']} governance rules")
    lines.append("  lane  owner pid   appended       held   dropped  corrupt")
    for lane in lanes:
        dropped = lane["dropped_full"] + lane["dropped_oversize"] + lane["dropped_busy"]
        name = "ovf" if lane["overflow"] else str(lane["lane"])
        lines.append(f"  {name:>4}  {lane['owner_pid']:>9}  {lane['appended']:>9}  "
                     f"{lane['records_in_use']:>9}  {dropped:>8}  {lane['corrupt_resets']:>7}")
    return "\n".join(lines)


def main(paths: list[str], directory: str, as_json: bool) -> int:
    """Print the report of each ring; 1 if there was none, or one could not be read."""
    try:
        paths = paths or find_rings(directory)
    except OSError as error:
        print(f"cannot look for rings: {error}", file=sys.stderr)
        return 1
    if not paths:
        print(f"no moesif_fast ring in {state_folder(directory)} (is the server running? see "
              "--dir)", file=sys.stderr)
        return 1
    reports, failed = [], False
    for path in paths:
        try:
            reports.append(collect(path))
        except (OSError, RingError) as error:
            print(f"{path}: not shown: {error}", file=sys.stderr)
            failed = True
    if as_json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(render(report) for report in reports))
    return 1 if failed or not reports else 0


def _age(time_ns: int) -> float | None:
    return (time.time_ns() - time_ns) / 1e9 if time_ns else None


def _seconds(age: float | None) -> str:
    return "never" if age is None else f"{age:.1f} s"


def _sum(lanes: list[dict[str, Any]], key: str) -> int:
    return sum(lane[key] for lane in lanes)
