"""Fixtures shared by the benchmarks."""

import tempfile
from collections.abc import Iterator

import pytest

from moesif_fast.demo.run import start_collector, stop


@pytest.fixture(scope="module")
def collector_url() -> Iterator[str]:
    """The local collector, as a process of its own (it must not share the benchmark's GIL)."""
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_collector(directory)
        yield url
        stop(process)
