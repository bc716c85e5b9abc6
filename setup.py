"""Build of the optional compiled fast paths (the project's metadata is in pyproject.toml).

Each extension needs only gcc and the Python headers. It is optional: where it cannot be built,
`pip install` goes on without it and the pure-Python implementation, which is the reference,
runs instead. MOESIF_FAST_PURE_PYTHON=1 forces the pure-Python implementation at run time.
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-std=c99", "-Wall", "-Wextra"]
BUFFER_HEADER = "moesif_fast/_buffer.h"
LANE_HEADER = "moesif_fast/ringbuffer/_lane.h"


def extension(module: str, depends: tuple[str, ...] = ()) -> Extension:
    """The optional extension `module` from the C file of the same path."""
    return Extension(module, [module.replace(".", "/") + ".c"], depends=list(depends),
                     optional=True, extra_compile_args=COMPILE_ARGS)


setup(ext_modules=[
    extension("moesif_fast._eventjson", (BUFFER_HEADER,)),
    extension("moesif_fast._recordpack", (BUFFER_HEADER, LANE_HEADER)),
    extension("moesif_fast._recorddecode"),
    extension("moesif_fast.ringbuffer._lane", (LANE_HEADER,)),
])
