"""Gunicorn configuration with moesif_fast's hooks: one event ring and one shipper per server.

    gunicorn -c /path/to/gunicorn_conf.py mysite.wsgi

Works from any directory. To keep your own config, import the hooks into it instead:
`from moesif_fast.gunicorn import when_ready, pre_fork, on_exit`.
"""

from moesif_fast.gunicorn import on_exit, pre_fork, when_ready

__all__ = ["on_exit", "pre_fork", "when_ready"]
