"""What a fresh interpreter prints with MOESIF_FAST_PURE_PYTHON=1 and without it: the tests
of each compiled extension check with it that the variable leaves the extension unimported."""

from __future__ import annotations

import os
import subprocess
import sys

from moesif_fast import PURE_PYTHON_ENV


def printed_forced_and_default(code: str) -> tuple[list[str], list[str]]:
    """The words `python -c code` prints with the variable set to 1, then with it unset."""
    environment = {key: value for key, value in os.environ.items() if key != PURE_PYTHON_ENV}
    outputs = []
    for forced in (True, False):
        run_environment = dict(environment, **{PURE_PYTHON_ENV: "1"}) if forced else environment
        outputs.append(subprocess.run([sys.executable, "-c", code], env=run_environment,
                                      check=True, capture_output=True, text=True,
                                      timeout=60).stdout.split())
    return outputs[0], outputs[1]
