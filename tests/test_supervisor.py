"""The supervisor sleeps between checks, and still acts at once: a shipper that exits is started
again, SIGTERM is passed on, an arbiter that exits stops it (`moesif_fast/shipper/supervisor.py`
and `parent.py`).

Real processes throughout: the supervisor runs `supervise()` as its main program, its "shipper"
is a small Python program that notes in a file when it starts and when it gets SIGTERM. The
tests that check promptness set the supervisor's CHECK_INTERVAL to an hour, so they finish only
if a pidfd or the signal pipe wakes it (their waits are failure bounds, not timings); they run
again with pidfds made unavailable in the supervisor, where it must fall back to polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

from moesif_fast.shipper.parent import ParentWatch, exit_fd_of

SHIPPER = """\
import os, signal, sys, time
notes = sys.argv[1]
with open(notes, "a") as file:
    file.write(f"start {os.getpid()}\\n")
def stop(signum, frame):
    with open(notes, "a") as file:
        file.write("term\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
if open(notes).read().count("start") == 1 and sys.argv[2] == "exit-first":
    sys.exit(3)
supervisor = os.getppid()
while os.getppid() == supervisor:  # not left behind by a supervisor killed in a failed test
    time.sleep(0.5)
"""

SUPERVISOR = f"""\
import sys
from moesif_fast.shipper import parent as parent_module, supervisor
notes, mode, parent, check_interval, waiting = sys.argv[1:6]
supervisor.CHECK_INTERVAL = float(check_interval)
if waiting == "polling":  # as where there are no pidfds
    parent_module.exit_fd_of = supervisor.exit_fd_of = lambda pid: None
command = [sys.executable, "-c", {SHIPPER!r}, notes, mode]
sys.exit(supervisor.supervise(command, parent_module.ParentWatch(int(parent)), deadline=5.0))
"""


def pidfds_work() -> bool:
    fd = exit_fd_of(os.getpid())
    if fd is not None:
        os.close(fd)
    return fd is not None


needs_pidfd = pytest.mark.skipif(not pidfds_work(),
                                 reason="no pidfd here (Linux 5.3+): the supervisor polls")


def start_supervisor(notes: Path, mode: str, parent: int, check_interval: float,
                     waiting: str = "pidfd") -> subprocess.Popen[str]:
    """`waiting`: "pidfd", or "polling" (pidfds made unavailable in the supervisor)."""
    return subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(notes), mode, str(parent),
                             str(check_interval), waiting], stdin=subprocess.DEVNULL, text=True)


def starts(notes: Path) -> int:
    return notes.read_text().count("start") if notes.exists() else 0


def voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/<pid>/status")


@pytest.fixture
def stopped_at_end() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@needs_pidfd
def test_an_idle_supervisor_wakes_about_once_a_second(
        tmp_path: Path, stopped_at_end: list[subprocess.Popen[str]]) -> None:
    """It used to wake every 0.2 s (~2 ms of CPU per second); now once per CHECK_INTERVAL (1 s)
    for the heartbeat. Counted in the kernel's tally of its sleeps, over 4 s."""
    notes = tmp_path / "notes"
    supervisor = start_supervisor(notes, "run", os.getpid(), 1.0)
    stopped_at_end.append(supervisor)
    wait_until(lambda: starts(notes) == 1, 30, "the shipper started")
    time.sleep(1.0)  # the supervisor's start-up, done
    before = voluntary_switches(supervisor.pid)
    time.sleep(4.0)
    woken = voluntary_switches(supervisor.pid) - before
    assert woken <= 4 + 2, f"{woken} wake-ups in 4 s"  # polling every 0.2 s: 20
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0


WAYS = [pytest.param("pidfd", marks=needs_pidfd), "polling"]


@pytest.mark.parametrize("waiting", WAYS)
def test_a_shipper_that_exits_is_started_again_and_sigterm_is_passed_on(
        tmp_path: Path, stopped_at_end: list[subprocess.Popen[str]], waiting: str) -> None:
    notes = tmp_path / "notes"
    supervisor = start_supervisor(notes, "exit-first", os.getpid(), 3600.0, waiting)
    stopped_at_end.append(supervisor)
    wait_until(lambda: starts(notes) == 2, 30, "the shipper started again after it exited")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert notes.read_text().splitlines()[2:] == ["term"]
    assert starts(notes) == 2


@pytest.mark.parametrize("waiting", WAYS)
def test_the_supervisor_finishes_when_its_arbiter_exits(
        tmp_path: Path, stopped_at_end: list[subprocess.Popen[str]], waiting: str) -> None:
    notes = tmp_path / "notes"
    arbiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    stopped_at_end.append(arbiter)
    supervisor = start_supervisor(notes, "run", arbiter.pid, 3600.0, waiting)
    stopped_at_end.append(supervisor)
    wait_until(lambda: starts(notes) == 1, 30, "the shipper started")
    arbiter.kill()  # and not reaped yet: a zombie counts as gone
    assert supervisor.wait(timeout=30) == 0
    assert notes.read_text().splitlines()[1:] == ["term"]
    arbiter.wait()


@pytest.mark.parametrize("with_pidfd", [True, False], ids=["pidfd", "psutil"])
def test_parent_watch_sees_a_zombie_and_a_reaped_process_as_gone(with_pidfd: bool) -> None:
    if with_pidfd and not pidfds_work():
        pytest.skip("no pidfd here (Linux 5.3+)")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    watch = ParentWatch(process.pid)
    if not with_pidfd and watch.exit_fd is not None:
        os.close(watch.exit_fd)
        watch.exit_fd = None  # as where there are no pidfds
    assert (watch.exit_fd is not None) == with_pidfd
    assert watch.alive()
    process.kill()
    wait_until(lambda: not watch.alive(), 30, "the killed process seen as gone")
    assert psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE  # not reaped yet
    assert process.poll() is not None  # reaped now
    assert not watch.alive()
    assert ParentWatch(None).alive()
