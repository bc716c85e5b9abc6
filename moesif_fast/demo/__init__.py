"""An example Django API used by `python -m moesif_fast demo` and by the end-to-end tests."""
