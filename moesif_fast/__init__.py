"""moesif_fast: Moesif API analytics for Django, built for multi-process servers."""

import os

__version__ = "0.1.0"

PURE_PYTHON_ENV = "MOESIF_FAST_PURE_PYTHON"
PURE_PYTHON = os.environ.get(PURE_PYTHON_ENV) == "1"
"""With MOESIF_FAST_PURE_PYTHON=1 no compiled extension is used: the pure-Python code, which
is the reference, runs everywhere (docs/compiled.md)."""
