"""Fixtures shared by the benchmarks."""

import os
import tempfile
from collections.abc import Iterator

import pytest

from moesif_fast import ringfile
from moesif_fast.demo.run import start_collector, stop
from moesif_fast.ringbuffer import Geometry, Reader, RingFile


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
    the benchmarks drain it outside the timed region."""
    with tempfile.TemporaryDirectory() as directory:
        ring = RingFile.create(os.path.join(directory, "bench.ring"),
                               Geometry.for_size(16 << 20, 4, 1_000_000))
        os.environ[ringfile.RING_ENV] = ring.path
        reader = Reader(ring)
        yield reader
        reader.close()
        del os.environ[ringfile.RING_ENV]
