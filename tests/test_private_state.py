"""The private state folder and its files: what a hostile or damaged object there does.

Objects that another user would plant are made here directly (owned by another uid through
chown where the tests run as root); `test_hostile_neighbour.py` does the same with a real
second user against a real server.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from moesif_fast import private, stats
from moesif_fast.policy import Policy
from moesif_fast.ringbuffer import Geometry, RingFile
from moesif_fast.ringfile import state_folder
from moesif_fast.snapshot import (
    MAX_SNAPSHOT_BYTES,
    PolicySource,
    Snapshot,
    SnapshotError,
    publish,
    read,
)

OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
SMALL = Geometry.for_size(1 << 20, 2, 100)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    made = tmp_path / "state"
    made.mkdir(mode=0o700)
    return made


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    made = tmp_path / "victim"
    made.mkdir(mode=0o700)
    (made / "keep.txt").write_text("keep me\n")
    return made


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# --- folders ---------------------------------------------------------------------------------


def test_make_folder_creates_a_folder_only_its_owner_can_use(tmp_path: Path) -> None:
    path = private.make_folder(str(tmp_path / "new"))
    status = os.lstat(path)
    assert stat.S_ISDIR(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o700
    assert status.st_uid == os.geteuid()
    assert private.make_folder(path) == path  # an existing good one is accepted


def plant_link(path: Path, target: Path) -> None:
    path.symlink_to(target)


def plant_open_folder(path: Path, target: Path) -> None:
    path.mkdir(mode=0o777)
    path.chmod(0o777)


def plant_fifo(path: Path, target: Path) -> None:
    os.mkfifo(path)


def plant_file(path: Path, target: Path) -> None:
    path.write_text("x")


@pytest.mark.parametrize("plant,reason", [
    (plant_link, "is a symbolic link"),
    (plant_open_folder, "has mode 0777"),
    (plant_fifo, "is a FIFO"),
    (plant_file, "is a file, not a folder"),
])
def test_make_folder_refuses_what_holds_the_name(
        tmp_path: Path, victim: Path, plant: Callable[[Path, Path], None], reason: str) -> None:
    path = tmp_path / "state"
    plant(path, victim)
    with pytest.raises(private.UnsafePathError, match=reason) as refused:
        private.make_folder(str(path))
    assert str(path) in str(refused.value) and "RING_DIR" in str(refused.value)
    assert contents(victim) == {"keep.txt": b"keep me\n"}


@needs_root
def test_make_folder_refuses_another_users_folder(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(private.UnsafePathError, match=f"belongs to uid {OTHER_UID}"):
        private.make_folder(str(path))


# --- files -----------------------------------------------------------------------------------


def test_open_file_never_follows_a_link(folder: Path, victim: Path) -> None:
    link = folder / "policy.json"
    link.symlink_to(victim / "keep.txt")
    for create in (False, True):
        with pytest.raises(private.UnsafePathError, match="symbolic link"):
            private.open_file(str(link), os.O_RDWR, create=create)
    assert contents(victim) == {"keep.txt": b"keep me\n"}


def test_open_file_does_not_block_on_a_fifo(folder: Path) -> None:
    fifo = folder / "policy.json"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: outcome.append(
        _raised(lambda: private.read_file(str(fifo), 1000))), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "opening the FIFO blocked"
    assert isinstance(outcome[0], private.UnsafePathError) and "FIFO" in str(outcome[0])


def _raised(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the test inspects it
        return error
    return None


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o666])
def test_open_file_refuses_a_file_others_may_use(folder: Path, mode: int) -> None:
    path = folder / "ring"
    path.write_text("x")
    path.chmod(mode)
    with pytest.raises(private.UnsafePathError, match=f"has mode {mode:04o}"):
        private.open_file(str(path), os.O_RDONLY)


@needs_root
def test_open_file_refuses_another_users_file(folder: Path) -> None:
    path = folder / "ring"
    path.write_text("x")
    path.chmod(0o600)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(private.UnsafePathError, match=f"belongs to uid {OTHER_UID}"):
        private.open_file(str(path), os.O_RDWR)


def test_read_file_refuses_more_than_its_limit(folder: Path) -> None:
    path = folder / "big"
    with open(path, "wb") as file:
        file.truncate(1 << 30)  # sparse: costs nothing
    path.chmod(0o600)
    with pytest.raises(private.UnsafePathError, match="more than the 1000 expected"):
        private.read_file(str(path), 1000)


def test_replace_file_replaces_a_link_instead_of_writing_through_it(
        folder: Path, victim: Path) -> None:
    link = folder / "shipper.json"
    link.symlink_to(victim / "keep.txt")
    private.replace_file(str(link), b"{}")
    assert not link.is_symlink() and link.read_bytes() == b"{}"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    assert contents(victim) == {"keep.txt": b"keep me\n"}


def test_replace_file_onto_a_folder_fails_and_leaves_no_temporary(folder: Path) -> None:
    (folder / "shipper.json").mkdir()
    with pytest.raises(OSError):
        private.replace_file(str(folder / "shipper.json"), b"{}")
    assert sorted(path.name for path in folder.iterdir()) == ["shipper.json"]


def test_remove_file_removes_only_a_private_regular_file(folder: Path, victim: Path) -> None:
    (folder / "mine").write_text("x")
    (folder / "mine").chmod(0o600)
    (folder / "link").symlink_to(victim / "keep.txt")
    assert private.remove_file(str(folder / "mine"))
    assert not private.remove_file(str(folder / "link"))
    assert not private.remove_file(str(folder / "missing"))
    assert contents(victim) == {"keep.txt": b"keep me\n"}


# --- the ring --------------------------------------------------------------------------------


def test_a_ring_is_created_only_in_a_private_folder(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(private.UnsafePathError, match="has mode 0755"):
        RingFile.create(str(shared / "x.ring"), SMALL)
    assert list(shared.iterdir()) == []


def test_a_ring_file_others_may_write_is_not_attached(folder: Path) -> None:
    path = str(folder / "x.ring")
    RingFile.create(path, SMALL).close()
    os.chmod(path, 0o666)
    with pytest.raises(private.UnsafePathError, match="has mode 0666"):
        RingFile.attach(path)


def test_a_lock_folder_link_is_refused_and_never_emptied(folder: Path, victim: Path) -> None:
    path = str(folder / "x.ring")
    ring = RingFile.create(path, SMALL)
    for name in os.listdir(ring.locks_dir):
        os.unlink(os.path.join(ring.locks_dir, name))
    os.rmdir(ring.locks_dir)
    os.symlink(victim, ring.locks_dir)
    with pytest.raises(private.UnsafePathError, match="symbolic link"):
        RingFile.open(path, SMALL)
    with pytest.raises(private.UnsafePathError, match="symbolic link"):
        ring.open_lock("lane-000")
    with pytest.raises(OSError):
        ring.unlink()
    ring.close()
    assert contents(victim) == {"keep.txt": b"keep me\n"}


def test_unlink_removes_only_the_ring_s_own_lock_files(folder: Path) -> None:
    ring = RingFile.create(str(folder / "x.ring"), SMALL)
    ring.open_lock("reader")
    Path(ring.locks_dir, "somebody-elses").write_text("x")
    with pytest.raises(OSError):  # the folder is not empty: it stays
        ring.unlink()
    assert os.listdir(ring.locks_dir) == ["somebody-elses"]
    ring.close()


# --- the config snapshot ---------------------------------------------------------------------


GOOD = Snapshot({"sample_rate": 50}, [], "etag-1", "tag-1", 123)


def write_raw(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)


BAD_SNAPSHOTS: dict[str, Callable[[Path], None]] = {
    "not JSON": lambda path: write_raw(path, b"{not json"),
    "truncated": lambda path: write_raw(path, json.dumps(GOOD.__dict__).encode()[:-7]),
    "not UTF-8": lambda path: write_raw(path, b'{"config": "\xff\xfe"}'),
    "a list": lambda path: write_raw(path, b"[1, 2]"),
    "an infinite fetch time": lambda path: write_raw(path, b'{"fetched_ns": 1e999}'),
    "a tag that is a number": lambda path: write_raw(path, b'{"rules_tag": 7}'),
    "deeply nested": lambda path: write_raw(path, b'{"config": ' + b"[" * 100_000
                                            + b"]" * 100_000 + b"}"),
    "huge": lambda path: (write_raw(path, b""), os.truncate(path, MAX_SNAPSHOT_BYTES + 1)),
    "shared with others": lambda path: write_raw(path, json.dumps(GOOD.__dict__).encode(),
                                                 0o666),
    "a FIFO": lambda path: os.mkfifo(path, 0o600),
    "a folder": lambda path: path.mkdir(),
}


@pytest.mark.parametrize("damage", sorted(BAD_SNAPSHOTS))
def test_a_bad_snapshot_means_the_defaults_and_a_warning(
        folder: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    path = folder / "x.ring.policy.json"
    publish(str(path), GOOD)
    source = PolicySource(str(path))
    assert source.current() is not Policy.DEFAULT  # the good one was in use
    os.unlink(path)
    BAD_SNAPSHOTS[damage](path)
    source._next_check = 0.0  # look now rather than after CHECK_INTERVAL
    with caplog.at_level(logging.WARNING, logger="moesif_fast"):
        assert source.current() is Policy.DEFAULT
    assert "ignoring the config snapshot" in caplog.text and str(path) in caplog.text
    with pytest.raises(SnapshotError):
        read(str(path))


@needs_root
def test_another_users_snapshot_is_not_used(folder: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = folder / "x.ring.policy.json"
    publish(str(path), GOOD)
    os.chown(path, OTHER_UID, OTHER_UID)
    with caplog.at_level(logging.WARNING, logger="moesif_fast"):
        assert PolicySource(str(path)).current() is Policy.DEFAULT
    assert f"belongs to uid {OTHER_UID}" in caplog.text


def test_a_published_snapshot_reads_back_and_is_private(folder: Path) -> None:
    path = folder / "x.ring.policy.json"
    publish(str(path), GOOD)
    assert read(str(path)) == GOOD
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read(str(folder / "missing.json")) is None


# --- stats -----------------------------------------------------------------------------------


def test_stats_reports_a_bad_file_and_shows_the_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = Path(private.make_folder(state_folder(str(tmp_path))))
    RingFile.create(str(state / "good.ring"), SMALL).close()
    write_raw(state / "garbage.ring", b"not a ring")
    write_raw(state / "good.ring.shipper.json", b"[[[")  # damaged counters: shown as none

    assert stats.main([], str(tmp_path), as_json=False) == 1
    out, err = capsys.readouterr()
    assert f"ring {state / 'good.ring'}" in out and "no counters published yet" in out
    assert f"{state / 'garbage.ring'}: not shown:" in err and "bad magic" in err


def test_stats_refuses_a_state_folder_that_is_not_private(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = Path(state_folder(str(tmp_path)))
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    assert stats.main([], str(tmp_path), as_json=True) == 1
    assert "has mode 0777" in capsys.readouterr().err
