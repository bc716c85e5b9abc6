"""Command line: `python -m moesif_fast {ship,supervise,prepare,collector,stats,demo}`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import ringfile
from .settings import SHM_DIR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["collector"]:  # the collector parses its own options
        from .collector import main as collector_main

        return collector_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m moesif_fast")
    commands = parser.add_subparsers(dest="command", required=True)

    ship = commands.add_parser("ship", help="drain the event ring to the Moesif collector")
    ship.add_argument("--ring", help="ring file (default: the settings' own ring, created "
                                     "if needed: the sidecar setup)")
    ship.add_argument("--settings", help="Django settings module (default: "
                                         "DJANGO_SETTINGS_MODULE)")
    ship.add_argument("--server", default=ringfile.server_name(),
                      help="the server's name (default: MOESIF_FAST_SERVER, or none)")
    ship.add_argument("--parent", type=int, help="finish when this process (the gunicorn "
                                                 "arbiter) is gone")
    ship.add_argument("--idle-exit", type=float, help="finish after this many seconds with "
                                                      "no producer alive and an empty ring")

    supervise = commands.add_parser("supervise", help="keep one shipper running (started by "
                                                      "the gunicorn hooks)")
    supervise.add_argument("--ring", required=True)
    supervise.add_argument("--settings", required=True)
    supervise.add_argument("--server", required=True)
    supervise.add_argument("--parent", type=int, required=True)
    supervise.add_argument("--deadline", type=float, required=True)

    prepare = commands.add_parser("prepare", help="check the settings and create a gunicorn "
                                                  "server's ring (run by the hooks)")
    prepare.add_argument("--settings", required=True)
    prepare.add_argument("--workers", type=int, required=True)
    prepare.add_argument("--server", required=True)

    commands.add_parser("collector", help="run a local Moesif-compatible collector "
                                          "(see: collector --help)")

    stats = commands.add_parser("stats", help="show ring fill, drops and shipper counters")
    stats.add_argument("rings", nargs="*", help="ring files (default: all of this user's)")
    stats.add_argument("--dir", default=SHM_DIR, help="where to look for rings")
    stats.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="run an example Django site under gunicorn with "
                                            "a local collector and show what arrives")
    demo.add_argument("--requests", type=int, default=2000)
    demo.add_argument("--workers", type=int, default=2)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    if args.command == "ship":
        from .shipper.run import run_shipper

        return run_shipper(args.ring, args.settings, args.server, args.parent,
                           args.idle_exit)
    if args.command == "supervise":
        from .shipper.parent import ParentWatch
        from .shipper.supervisor import supervise as run_supervisor

        command = [sys.executable, "-m", "moesif_fast", "ship", "--ring", args.ring,
                   "--settings", args.settings, "--server", args.server,
                   "--parent", str(args.parent)]
        return run_supervisor(command, ParentWatch(args.parent), args.deadline)
    if args.command == "prepare":
        from .prepare import main as prepare_main

        return prepare_main(args.settings, args.workers, args.server)
    if args.command == "stats":
        from .stats import main as stats_main

        return stats_main(args.rings, args.dir, args.json)
    from .demo.run import run_demo

    return run_demo(args.requests, args.workers)


if __name__ == "__main__":
    sys.exit(main())
