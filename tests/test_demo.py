"""`python -m moesif_fast demo`, the README's first command, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from moesif_fast.settings import MoesifOptions


def test_demo_delivers_every_request_and_cleans_up() -> None:
    ring_dir = MoesifOptions().ring_dir
    before = set(os.listdir(ring_dir))
    finished = subprocess.run(
        [sys.executable, "-m", "moesif_fast", "demo", "--requests", "300"],
        capture_output=True, text=True, timeout=120,
        env={key: value for key, value in os.environ.items()
             if key not in ("DJANGO_SETTINGS_MODULE", "MOESIF_FAST_RING")})
    assert finished.returncode == 0, finished.stdout + finished.stderr
    counts = dict(re.findall(r"^  (requests sent|requests answered|events captured|"
                             r"events delivered|events dropped|gunicorn exit code) +(\d+)$",
                             finished.stdout, re.MULTILINE))
    assert counts == {"requests sent": "300", "requests answered": "300",
                      "events captured": "300", "events delivered": "300",
                      "events dropped": "0", "gunicorn exit code": "0"}
    assert finished.stdout.rstrip().endswith(
        "every answered request arrived at the collector exactly once")
    left = {name for name in set(os.listdir(ring_dir)) - before
            if name.startswith("moesif-fast-demo-")}
    assert left == set()  # the demo's ring directory is gone
