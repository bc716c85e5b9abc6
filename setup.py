"""Build of the optional compiled fast paths (the project's metadata is in pyproject.toml).

Each extension needs only gcc and the Python headers. It is optional: where it cannot be built,
`pip install` goes on without it and the pure-Python implementation, which is the reference,
runs instead. MOESIF_FAST_PURE_PYTHON=1 forces the pure-Python implementation at run time.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("moesif_fast._eventjson", ["moesif_fast/_eventjson.c"], optional=True,
              extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"]),
    Extension("moesif_fast.ringbuffer._lane", ["moesif_fast/ringbuffer/_lane.c"], optional=True,
              extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"]),
])
