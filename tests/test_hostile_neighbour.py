"""Another local user against a server: what it plants in the shared folder is never used.

The server runs as this test's user (root in CI); the neighbour is a second, unprivileged OS
user (`mf-neighbour`, created when the tests run as root; the tests are skipped otherwise).
RING_DIR is a fresh world-writable sticky folder, as /dev/shm is. The neighbour plants
something where the server keeps its state: at the state folder's own name (which anyone can
predict), or, for defence in depth, inside the server's private folder (planted there by the
test as root, owned by the neighbour or pointing at the victim's files). Each time:

- the server answers every request normally (a client timeout bounds "normally"; no timing
  assertions on shared cores), and its shipper does not crash-loop;
- the planted object is never followed or written through: a root-only victim folder and file
  are unchanged, and nothing was written into a folder the neighbour owns;
- with capture on, the events arrive; and the neighbour, walking RING_DIR, can read no file
  holding a captured secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import (
    Collector,
    Server,
    kill_processes_of,
    moesif_processes,
    send_requests,
)

from moesif_fast import ringfile
from moesif_fast.demo.run import APPLICATION_ID
from moesif_fast.policy import Policy, RequestFacts
from moesif_fast.settings import load

NEIGHBOUR = "mf-neighbour"
SECRET = "Bearer neighbour-must-not-read-this-4f1c"
SETTINGS_MODULE = "moesif_fast.demo.settings"
SERVER_NAME = "hostile-test"  # MOESIF_FAST_SERVER: the ring's name does not depend on the port
WORKERS = 2


# --- the neighbour ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def neighbour() -> pwd.struct_passwd:
    """The second local user, created if the tests run as root."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(NEIGHBOUR)
    if os.geteuid() != 0:
        pytest.skip(f"needs a second local user: run as root (to create {NEIGHBOUR}) or create "
                    f"{NEIGHBOUR} yourself")
    if not shutil.which("useradd"):
        pytest.skip("useradd is not installed: cannot create a second local user")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    NEIGHBOUR], check=True, capture_output=True)
    return pwd.getpwnam(NEIGHBOUR)


def system_python() -> str:
    """A Python the neighbour may run (this one may live in root's home, as pyenv's does)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system-wide python3 for the second user to run")


def as_neighbour(user: pwd.struct_passwd, code: str, *args: str) -> str:
    """Run Python `code` as the neighbour (sys.argv[1:] = `args`); its standard output."""
    completed = subprocess.run([system_python(), "-I", "-c", code, *args], user=user.pw_uid,
                               group=user.pw_gid, extra_groups=[], capture_output=True,
                               text=True, timeout=60, cwd="/")
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


PLANT = """
import os, sys
kind, path, target = sys.argv[1:]
if kind == "folder":
    os.mkdir(path); os.chmod(path, 0o777)
elif kind == "symlink":
    os.symlink(target, path)
elif kind == "fifo":
    os.mkfifo(path, 0o666)
elif kind == "file":
    with open(path, "w") as file:
        file.write(target)
    os.chmod(path, 0o666)
"""

FIND_SECRET = """
import os, sys
folder, secret = sys.argv[1], sys.argv[2].encode()
for root, folders, files in os.walk(folder):
    for name in files:
        path = os.path.join(root, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as file:
            if secret in file.read():
                print(path)
"""


# --- the scene -------------------------------------------------------------------------------


@dataclass
class Scene:
    shared: Path  # RING_DIR: world-writable and sticky, like /dev/shm
    state: Path  # the server's private state folder in it (a name anyone can predict)
    victim: Path  # a folder only root may use, with a file in it
    neighbour: pwd.struct_passwd

    @property
    def victim_file(self) -> Path:
        return self.victim / "keep.txt"

    def victim_state(self) -> dict[str, tuple[bytes, int, int]]:
        return {path.name: (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode)
                for path in sorted(self.victim.iterdir())}

    def plant(self, kind: str, path: Path, target: str = "") -> None:
        as_neighbour(self.neighbour, PLANT, kind, str(path), target)

    def ring_path(self, collector: Collector) -> Path:
        """The ring the example server will use (what any local user can compute too)."""
        options = load({"APPLICATION_ID": APPLICATION_ID, "BASE_URI": collector.url,
                        "RING_DIR": str(self.shared)})
        geometry = ringfile.geometry(options, ringfile.producers_for_workers(WORKERS))
        return Path(ringfile.ring_path(options, SETTINGS_MODULE, geometry, SERVER_NAME))

    def readable_secrets(self) -> list[str]:
        return as_neighbour(self.neighbour, FIND_SECRET, str(self.shared), SECRET).split()


@pytest.fixture
def scene(neighbour: pwd.struct_passwd, workspace: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Scene]:
    monkeypatch.setenv(ringfile.SERVER_ENV, SERVER_NAME)  # for the servers the tests start
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    shared = Path(tempfile.mkdtemp(prefix="mf-shared-", dir=base))
    shared.chmod(0o1777)
    victim = workspace / "victim"
    victim.mkdir(mode=0o700)
    (victim / "keep.txt").write_text("the victim's data\n")
    (victim / "keep.txt").chmod(0o600)
    yield Scene(shared, shared / f"moesif_fast-{os.geteuid()}", victim, neighbour)
    kill_processes_of(shared)
    shutil.rmtree(shared, ignore_errors=True)


StartServer = Callable[..., Server]


def serve(scene: Scene, start_server: StartServer) -> tuple[Server, list]:
    """The example server with its state in the shared folder, and 60 requests answered by it
    (each carrying the secret in Authorization)."""
    server = start_server(workers=WORKERS, options={"RING_DIR": str(scene.shared)})
    exchanges = send_requests(server.url, 60, threads=4, label="hostile")
    with requests.Session() as session:
        for number in range(20):
            answer = session.get(f"{server.url}/api/items?rid=secret-{number}",
                                 headers={"Authorization": SECRET}, timeout=30)
            assert answer.status_code == 200
    return server, exchanges


def assert_all_answered(exchanges: list) -> None:
    assert all(exchange.answered for exchange in exchanges), [
        exchange.error for exchange in exchanges if not exchange.answered][:3]
    assert all(exchange.response.status_code < 500 and not exchange.response.is_redirect
               for exchange in exchanges)


# --- at the state folder's name --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "symlink", "fifo", "file"])
def test_a_planted_state_folder_is_refused_and_the_site_serves(
        scene: Scene, start_server: StartServer, collector: Collector, kind: str) -> None:
    scene.plant(kind, scene.state, str(scene.victim))
    before = scene.victim_state()

    server, exchanges = serve(scene, start_server)
    assert_all_answered(exchanges)
    assert server.stop() == 0

    assert f"{scene.state} " in server.log and "this user's alone" in server.log, server.log
    assert scene.victim_state() == before
    planted = os.lstat(scene.state)
    assert planted.st_uid == scene.neighbour.pw_uid  # left in place, not removed or taken
    if kind == "folder":
        assert list(scene.state.iterdir()) == []  # nothing of ours was written into it
    assert collector.events() == []  # no capture rather than capture through the neighbour
    assert scene.readable_secrets() == []


# --- inside the private folder ---------------------------------------------------------------


def own_by_neighbour(scene: Scene, path: Path) -> None:
    os.lchown(path, scene.neighbour.pw_uid, scene.neighbour.pw_gid)


def test_a_foreign_ring_file_is_not_attached(scene: Scene, start_server: StartServer,
                                             collector: Collector) -> None:
    scene.state.mkdir(mode=0o700)
    ring = scene.ring_path(collector)
    ring.write_bytes(b"\0" * 4096)  # the neighbour's file: it would read every request
    ring.chmod(0o666)
    own_by_neighbour(scene, ring)

    server, exchanges = serve(scene, start_server)
    assert_all_answered(exchanges)
    assert server.stop() == 0

    assert f"{ring} belongs to uid {scene.neighbour.pw_uid}" in server.log
    assert ring.read_bytes() == b"\0" * 4096  # never written
    assert scene.readable_secrets() == []  # what the workers captured went elsewhere


def test_a_lock_folder_link_is_never_followed_or_emptied(
        scene: Scene, start_server: StartServer, collector: Collector) -> None:
    scene.state.mkdir(mode=0o700)
    locks = Path(f"{scene.ring_path(collector)}.locks")
    locks.symlink_to(scene.victim)
    before = scene.victim_state()

    server, exchanges = serve(scene, start_server)
    assert_all_answered(exchanges)
    assert server.stop() == 0

    assert f"{locks} is a symbolic link" in server.log
    assert scene.victim_state() == before
    assert locks.is_symlink()


@pytest.mark.parametrize("companion,kind", [
    ("policy.json", "symlink"), ("policy.json", "fifo"), ("policy.json", "foreign"),
    ("shipper.json", "folder"), ("shipper.json", "symlink"),
])
def test_planted_companion_files_do_not_stop_capture(
        scene: Scene, start_server: StartServer, collector: Collector, companion: str,
        kind: str) -> None:
    scene.state.mkdir(mode=0o700)
    path = Path(f"{scene.ring_path(collector)}.{companion}")
    if kind == "symlink":
        path.symlink_to(scene.victim_file)
    elif kind == "fifo":
        os.mkfifo(path, 0o666)
    elif kind == "folder":
        path.mkdir()
    else:  # the neighbour's snapshot: every response a redirect to its site, with its cookie
        path.write_text(FOREIGN_SNAPSHOT)
        path.chmod(0o666)
    if kind in ("fifo", "foreign", "folder"):
        own_by_neighbour(scene, path)
    before = scene.victim_state()

    server, exchanges = serve(scene, start_server)
    shippers = {process.pid for process in moesif_processes(scene.shared, "ship")}
    assert_all_answered(exchanges)
    for exchange in exchanges:
        assert "set-cookie" not in exchange.response.headers
    ids = {exchange.request_id for exchange in exchanges}
    collector.wait_for(ids)
    assert {process.pid for process in moesif_processes(scene.shared, "ship")} == shippers
    assert len(shippers) == 1, "the shipper restarted (crash loop?)"
    assert server.stop() == 0

    assert scene.victim_state() == before
    assert scene.readable_secrets() == []
    events = collector.events()
    secret_events = [event for event in events
                     if event["request"]["uri"].split("rid=")[-1].startswith("secret-")]
    assert len(secret_events) == 20
    assert all(event["request"]["headers"]["AUTHORIZATION"] == SECRET
               for event in secret_events)  # delivered to the collector, and only there


FOREIGN_SNAPSHOT = json.dumps({
    "config": {"sample_rate": 100}, "config_etag": "x", "rules_tag": "y", "fetched_ns": 1,
    "rules": [{"_id": "r1", "type": "regex", "block": True,
               "regex_config": [{"conditions": [{"path": "request.route", "value": ".*"}]}],
               "response": {"status": 302, "headers": {"Location": "https://evil.example",
                                                       "Set-Cookie": "session=stolen"}}}],
})


def test_the_foreign_snapshot_would_redirect_every_request_if_it_were_used() -> None:
    snapshot = json.loads(FOREIGN_SNAPSHOT)
    policy = Policy.compile(snapshot["config"], snapshot["rules"])
    assert policy.problems == []
    ruling = policy.govern(RequestFacts("GET", "/api/items", "127.0.0.1", {}, None, None, None),
                           after_view=False)
    assert ruling is not None and ruling.block is not None  # so the test above can fail
    assert ruling.block.status == 302


def test_the_state_folder_and_its_files_are_private(scene: Scene, start_server: StartServer,
                                                    collector: Collector) -> None:
    server, exchanges = serve(scene, start_server)
    collector.wait_for({exchange.request_id for exchange in exchanges})
    assert stat.S_IMODE(scene.state.stat().st_mode) == 0o700
    for path in scene.state.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:04o}"
    assert scene.readable_secrets() == []
    # The check can fail: the secret is in the ring (read in clear by its owner).
    owner = subprocess.run([sys.executable, "-c", FIND_SECRET, str(scene.shared), SECRET],
                           capture_output=True, text=True, timeout=60, check=True)
    assert owner.stdout.split(), "the secret is nowhere in the state folder"
    assert server.stop() == 0
