"""moesif_fast: Moesif API analytics for Django, built for multi-process servers."""

import importlib
import os
from types import ModuleType

__version__ = "0.1.0"

PURE_PYTHON_ENV = "MOESIF_FAST_PURE_PYTHON"
PURE_PYTHON = os.environ.get(PURE_PYTHON_ENV) == "1"
"""With MOESIF_FAST_PURE_PYTHON=1 no compiled extension is used: the pure-Python code, which
is the reference, runs everywhere (docs/compiled.md)."""


def compiled(module: str) -> ModuleType | None:
    """The compiled extension `moesif_fast.<module>`, or None when MOESIF_FAST_PURE_PYTHON=1
    or it is not built (no compiler at install time): the caller then runs its Python path."""
    if PURE_PYTHON:
        return None
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ImportError:
        return None
