"""What capture adds per request in instructions and cache misses, counted by cachegrind.

Timings of one request with evicted caches swing by tens of microseconds on a shared machine;
cachegrind's simulated caches do not. This runs bench_middleware's call (a 1 KB JSON POST,
1 KB JSON answer) through the view alone and through the view behind the capture middleware,
each with 0 and with REQUESTS requests after a warm-up, EVICT_BYTES written before each request,
under `valgrind --tool=cachegrind` with a simulated 2 MiB last-level cache (this machine's L2
per core), address randomisation off and a fixed hash seed. EVICT_BYTES is twice that cache:
enough to empty it, where bench_middleware's 32 MiB (the real L3) would make each run 8 times
slower under valgrind for the same emptied simulated cache. The
per-request cost of each is (count with REQUESTS - count with 0) / REQUESTS, so start-up is
left out; the ring is not drained and the interpreter not torn down within the count. It
prints, per run, the instructions and last-level misses capture adds over the view alone.

    python benchmarks/cachegrind_capture.py [runs]        # needs valgrind and setarch

Each run takes about a minute per configuration (four per run, two at a time); three runs of
one build agreed within 0.2 % here. Between builds, the layout of memory moves the counts by up
to ~700 instructions and ~10 misses per request (the view alone too, which runs none of the
change): a difference smaller than that says nothing. Not a pytest benchmark: it measures
nothing in time, and CI has no valgrind.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

REQUESTS = 600
WARM_UP = 50
EVICT_BYTES = 4 << 20
LAST_LEVEL = "--LL=2097152,16,64"


def serve(requests: int, capture: bool) -> None:
    """In the measured process: WARM_UP requests, then `requests` with the caches evicted."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["DJANGO_SETTINGS_MODULE"] = "moesif_fast.demo.settings"
    import django

    django.setup()
    import bench_middleware

    from moesif_fast import ringfile
    from moesif_fast.middleware import MoesifMiddleware
    from moesif_fast.ringbuffer import Geometry, RingFile

    folder = tempfile.mkdtemp()
    ring = RingFile.create(os.path.join(folder, "capture.ring"),
                           Geometry.for_size(16 << 20, 4, 1_000_000))  # room for every record
    os.environ[ringfile.RING_ENV] = ring.path
    handler = MoesifMiddleware(bench_middleware.view) if capture else bench_middleware.view
    evictor, lines = bytearray(EVICT_BYTES), b"\1" * (EVICT_BYTES // 64)
    for _ in range(WARM_UP):
        handler(bench_middleware.make_request()[0][0])
    for _ in range(requests):
        request = bench_middleware.make_request()[0][0]
        evictor[::64] = lines
        handler(request)
    os._exit(0)  # no teardown: freeing cold objects at exit would be counted


def counted(requests: int, capture: bool, folder: str) -> dict[str, int]:
    """cachegrind's totals for one process serving `requests`."""
    out = os.path.join(folder, f"cachegrind.{int(capture)}.{requests}")
    subprocess.run(
        ["setarch", os.uname().machine, "-R", "valgrind", "--tool=cachegrind", "--cache-sim=yes",
         LAST_LEVEL, f"--cachegrind-out-file={out}", sys.executable, __file__, "--serve",
         str(requests), str(int(capture))],
        env=dict(os.environ, PYTHONHASHSEED="0"), check=True, capture_output=True)
    with open(out) as totals:
        lines = totals.read().splitlines()
    events = next(line for line in lines if line.startswith("events:")).split()[1:]
    summary = next(line for line in lines if line.startswith("summary:")).split()[1:]
    return dict(zip(events, map(int, summary), strict=True))


def per_request(capture: bool, folder: str) -> tuple[float, float]:
    """Instructions and last-level misses per request."""
    with ThreadPoolExecutor(2) as pool:
        none, many = pool.map(lambda n: counted(n, capture, folder), (0, REQUESTS))
    misses = ("ILmr", "DLmr", "DLmw")
    return ((many["Ir"] - none["Ir"]) / REQUESTS,
            sum(many[kind] - none[kind] for kind in misses) / REQUESTS)


def main(runs: int) -> None:
    added = []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(runs):
            view, captured = per_request(False, folder), per_request(True, folder)
            added.append((captured[0] - view[0], captured[1] - view[1]))
            print(f"run {run + 1}: the view alone {view[0]:,.0f} instructions, {view[1]:,.0f} "
                  f"misses per request; capture adds {added[-1][0]:,.0f} instructions, "
                  f"{added[-1][1]:,.0f} misses")
    print(f"median of {runs}: capture adds {statistics.median(a for a, _ in added):,.0f} "
          f"instructions and {statistics.median(m for _, m in added):,.0f} last-level misses "
          "per request")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]), sys.argv[3] == "1")
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
