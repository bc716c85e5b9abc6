"""The compiled parts are optional: the suites that exercise them in process pass again with
MOESIF_FAST_PURE_PYTHON=1, in a pytest of their own (the variable is read at import).

The end-to-end suites (real servers) run the compiled path only: they exercise the same
encoder code as these, and running them twice would double the CI run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesif_fast import PURE_PYTHON, PURE_PYTHON_ENV

IN_PROCESS_SUITES = ["test_event.py", "test_eventjson.py", "test_compat.py", "test_record.py",
                     "test_outgoing.py", "test_platform.py", "test_middleware.py",
                     "test_entities.py", "test_priority.py", "test_recorddecode.py",
                     "test_ringbuffer.py", "test_capture_record.py", "test_worker_cost.py"]


@pytest.mark.skipif(PURE_PYTHON, reason="this whole run is pure Python already")
def test_the_in_process_suites_pass_in_pure_python() -> None:
    tests = Path(__file__).parent
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         *(str(tests / suite) for suite in IN_PROCESS_SUITES)],
        env=dict(os.environ, **{PURE_PYTHON_ENV: "1"}), cwd=tests.parent, capture_output=True,
        text=True, timeout=1800, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout
