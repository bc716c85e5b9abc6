"""Host CPU per request at a paced load: what capture costs the server's machine, not its speed.

The example API under gunicorn (2 sync workers, `-c python:moesif_fast.gunicorn`), with Django's
session and authentication middleware in front of the view as in an ordinary project (settings
written to a temporary folder: the demo's settings, `django.contrib.sessions` installed, and
`SessionMiddleware` and `AuthenticationMiddleware` before the capture middleware, which is last
as the reference's README places it; the clients send no session cookie, so the user is
anonymous). A 1 KB JSON POST per request, a new connection per request (sync workers close
them), from LOAD_PROCESSES separate load processes of THREADS_PER_PROCESS threads each: an open
loop that starts request j at t0 + j / RATE whatever the answers do (a free thread takes the
next slot and sleeps until it is due), so the load is paced, not saturating.

Four servers run at once, idle but for the one under load: without capture (no middleware,
MOESIF_DEMO_CAPTURE=0, and a gunicorn config without the hooks, so no ring, supervisor or
shipper either: the hooks would start an idle shipper even without the middleware), and with
it at BATCH_SIZE 25 (the reference's default), 250 and 1000 (set through MOESIF_DEMO_OPTIONS,
which the demo settings merge into MOESIF_MIDDLEWARE). Each cycle's rounds alternate: without,
25, without, 250, without, 1000; each round is ROUND_S seconds of load, after a warm-up round
per server that is not counted. The ring lives in a temporary folder on tmpfs (where rings live
by default), the spool in one on disk. The servers inherit the benchmark's environment (e.g.
MOESIF_FAST_PURE_PYTHON=1 for the pure-Python path).

Measured per round: the CPU (user + system) of the whole gunicorn process tree of the server
under load (arbiter, workers, the shipper's supervisor and the shipper: the sum over the tree
at the end minus at the start, each live process read from its CPU clock to the nanosecond,
children's counters from psutil included, so a process that exited during the round is still
counted through its parent), per answered request; and, split,
the workers' CPU per request and the shipper's CPU per event. Not counted: the local collector,
which stands in for Moesif's servers (not on the host at all) and runs at nice 19; the load
processes; the other, idle servers.

After each capture round the benchmark waits, untimed, until the collector holds an event of
every answered request of the round (matched by a request id in the query string); at the end
it asserts exactly one event per answered request: none delivered twice, and no event arriving
in a later round (the shipper delivers at least once: a batch it spooled while its POST was
under way can arrive twice; each round reports those, and the records that went through the
spool). The tree's CPU is read after that wait, so the shipper's work for the round's last
events is counted (for a round without capture it is read when the load ends). A round held
the pace if it answered at least PACED_RATE_SHARE of RATE per second and at most
PACED_LATE_SHARE of its requests started more than LATE_S after their slot; otherwise the
machine (2 cores shared with other work, here) was saturated, and the round says so. Reported:
each round, and per server the median round: CPU µs per request, the ratio with capture over
without, the workers' µs per request and the shipper's µs per event. Also, per capture server,
the median of its paired ratios: each capture round's CPU per request over the mean of the
rounds without capture just before and just after it, which cancels the drift of a shared
machine over the run (rounds without capture were seen to range from 507 to 781 µs in one run)
better than the ratio of medians. No timing is asserted.

    .venv/bin/python -m pytest benchmarks/bench_paced.py --benchmark-only -s

Environment: MOESIF_BENCH_PACED_S (seconds per round, default 10), MOESIF_BENCH_PACED_CYCLES
(default 3; each cycle has 3 rounds without capture and one per BATCH_SIZE), and
MOESIF_BENCH_PACED_RATE (requests/s, default 1650). A quick run:

    MOESIF_BENCH_PACED_S=3 MOESIF_BENCH_PACED_CYCLES=2 \\
        .venv/bin/python -m pytest benchmarks/bench_paced.py --benchmark-only -s

The benchmark's own row is one cycle; the results are printed (-s), in extra_info and in the
summary after the table.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
from paired import paired_ratios

from moesif_fast.collector import read_events, read_stats
from moesif_fast.demo.run import start_gunicorn, stop
from moesif_fast.settings import MoesifOptions

RATE = float(os.environ.get("MOESIF_BENCH_PACED_RATE", "1650"))
ROUND_S = float(os.environ.get("MOESIF_BENCH_PACED_S", "10"))
CYCLES = int(os.environ.get("MOESIF_BENCH_PACED_CYCLES", "3"))
WARM_UP_S = 2.0
WORKERS = 2
LOAD_PROCESSES = 2
THREADS_PER_PROCESS = 8
LATE_S = 0.005  # a request that starts later than this after its slot counts as late
PACED_RATE_SHARE = 0.99  # a round held the pace if it answered at least this share of RATE/s
PACED_LATE_SHARE = 0.05  # and no more than this share of its requests started late
BODY = json.dumps({"user": "ada", "note": "x" * 960}).encode()
REQUEST_ID_PARAMETER = "rid"
DELIVERY_TIMEOUT = 300.0  # a failure, not a timing: the wait itself is untimed
STOP_TIMEOUT = 120.0

WITHOUT = "without capture"
SERVERS: dict[str, dict[str, object] | None] = {  # name: MOESIF_MIDDLEWARE options, or none
    WITHOUT: None,
    "BATCH_SIZE 25": {"BATCH_SIZE": 25},
    "BATCH_SIZE 250": {"BATCH_SIZE": 250},
    "BATCH_SIZE 1000": {"BATCH_SIZE": 1000},
}
CAPTURE = [name for name, options in SERVERS.items() if options is not None]
REFERENCE = "BATCH_SIZE 25"  # "with capture" in the headline ratio: the reference's default
CYCLE = [name for capture in CAPTURE for name in (WITHOUT, capture)]

SETTINGS_MODULE = "bench_paced_settings"
WSGI_MODULE = "bench_paced_wsgi"
SETTINGS_SOURCE = '''"""bench_paced: the demo API with session and authentication middleware."""
from moesif_fast.demo.settings import *  # noqa: F403
from moesif_fast.demo.settings import INSTALLED_APPS, MIDDLEWARE

INSTALLED_APPS = [*INSTALLED_APPS, "django.contrib.sessions"]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    *MIDDLEWARE,
]
'''
WSGI_SOURCE = f'''"""bench_paced: the WSGI entry point (the hooks find the settings here)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{SETTINGS_MODULE}")

application = get_wsgi_application()
'''


# --- load -----------------------------------------------------------------------------------


def request_bytes(host: str, port: int, request_id: str) -> bytes:
    return (f"POST /api/echo?{REQUEST_ID_PARAMETER}={request_id} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nUser-Agent: bench-paced/1.0\r\nAccept: */*\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
            "Connection: close\r\n\r\n").encode() + BODY


def post(host: str, port: int, request_id: str) -> int:
    """One request on a new connection; its status (0 if it failed)."""
    try:
        with socket.create_connection((host, port), timeout=30) as connection:
            connection.sendall(request_bytes(host, port, request_id))
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        head = b"".join(chunks)
        return int(head[9:12]) if head.startswith(b"HTTP/1.") else 0
    except (OSError, ValueError):
        return 0


def pace(url: str, start: float, seconds: float, rate: float, index: int, label: str
         ) -> dict[str, Any]:
    """In a load process: every LOAD_PROCESSES-th slot from `start` (time.monotonic, the same
    clock in every process on Linux) for `seconds`, the slots of this process being index,
    index + LOAD_PROCESSES, ... Returns the answered ids, the failures and the lateness."""
    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    slots = itertools.count()
    lock = threading.Lock()
    answered: list[str] = []
    failed = [0]
    late: list[float] = []
    end = start + seconds

    def sender() -> None:
        while True:
            with lock:
                slot = next(slots)
            due = start + (slot * LOAD_PROCESSES + index) / rate
            if due >= end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                late.append(-delay)
            request_id = f"{label}-{index}-{slot}"
            if post(host, port, request_id) == 201:
                answered.append(request_id)
            else:
                failed[0] += 1

    cpu_before = time.process_time()
    threads = [threading.Thread(target=sender) for _ in range(THREADS_PER_PROCESS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"answered": answered, "failed": failed[0], "late": late,
            "finished": time.monotonic(), "cpu": time.process_time() - cpu_before}


def load(url: str, clients: concurrent.futures.ProcessPoolExecutor, seconds: float,
         label: str) -> dict[str, Any]:
    start = time.monotonic() + 0.2
    results = list(clients.map(pace, [url] * LOAD_PROCESSES, [start] * LOAD_PROCESSES,
                               [seconds] * LOAD_PROCESSES, [RATE] * LOAD_PROCESSES,
                               range(LOAD_PROCESSES), [label] * LOAD_PROCESSES))
    late = sorted(delay for result in results for delay in result["late"])
    answered = [rid for result in results for rid in result["answered"]]
    sent = len(answered) + sum(result["failed"] for result in results)
    return {"answered": answered, "failed": sum(result["failed"] for result in results),
            "elapsed": max(result["finished"] for result in results) - start,
            "late_share": sum(delay > LATE_S for delay in late) / max(sent, 1),
            "late_max_ms": 1000 * late[-1] if late else 0.0,
            "client_cpu_us": 1e6 * sum(result["cpu"] for result in results) / max(sent, 1)}


# --- CPU of a process tree ------------------------------------------------------------------


def role_of(process: psutil.Process, root: int) -> str:
    command = " ".join(process.cmdline())
    if process.pid == root:
        return "arbiter"
    if "moesif_fast supervise" in command:
        return "supervisor"
    if "moesif_fast ship" in command:
        return "shipper"
    if process.ppid() == root and "gunicorn" in command:
        return "workers"
    return "other"


@dataclass
class Snapshot:
    """Per process of a tree: its role, its own CPU seconds, and its reaped children's."""

    own: dict[int, float] = field(default_factory=dict)
    reaped: dict[int, float] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)


def own_cpu_seconds(pid: int, times: Any) -> float:
    """CPU seconds (user + system) the live process `pid` used, all its threads, those that
    ended included: read from its CPU clock to the nanosecond where Linux lets us (the clock id
    clock_getcpuclockid(3) gives: glibc's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)), else
    psutil's `times`, counted in clock ticks of 10 ms, which is 0.6 µs per event in a 10 s round
    at 1,650 requests/s: as large as the differences this benchmark is run to see."""
    if sys.platform == "linux":
        try:
            return time.clock_gettime(((~pid) << 3) | 2)
        except OSError:  # gone, or not ours
            pass
    return times.user + times.system


def snapshot(root: int) -> Snapshot:
    taken = Snapshot()
    top = psutil.Process(root)
    for process in [top, *top.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                role = role_of(process, root)
        except psutil.NoSuchProcess:
            continue  # exited just now: its parent's children counters will have it
        taken.own[process.pid] = own_cpu_seconds(process.pid, times)
        taken.reaped[process.pid] = times.children_user + times.children_system
        taken.roles[process.pid] = role
    return taken


def cpu_between(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds per role between two snapshots, and "total": the sum over the tree of own +
    reaped children's, after minus before (a process that exited in between is in its
    parent's children counters once reaped, with the CPU it had before, subtracted here)."""
    total = (sum(after.own.values()) + sum(after.reaped.values())
             - sum(before.own.values()) - sum(before.reaped.values()))
    per_role: dict[str, float] = {"arbiter": 0.0, "workers": 0.0, "supervisor": 0.0,
                                  "shipper": 0.0, "other": 0.0}
    for pid, role in after.roles.items():
        per_role[role] += after.own[pid] - before.own.get(pid, 0.0)
    per_role["total"] = total
    per_role["changed"] = float(set(before.roles) != set(after.roles))
    return per_role


def machine_busy() -> float:
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq + times.steal


def spooled(ring_dir: str) -> int:
    """Records the shipper of the ring in `ring_dir` has appended to its spool so far."""
    completed = subprocess.run(
        [sys.executable, "-m", "moesif_fast", "stats", "--dir", ring_dir, "--json"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (ring,) = json.loads(completed.stdout)
    return ((ring["shipper"] or {}).get("spool") or {}).get("appended", 0)


# --- collector ------------------------------------------------------------------------------


def events_of(db_path: str, since_id: int) -> dict[str, int]:
    """Request id: number of events, for the events stored after `since_id`."""
    counts: dict[str, int] = {}
    for event in read_events(db_path, since_id):
        query = parse_qs(urlsplit(event["request"]["uri"]).query)
        request_id = query.get(REQUEST_ID_PARAMETER, [""])[0]
        counts[request_id] = counts.get(request_id, 0) + 1
    return counts


@pytest.fixture(scope="module")
def clients() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(LOAD_PROCESSES) as pool:
        yield pool


# --- the benchmark --------------------------------------------------------------------------


def test_paced_host_cpu(benchmark, niced_collector: tuple[str, str, psutil.Process], clients,
                        report: Callable[[str], None]) -> None:
    collector_url, db_path, collector = niced_collector
    roots: dict[str, int] = {}
    ring_dirs: dict[str, str] = {}
    urls: dict[str, str] = {}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    in_order: list[tuple[str, float]] = []  # (server, tree µs per request) of every round
    labels = (f"r{number}" for number in itertools.count())
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    def round_of(name: str, seconds: float) -> dict[str, Any]:
        label = next(labels)
        since_id = read_stats(db_path)["events"]
        busy_before, wall_before = machine_busy(), time.monotonic()
        idle_before = {other: snapshot(root) for other, root in roots.items() if other != name}
        collector_before = collector.cpu_times()
        spooled_before = spooled(ring_dirs[name]) if SERVERS[name] is not None else 0
        before = snapshot(roots[name])
        loaded = load(urls[name], clients, seconds, label)
        at_load_end = snapshot(roots[name])
        wall = time.monotonic() - wall_before
        busy = (machine_busy() - busy_before) / wall
        idle = sum(cpu_between(idle_before[other], snapshot(roots[other]))["total"]
                   for other in idle_before) / wall
        collector_after = collector.cpu_times()
        collector_cpu = (collector_after.user + collector_after.system
                         - collector_before.user - collector_before.system)
        answered = loaded["answered"]
        count = len(answered)
        result: dict[str, Any] = {
            "label": label, "answered": count, "failed": loaded["failed"],
            "rate": count / loaded["elapsed"], "late_share": loaded["late_share"],
            "late_max_ms": loaded["late_max_ms"], "client_cpu_us": loaded["client_cpu_us"],
            "machine_busy_cores": busy, "idle_servers_cores": idle,
            "paced": (count / loaded["elapsed"] >= PACED_RATE_SHARE * RATE
                      and loaded["late_share"] <= PACED_LATE_SHARE),
            "collector_us_per_request": 1e6 * collector_cpu / count,
            "others_cores": busy - idle - collector_cpu / wall
            - (cpu_between(before, at_load_end)["total"]
               + loaded["client_cpu_us"] * (count + loaded["failed"]) / 1e6) / wall}
        after = at_load_end
        if SERVERS[name] is not None:
            result["undelivered_at_load_end"] = max(  # at least (duplicates count as events)
                0, since_id + count - read_stats(db_path)["events"])
            waited = time.monotonic()
            expected = set(answered)
            while True:  # untimed: until every answered request has an event
                if read_stats(db_path)["events"] >= since_id + count:
                    events = events_of(db_path, since_id)
                    if expected <= events.keys():
                        break
                assert time.monotonic() - waited < DELIVERY_TIMEOUT, \
                    f"the shipper did not deliver round {label}'s events"
                time.sleep(0.05)
            result["delivery_wait_s"] = time.monotonic() - waited
            after = snapshot(roots[name])
            result["delivered"] = sum(events[rid] for rid in answered)
            result["spooled"] = spooled(ring_dirs[name]) - spooled_before
        else:
            events = events_of(db_path, since_id)
            expected = set()
        result["delivered_twice"] = sum(events.get(rid, 0) - 1 for rid in answered
                                        if events.get(rid, 0) > 1)
        result["stray_events"] = sum(number for rid, number in events.items()
                                     if rid not in expected)  # a late duplicate, say
        cpu = cpu_between(before, after)
        result["cpu_changed_tree"] = bool(cpu.pop("changed"))
        result["cpu_s"] = cpu
        result["tree_us_per_request"] = 1e6 * cpu["total"] / count
        result["workers_us_per_request"] = 1e6 * cpu["workers"] / count
        result["shipper_us_per_event"] = 1e6 * cpu["shipper"] / count
        result["shipper_us_per_event_at_load_end"] = \
            1e6 * cpu_between(before, at_load_end)["shipper"] / count
        return result

    def describe(name: str, result: dict[str, Any]) -> str:
        cpu = result["cpu_s"]
        text = (f"{name:>15} {result['label']:>4}: {result['answered']:,} answered "
                f"({result['failed']} failed) at {result['rate']:,.0f}/s, "
                f"{100 * result['late_share']:.1f}% started >{1000 * LATE_S:.0f} ms late "
                f"(most {result['late_max_ms']:.0f} ms); machine busy "
                f"{result['machine_busy_cores']:.2f} cores (other tenants "
                f"{result['others_cores']:.2f}, idle servers {result['idle_servers_cores']:.2f}, "
                f"clients {result['client_cpu_us']:.0f} µs/request) | tree "
                f"{result['tree_us_per_request']:.0f} µs/request: workers "
                f"{result['workers_us_per_request']:.0f}, arbiter "
                f"{1e6 * cpu['arbiter'] / result['answered']:.1f}")
        if SERVERS[name] is not None:
            text += (f", supervisor {1e6 * cpu['supervisor'] / result['answered']:.1f}, "
                     f"shipper {result['shipper_us_per_event']:.1f} µs/event; "
                     f"{result['undelivered_at_load_end']} undelivered at load end, "
                     f"waited untimed {result['delivery_wait_s']:.2f} s; {result['delivered']:,} "
                     f"events of answered requests delivered, {result['delivered_twice']} of "
                     f"them twice; {result['spooled']} records through the spool")
        if result["stray_events"]:
            text += f"; {result['stray_events']} events of requests of other rounds arrived"
        if not result["paced"]:
            text += " [the pace did not hold: the machine was saturated]"
        if result["cpu_changed_tree"]:
            text += " [the process tree changed during the round]"
        return text

    def cycle() -> None:
        for name in CYCLE:
            result = round_of(name, ROUND_S)
            rounds[name].append(result)
            in_order.append((name, result["tree_us_per_request"]))
            say(describe(name, result))

    say(f"paced load {RATE:,.0f} requests/s, {ROUND_S:g} s rounds, {CYCLES} cycle(s) of "
        f"{', '.join(CYCLE)}; {os.cpu_count()} CPUs, load average at start "
        f"{os.getloadavg()[0]:.2f}; after each capture round an untimed wait until every event "
        "is delivered (the tree's CPU is read after it)")
    with tempfile.TemporaryDirectory(prefix="bench-paced-") as directory, \
            tempfile.TemporaryDirectory(prefix="bench-paced-",
                                        dir=MoesifOptions().ring_dir) as rings:
        with open(os.path.join(directory, SETTINGS_MODULE + ".py"), "w") as file:
            file.write(SETTINGS_SOURCE)
        with open(os.path.join(directory, WSGI_MODULE + ".py"), "w") as file:
            file.write(WSGI_SOURCE)
        plain_config = os.path.join(directory, "plain_gunicorn_conf.py")
        with open(plain_config, "w") as file:
            file.write('"""bench_paced: gunicorn without the moesif_fast hooks."""\n')
        servers = []
        try:
            for number, (name, options) in enumerate(SERVERS.items()):
                server_directory = os.path.join(directory, str(number))
                ring_directory = os.path.join(rings, str(number))
                os.mkdir(server_directory, 0o700)
                os.mkdir(ring_directory, 0o700)
                os.environ["MOESIF_DEMO_CAPTURE"] = "0" if options is None else "1"
                try:
                    server, urls[name] = start_gunicorn(
                        server_directory, collector_url, workers=WORKERS, app=WSGI_MODULE,
                        extra_args=["--pythonpath", directory],
                        config=None if options is not None else plain_config,
                        options={"RING_DIR": ring_directory, "SPOOL_DIR": server_directory,
                                 **(options or {})})
                finally:
                    del os.environ["MOESIF_DEMO_CAPTURE"]
                servers.append(server)
                roots[name] = server.pid
                ring_dirs[name] = ring_directory
            for name in SERVERS:  # warm-up, not counted (Django's first requests, config)
                round_of(name, WARM_UP_S)
            for name, root in roots.items():
                roles = snapshot(root).roles.values()
                expected = {"arbiter": 1, "workers": WORKERS, "other": 0,
                            "supervisor": int(SERVERS[name] is not None),
                            "shipper": int(SERVERS[name] is not None)}
                found = {role: sum(1 for each in roles if each == role) for role in expected}
                assert found == expected, f"{name}: process tree {found}"
            benchmark.pedantic(cycle, rounds=CYCLES, iterations=1)
        finally:
            exit_codes = [stop(server, STOP_TIMEOUT) for server in servers]
    assert exit_codes == [0] * len(servers), exit_codes

    def median(name: str, key: str) -> float:
        return statistics.median(result[key] for result in rounds[name])

    baseline = median(WITHOUT, "tree_us_per_request")
    paired = paired_ratios(in_order, WITHOUT)
    summary: dict[str, Any] = {}
    say(f"medians of the rounds ({sys.implementation.name} {sys.version.split()[0]}):")
    for name in SERVERS:
        tree = median(name, "tree_us_per_request")
        entry = {"tree_us_per_request": round(tree, 1), "ratio": round(tree / baseline, 3),
                 "workers_us_per_request": round(median(name, "workers_us_per_request"), 1),
                 "rounds_tree_us_per_request": [round(r["tree_us_per_request"], 1)
                                                for r in rounds[name]],
                 "requests_per_second": round(median(name, "rate")),
                 "late_share": round(median(name, "late_share"), 4),
                 "client_cpu_us_per_request": round(median(name, "client_cpu_us"), 1),
                 "machine_busy_cores": round(median(name, "machine_busy_cores"), 2),
                 "other_tenants_cores": round(median(name, "others_cores"), 2),
                 "rounds_paced": sum(result["paced"] for result in rounds[name])}
        line = (f"  {name:>15}: {tree:.0f} µs/request ({tree / baseline:.2f}× without; "
                f"{entry['rounds_paced']} of {len(rounds[name])} rounds held the pace), "
                f"workers {entry['workers_us_per_request']:.0f} µs/request")
        if SERVERS[name] is not None:
            entry["shipper_us_per_event"] = round(median(name, "shipper_us_per_event"), 1)
            entry["added_us_per_request"] = round(tree - baseline, 1)
            entry["paired_ratio"] = round(statistics.median(paired[name]), 3)
            entry["paired_ratios"] = [round(ratio, 3) for ratio in paired[name]]
            entry["workers_added_us_per_request"] = round(
                entry["workers_us_per_request"] - median(WITHOUT, "workers_us_per_request"), 1)
            line += (f" (+{entry['workers_added_us_per_request']:.0f}), shipper "
                     f"{entry['shipper_us_per_event']:.1f} µs/event; +{tree - baseline:.0f} "
                     f"µs/request in all; paired with the rounds without capture beside them: "
                     f"{entry['paired_ratio']:.2f}× (rounds: "
                     f"{', '.join(f'{ratio:.2f}' for ratio in paired[name])})")
        summary[name] = entry
        say(line)
    benchmark.extra_info.update(
        rate=RATE, round_s=ROUND_S, cycles=CYCLES, medians=summary,
        rounds={name: [{key: value for key, value in result.items() if key != "cpu_s"}
                       | {"cpu_s": {k: round(v, 3) for k, v in result["cpu_s"].items()}}
                       for result in results] for name, results in rounds.items()})
    for line in lines[-len(SERVERS) - 1:]:
        report("paced " + line.strip())
    twice = {name: [r["delivered_twice"] for r in results] for name, results in rounds.items()}
    stray = {name: [r["stray_events"] for r in results] for name, results in rounds.items()}
    if any(map(any, twice.values())) or any(map(any, stray.values())):
        report(f"paced: events delivered twice per round {twice}; events arriving in a later "
               f"round {stray}")
    # Exactly one event per answered request (missing events failed the round already).
    assert not any(map(any, twice.values())), twice
    assert not any(map(any, stray.values())), stray
