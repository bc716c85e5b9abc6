"""Fixtures shared by the benchmarks, and a summary of their results after pytest-benchmark's
table (for results that are not one timing, such as the gunicorn ratios)."""

import os
import tempfile
from collections.abc import Callable, Iterator

import psutil
import pytest

from moesif_fast import ringfile
from moesif_fast.demo.run import start_collector, stop
from moesif_fast.ringbuffer import Geometry, Reader, RingFile
from moesif_fast.settings import MoesifOptions

_SUMMARY = pytest.StashKey[list[str]]()
COLLECTOR_NICE = 19


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add a line to the summary printed at the end of the run."""
    return request.config.stash.setdefault(_SUMMARY, []).append


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    for line in config.stash.get(_SUMMARY, []):
        terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def collector_url() -> Iterator[str]:
    """The local collector, as a process of its own (it must not share the benchmark's GIL)."""
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_collector(directory)
        yield url
        stop(process)


@pytest.fixture(scope="module")
def ring_reader() -> Iterator[Reader]:
    """A ring this process's captures append to (as under the gunicorn hooks), and its reader;
    the benchmarks drain it outside the timed region. On tmpfs, where rings live by default:
    a ring file on a disk file system is written back by the kernel and write-faulted again."""
    with tempfile.TemporaryDirectory(dir=MoesifOptions().ring_dir) as directory:
        ring = RingFile.create(os.path.join(directory, "bench.ring"),
                               Geometry.for_size(16 << 20, 4, 1_000_000))
        os.environ[ringfile.RING_ENV] = ring.path
        reader = Reader(ring)
        yield reader
        reader.close()
        del os.environ[ringfile.RING_ENV]


@pytest.fixture(scope="module")
def niced_collector() -> Iterator[tuple[str, str, psutil.Process]]:
    """The local collector at nice 19, standing in for Moesif's servers, whose work is not on
    the host at all (so that it takes as little as it can of the CPU time the server wants):
    its URL, database and process."""
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_collector(directory)
        collector = psutil.Process(process.pid)
        for thread in collector.threads():  # new threads inherit it
            os.setpriority(os.PRIO_PROCESS, thread.id, COLLECTOR_NICE)
        yield url, os.path.join(directory, "collector.sqlite3"), collector
        stop(process)
