"""`python -m moesif_fast ship`: one shipper process, from Django settings to a running loop.

It loads the same Django settings as the workers (`--settings`, or DJANGO_SETTINGS_MODULE),
attaches to the ring (`--ring`, or the deployment's default ring, created if needed, which is
where workers without gunicorn hooks write: the sidecar setup), and ships until SIGTERM/SIGINT,
until the watched parent (`--parent`, the gunicorn arbiter) is gone, or, with `--idle-exit N`
(the fallback shipper a worker starts), until no producer has been alive for N seconds. Then it
delivers what is left within SHUTDOWN_DEADLINE; what it cannot deliver by then goes to the
spool. A fallback shipper then removes what it leaves empty: the ring with its companion files,
the spool folder, the state folders.

When the loop meets records captured under settings it has not loaded (see `loop.py`), the
process replaces itself (exec, same pid, same arguments) to load the settings now on disk,
telling its successor in MOESIF_FAST_OLDER_SETTINGS which settings tags are older than those.

SIGHUP (uWSGI's reloadsignal, see `moesif_fast.uwsgi`) hands over: the batches in flight settle,
and everything else stays in the ring and spool for the next shipper, without waiting for live
producers.

Exit codes: 0 done (or another shipper already drains this ring), 1 events were left in the
ring at the deadline, 2 bad configuration. (Never 3 or 4: older gunicorn arbiters halt on
those.)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from .. import __version__, private, ringfile
from ..ringbuffer import RingBusyError, RingFile
from ..settings import MoesifOptions, configured
from ..spool import Spool, SpoolBusyError
from .loop import Shipper
from .parent import ParentWatch
from .transport import CollectorTransport

logger = logging.getLogger("moesif_fast.shipper")

EXIT_OK, EXIT_UNDELIVERED, EXIT_BAD_CONFIG = 0, 1, 2
OLDER_SETTINGS_ENV = "MOESIF_FAST_OLDER_SETTINGS"  # comma-separated settings tags, in hex
MAX_OLDER_SETTINGS = 32  # tags passed on across restarts, the two of the last one first
CHECK_INTERVAL = 1.0  # seconds between checks of the parent and of idleness
STANDBY_POLL = 1.0  # seconds between attempts of a standby shipper to take the ring


def load_options(settings_module: str | None) -> MoesifOptions | None:
    """Set up Django with the workers' settings and return the validated options."""
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    import django
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except (ImportError, ImproperlyConfigured) as error:
        logger.error("moesif_fast shipper: cannot load the Django settings %r: %s",
                     os.environ.get("DJANGO_SETTINGS_MODULE"), error)
        return None
    options, problems = configured()
    for problem in problems:
        logger.log(logging.ERROR if problem.is_serious() else logging.WARNING,
                   "moesif_fast: %s (%s)", problem.msg, problem.id)
    return options


def run_shipper(ring_path: str | None, settings_module: str | None, server: str,
                parent_pid: int | None, idle_exit: float | None) -> int:
    options = load_options(settings_module)
    if options is None:
        return EXIT_BAD_CONFIG
    if ring_path is None:
        module = os.environ["DJANGO_SETTINGS_MODULE"]
        geometry = ringfile.geometry(options, ringfile.FALLBACK_PRODUCERS)
        ring = ringfile.open_ring(ringfile.ring_path(options, module, geometry, server),
                                  geometry)
    else:
        ring = RingFile.attach(ring_path)
    transport = CollectorTransport(options.base_uri, options.APPLICATION_ID or "",
                                   user_agent=f"moesif_fast-python/{__version__}")
    finish = FinishConditions(ring, ParentWatch(parent_pid), idle_exit)
    signal.signal(signal.SIGTERM, finish.request)
    signal.signal(signal.SIGINT, finish.request)
    signal.signal(signal.SIGHUP, finish.hand_over)
    spool_folder = ringfile.spool_folder(options, os.environ["DJANGO_SETTINGS_MODULE"], server)
    shipper = _become_reader(ring, options, transport, spool_folder,
                             standby=parent_pid is not None, finish=finish,
                             accepted_tags=_older_settings())
    if shipper is None:
        return EXIT_OK
    finish.wake = shipper.wake
    logger.info("moesif_fast shipper %d: draining %s to %s, spooling to %s", os.getpid(),
                ring.path, options.base_uri, spool_folder if shipper.spool else "nothing")
    spooled = 0
    try:
        delivered_all = shipper.run(finish, options.SHUTDOWN_DEADLINE,
                                    lambda: finish.handing_over)
        spooled = shipper.spool.stats().records if shipper.spool is not None else 0
    finally:
        if shipper.spool is not None:
            shipper.spool.close()
        transport.close()
    if shipper.restart_for is not None and not finish():
        shipper.reader.close()
        ring.close()
        _restart([shipper.restart_for, shipper.settings_tag,
                  *shipper.accepted_tags - {shipper.restart_for, shipper.settings_tag}])
    if idle_exit is not None:
        _remove_what_is_empty(shipper, spool_folder if shipper.spool and not spooled else None)
    return EXIT_OK if delivered_all else EXIT_UNDELIVERED


def _remove_what_is_empty(shipper: Shipper, empty_spool: str | None) -> None:
    """A fallback shipper's last step: no file of ours stays behind unless it holds events
    (`empty_spool`: the spool's folder, if it has one and it holds none)."""
    shipper.reader.close()
    shipper.ring.close()
    left = ringfile.remove_drained(shipper.ring.path)
    if left is not None:
        logger.warning("moesif_fast shipper: %d events stay in %s for the next shipper", left,
                       shipper.ring.path)
    if empty_spool is not None:
        for name in os.listdir(empty_spool):
            private.remove_file(os.path.join(empty_spool, name))
        ringfile.remove_empty_folder(empty_spool)
        ringfile.remove_empty_folder(os.path.dirname(empty_spool))


def _older_settings() -> frozenset[int]:
    """The settings tags a predecessor of this process passed on (see `_restart`)."""
    tags = set()
    for text in os.environ.get(OLDER_SETTINGS_ENV, "").split(","):
        try:
            tags.add(int(text, 16))
        except ValueError:
            continue
    return frozenset(tags)


def _restart(older_tags: list[int]) -> None:
    """Replace this process by a new shipper with the same arguments, which loads the settings
    now on disk. Records of `older_tags` (the tag it restarted for, its own, then those it was
    given: if the files on disk do not give those, nothing can) are sent under the new ones.
    Never returns."""
    tags = ",".join(f"{tag:x}" for tag in older_tags[:MAX_OLDER_SETTINGS])
    logging.shutdown()  # flush the log before the exec
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              dict(os.environ, **{OLDER_SETTINGS_ENV: tags}))


def _become_reader(ring: RingFile, options: MoesifOptions, transport: CollectorTransport,
                   spool_folder: str, standby: bool, finish: FinishConditions,
                   accepted_tags: frozenset[int]) -> Shipper | None:
    """The ring's shipper, or None if another process drains it. A shipper serving a gunicorn
    arbiter waits as a standby while another one holds the ring (a USR2 upgrade runs two
    arbiters for a while) and takes over when it exits; others leave at once."""
    while True:
        spool = None
        try:
            spool = _open_spool(options, spool_folder)
            return Shipper(ring, options, transport, spool, accepted_tags)
        except (RingBusyError, SpoolBusyError) as busy:
            if spool is not None:
                spool.close()
            if not standby or finish():
                logger.info("moesif_fast shipper: %s; exiting", busy)
                return None
        time.sleep(STANDBY_POLL)


def _open_spool(options: MoesifOptions, folder: str) -> Spool | None:
    """The deployment's spool, or None: SPOOL_BYTES is 0, or the folder cannot be used (the
    ring alone then holds what the collector cannot take yet; logged). SpoolBusyError when
    another shipper has it."""
    if not options.SPOOL_BYTES:
        return None
    try:
        private.make_folder(os.path.dirname(folder))
        return Spool(folder, max_bytes=options.SPOOL_BYTES,
                     max_records=options.EVENT_QUEUE_SIZE)
    except SpoolBusyError:
        raise
    except OSError as error:
        logger.error("moesif_fast shipper: running without a spool: cannot use %s (%s); "
                     "while the collector cannot take events, the ring alone holds them",
                     folder, error)
        return None


class FinishConditions:
    """Callable telling the loop when to finish: a signal, the parent gone, or idleness."""

    def __init__(self, ring: RingFile, parent: ParentWatch, idle_exit: float | None) -> None:
        self.ring = ring
        self.parent = parent
        self.idle_exit = idle_exit
        self.requested = False
        self.handing_over = False
        self.wake: Callable[[], None] = lambda: None
        """Called when a signal asks to finish: the shipper's `wake`, once it exists."""
        self._next_check = 0.0
        self._idle_since: float | None = None

    def request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.wake()

    def hand_over(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP (uWSGI's reloadsignal): leave the ring to the next shipper now, without
        waiting for live producers."""
        self.requested = self.handing_over = True
        self.wake()

    def __call__(self) -> bool:
        if self.requested:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_INTERVAL
        if not self.parent.alive():
            logger.info("moesif_fast shipper: the arbiter (pid %s) is gone", self.parent.pid)
            return True
        if self.idle_exit is None:
            return False
        if self.ring.owned_lanes():
            self._idle_since = None
            return False
        self._idle_since = self._idle_since or now
        return now - self._idle_since >= self.idle_exit
