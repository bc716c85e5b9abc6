"""The ring file: its exact byte layout, creating and attaching it, and reading its counters.

A ring file holds `lane_count` single-producer lanes; the last lane is the shared overflow lane
used (under a per-append `flock`) by processes that found every other lane taken. Every integer
is little-endian; every control word is an aligned u64, read and written only through
`memoryview.cast("Q")` (one 8-byte `mov` on x86-64; see ringbuffer-notes §2).

    Global header, bytes [0, 4096)
        0  char[8] magic b"MFRING\\0\\0"   8  u32 version (1)
       12  u32 flags (bit 0: locked publish)
       16  u32 lane_count (incl. overflow)  20  u32 reserved
       24  u64 lane_capacity (power of two, bytes)
       32  u64 max_record (largest payload, bytes)
       40  u64 max_records (most unconsumed records per lane)
       48  u64 data_offset                  56  u64 file_size      64  u64 created_ns
      128  u64 reader_heartbeat_ns         136  u64 reader_pid    144  u64 committed_records
      152  u64 decoding_lane               160  u64 decoding_position
           (the record the reader's process is decoding and turning into an event now, stored
           before and cleared after: lane + 1, 0 = none; see `Reader.mark`)
      168  u64 poison_count (records a reader found marked as decoding when it started)
      176  16 x (u64 lane + 1, u64 position): the latest poison records, entry
           poison_count % 16 is the next; a reader skips the ones it finds, unread
      432  u64 suspect_lane                440  u64 suspect_position
           (a record a reader's process died on once, lane + 1, 0 = none: it becomes poison
           if the next reader dies on it too)
    Lane control block i, 256 bytes at CONTROL_OFFSET + 256*i
        producer line:  +0 tail  +8 owner_pid  +16 appended  +24 dropped_full
                        +32 dropped_oversize  +40 dropped_busy
        consumer line: +128 head  +136 consumed  +144 corrupt_resets
    Lane i data: lane_capacity bytes at data_offset + lane_capacity*i
    Record, 16-byte aligned: u32 payload_len, u16 kind (1 record, 2 pad), u16 0,
        u64 position (the record's own absolute lane position), then the payload padded to 16.

Positions (`tail`, `head`) are free-running byte counters; offset = position & (capacity-1).
A record never straddles the lane's end: the writer fills the rest with a pad record and starts
at offset 0. The writer publishes a record by storing the new `tail` after writing it; the
reader owns `head` and moves it only on `commit`. A record's header repeats its own position,
so a stale record from an earlier lap or a stray write cannot pass the reader's check.

Files next to the ring: `<ring>.locks/lane-NNN` (a producer's `flock` on it owns lane NNN; the
kernel releases it when the process dies, whatever the signal), `overflow` (held for one append
into the overflow lane), `reader` (held by the one reader), and `sync-NNN` (locked-publish mode
only, below).

Trust: the ring lives in a folder of its user's alone (`moesif_fast.private`): creating or
attaching refuses a folder that is not a real folder of the effective user with mode 0700, and
a ring or lock file that is a link, not a regular file, not the user's or not 0600. Whoever can
write the file can still damage it; the reader never trusts what it reads (above).

Memory ordering: on x86-64 (TSO) the plain 8-byte stores and loads above are enough. Elsewhere
the ring is created in locked-publish mode: the writer stores `tail` and the reader loads it
while holding `sync-NNN`, so the kernel's lock hand-off orders payload writes before the reader's
payload reads. The mode is fixed in the file, so every process uses the same one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import platform
import re
import struct
import tempfile
import time
from dataclasses import dataclass

from .. import private

MAGIC = b"MFRING\0\0"
VERSION = 1
FLAG_LOCKED_PUBLISH = 1
HEADER_BYTES = 4096
CONTROL_OFFSET = HEADER_BYTES
CONTROL_BYTES = 256
RECORD_HEADER = struct.Struct("<IHHQ")
RECORD_HEADER_BYTES = RECORD_HEADER.size
RECORD_ALIGN = 16
KIND_RECORD = 1
KIND_PAD = 2
MIN_LANE_CAPACITY = 1 << 16
MAX_LANES = 1024
POSITION_LIMIT = 1 << 62  # a larger position is corrupt (2^62 bytes: centuries of traffic)
WORD_MASK = (1 << 64) - 1
LOCK_NAME = re.compile(r"lane-\d{3}|sync-\d{3}|overflow|reader")  # files in `<ring>.locks`

_GLOBAL = struct.Struct("<8sIIII5Q")  # magic .. created_ns, at offset 0

# u64 word indexes (byte offset // 8)
WORD_READER_HEARTBEAT = 128 // 8
WORD_READER_PID = 136 // 8
WORD_COMMITTED = 144 // 8
WORD_DECODING_LANE = 152 // 8
WORD_DECODING_POSITION = 160 // 8
WORD_POISON_COUNT = 168 // 8
WORD_POISON_TABLE = 176 // 8  # POISON_SLOTS entries of two words: lane + 1, position
POISON_SLOTS = 16
WORD_SUSPECT_LANE = 432 // 8
WORD_SUSPECT_POSITION = 440 // 8
# u64 word offsets inside a lane control block
TAIL, OWNER_PID, APPENDED, DROPPED_FULL, DROPPED_OVERSIZE, DROPPED_BUSY = range(6)
HEAD, CONSUMED, CORRUPT_RESETS = 16, 17, 18


class RingError(Exception):
    """Base class of the ring's errors."""


class RingFormatError(RingError):
    """The file is not a ring of this format, version or geometry."""


class RingBusyError(RingError):
    """The ring already has a reader."""


def ordered_stores() -> bool:
    """True where plain aligned 8-byte stores and loads publish correctly (x86-64, TSO)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def bump(words: memoryview, index: int, amount: int = 1) -> None:
    """Add to a u64 counter, wrapping at 2^64 (a damaged counter must not raise)."""
    words[index] = (words[index] + amount) & WORD_MASK


def lane_is_sane(tail: int, head: int, capacity: int) -> bool:
    """True if a lane's published tail and committed head can both be real positions."""
    return not (tail | head) & 15 and tail < POSITION_LIMIT and 0 <= tail - head <= capacity


def record_span(payload_len: int) -> int:
    """Bytes a record of `payload_len` occupies in a lane: header + payload, 16-aligned."""
    return (payload_len + RECORD_HEADER_BYTES + RECORD_ALIGN - 1) & -RECORD_ALIGN


@dataclass(frozen=True)
class Geometry:
    """The shape of a ring file. Two processes agree on a ring only if they agree on this."""

    lane_count: int  # dedicated lanes + 1 overflow lane
    lane_capacity: int  # bytes per lane, a power of two
    max_records: int  # most unconsumed records a lane holds

    @classmethod
    def for_size(cls, total_bytes: int, producers: int, max_records: int,
                 largest_record: int = 0) -> Geometry:
        """A geometry of `producers` dedicated lanes plus overflow in about `total_bytes` of
        lane data, each lane holding at most `max_records` unconsumed records. Lanes are a
        power of two of at least MIN_LANE_CAPACITY bytes, and big enough for a record of
        `largest_record` bytes even if that takes more than `total_bytes`."""
        lane_count = producers + 1
        capacity = 1 << max(0, (total_bytes // lane_count).bit_length() - 1)
        needed = 1 << (2 * (largest_record + RECORD_HEADER_BYTES) - 1).bit_length()
        return cls(lane_count, max(capacity, needed, MIN_LANE_CAPACITY), max_records)

    @property
    def max_record(self) -> int:
        """Largest payload a lane takes: half the lane, less the header. A record then always
        fits once the reader has caught up: its wrap pad is shorter than the record."""
        return self.lane_capacity // 2 - RECORD_HEADER_BYTES

    @property
    def data_offset(self) -> int:
        control_end = CONTROL_OFFSET + CONTROL_BYTES * self.lane_count
        return -(-control_end // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def file_size(self) -> int:
        return self.data_offset + self.lane_capacity * self.lane_count

    def validate(self) -> None:
        if not 2 <= self.lane_count <= MAX_LANES:
            raise RingFormatError(f"lane count {self.lane_count} is not in [2, {MAX_LANES}]")
        cap = self.lane_capacity
        if cap < MIN_LANE_CAPACITY or cap & (cap - 1):
            raise RingFormatError(f"lane capacity {cap} is not a power of two >= "
                                  f"{MIN_LANE_CAPACITY}")
        if self.max_records < 1:
            raise RingFormatError(f"max_records {self.max_records} must be at least 1")


class RingFile:
    """An attached ring file: the mapping, its geometry, and views for the producer and reader.

    Create with `RingFile.create()` (or `open()`, which attaches to a matching file and creates
    one otherwise); `attach()` maps an existing one after checking its header.
    """

    def __init__(self, path: str, fd: int, geometry: Geometry, locked_publish: bool) -> None:
        self.path = path
        self.locks_dir = path + ".locks"
        self.geometry = geometry
        self.locked_publish = locked_publish
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._mmap = mmap.mmap(fd, geometry.file_size, flags=flags)
        self.bytes = memoryview(self._mmap)
        self.words = self.bytes.cast("Q")

    # -- creating and attaching ------------------------------------------------------------

    @classmethod
    def create(cls, path: str, geometry: Geometry, *, locked_publish: bool | None = None
               ) -> RingFile:
        """Create a new ring file at `path` (mode 0600, memory allocated up front so a full
        tmpfs fails here with ENOSPC rather than with SIGBUS later) in a private folder
        (`private.UnsafePathError` otherwise). Raises FileExistsError if a file is already
        there."""
        if struct.calcsize("P") != 8:
            raise RingError("the ring needs a 64-bit Python (8-byte stores must be atomic)")
        geometry.validate()
        if locked_publish is None:
            locked_publish = not ordered_stores()
        folder, name = os.path.split(path)
        private.check_folder(folder or ".")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
        try:
            os.posix_fallocate(fd, 0, geometry.file_size)
            header = _GLOBAL.pack(MAGIC, VERSION, FLAG_LOCKED_PUBLISH if locked_publish else 0,
                                  geometry.lane_count, 0, geometry.lane_capacity,
                                  geometry.max_record, geometry.max_records,
                                  geometry.data_offset, geometry.file_size)
            os.pwrite(fd, header + struct.pack("<Q", time.time_ns()), 0)
            private.make_folder(path + ".locks")
            os.link(tmp, path)  # fails if the path exists: no clobbering a live ring
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        try:
            return cls(path, fd, geometry, locked_publish)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: str, expected: Geometry | None = None) -> RingFile:
        """Map the ring at `path`. Raises RingFormatError with the reason if it is not a ring
        of this format and version, is inconsistent, or differs from `expected`."""
        private.check_folder(os.path.dirname(path) or ".")
        fd = private.open_file(path, os.O_RDWR)
        try:
            header = os.pread(fd, _GLOBAL.size, 0)
            geometry, locked_publish = _parse_header(path, header, os.fstat(fd).st_size)
            if expected is not None and geometry != expected:
                raise RingFormatError(f"{path}: ring geometry {geometry} differs from the "
                                      f"expected {expected}")
            return cls(path, fd, geometry, locked_publish)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str, geometry: Geometry) -> RingFile:
        """Attach to the ring at `path` if it exists (it must match `geometry`), else create
        it. Safe when several processes race to do the same."""
        try:
            return cls.create(path, geometry)
        except FileExistsError:
            return cls.attach(path, geometry)

    def close(self) -> None:
        self.words.release()
        self.bytes.release()
        self._mmap.close()

    def unlink(self) -> None:
        """Remove the ring file and its lock files (processes still attached keep working).
        Only names the ring creates are removed, inside the lock folder opened without
        following a link."""
        folder = os.open(self.locks_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        try:
            for name in os.listdir(folder):
                if LOCK_NAME.fullmatch(name):
                    os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)
        os.rmdir(self.locks_dir)
        private.remove_file(self.path)

    # -- addressing ------------------------------------------------------------------------

    def control_word(self, lane: int, word: int) -> int:
        """Index into `words` of control word `word` of lane `lane`."""
        return (CONTROL_OFFSET + CONTROL_BYTES * lane) // 8 + word

    def lane_offset(self, lane: int) -> int:
        return self.geometry.data_offset + self.geometry.lane_capacity * lane

    def lock_path(self, name: str) -> str:
        return os.path.join(self.locks_dir, name)

    def open_lock(self, name: str) -> int:
        """Open (creating it if needed) the lock file `name`, in a lock folder checked to be
        private each time: locks are opened rarely, and a link there would be followed."""
        private.check_folder(self.locks_dir)
        return private.open_file(self.lock_path(name), os.O_RDWR, create=True)

    @property
    def overflow_lane(self) -> int:
        return self.geometry.lane_count - 1

    @property
    def reader_heartbeat_ns(self) -> int:
        """time.time_ns() of the reader's last heartbeat (0: never had a reader)."""
        return self.words[WORD_READER_HEARTBEAT]

    def owned_lanes(self) -> list[int]:
        """Dedicated lanes a live process owns now. Probes each lane's lock; a producer
        claiming a lane at that instant skips to the next one, so probe rarely."""
        owned = []
        for lane in range(self.overflow_lane):
            fd = self.open_lock(f"lane-{lane:03d}")
            try:
                if try_lock(fd):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    owned.append(lane)
            finally:
                os.close(fd)
        return owned

    # -- counters --------------------------------------------------------------------------

    def stats(self) -> RingStats:
        """A snapshot of every counter; reads only, so it never disturbs writers."""
        words = self.words
        lanes = []
        for lane in range(self.geometry.lane_count):
            base = self.control_word(lane, 0)
            lanes.append(LaneStats(
                lane=lane,
                overflow=lane == self.overflow_lane,
                owner_pid=words[base + OWNER_PID],
                appended=words[base + APPENDED],
                consumed=words[base + CONSUMED],
                dropped_full=words[base + DROPPED_FULL],
                dropped_oversize=words[base + DROPPED_OVERSIZE],
                dropped_busy=words[base + DROPPED_BUSY],
                bytes_in_use=max(0, words[base + TAIL] - words[base + HEAD]),
                corrupt_resets=words[base + CORRUPT_RESETS],
            ))
        return RingStats(
            path=self.path,
            lane_capacity=self.geometry.lane_capacity,
            max_record=self.geometry.max_record,
            reader_pid=words[WORD_READER_PID],
            reader_heartbeat_ns=words[WORD_READER_HEARTBEAT],
            committed_records=words[WORD_COMMITTED],
            lanes=tuple(lanes),
        )


@dataclass(frozen=True)
class LaneStats:
    lane: int
    overflow: bool
    owner_pid: int  # last process that claimed the lane (it may have exited since)
    appended: int
    consumed: int
    dropped_full: int
    dropped_oversize: int
    dropped_busy: int
    bytes_in_use: int
    corrupt_resets: int

    @property
    def records_in_use(self) -> int:
        return max(0, self.appended - self.consumed)


@dataclass(frozen=True)
class RingStats:
    path: str
    lane_capacity: int
    max_record: int
    reader_pid: int
    reader_heartbeat_ns: int
    committed_records: int
    lanes: tuple[LaneStats, ...]

    @property
    def appended(self) -> int:
        return sum(lane.appended for lane in self.lanes)

    @property
    def dropped(self) -> int:
        return sum(lane.dropped_full + lane.dropped_oversize + lane.dropped_busy
                   for lane in self.lanes)

    @property
    def bytes_in_use(self) -> int:
        return sum(lane.bytes_in_use for lane in self.lanes)

    @property
    def records_in_use(self) -> int:
        return sum(lane.records_in_use for lane in self.lanes)

    @property
    def capacity(self) -> int:
        return self.lane_capacity * len(self.lanes)


def _parse_header(path: str, header: bytes, actual_size: int) -> tuple[Geometry, bool]:
    if len(header) < _GLOBAL.size or header[:8] != MAGIC:
        raise RingFormatError(f"{path} is not a moesif_fast ring file (bad magic)")
    (_, version, flags, lane_count, _, capacity, max_record, max_records, data_offset,
     file_size) = _GLOBAL.unpack(header)
    if version != VERSION:
        raise RingFormatError(f"{path} is a ring of format version {version}; this moesif_fast "
                              f"reads version {VERSION}. Remove the file or use one version.")
    geometry = Geometry(lane_count, capacity, max_records)
    try:
        geometry.validate()
    except RingFormatError as error:
        raise RingFormatError(f"{path}: {error}") from None
    if (max_record, data_offset, file_size) != (geometry.max_record, geometry.data_offset,
                                                geometry.file_size):
        raise RingFormatError(f"{path}: inconsistent ring header")
    if actual_size != file_size:
        raise RingFormatError(f"{path} is {actual_size} bytes; its header says {file_size}")
    return geometry, bool(flags & FLAG_LOCKED_PUBLISH)


def store_locked(fd: int, words: memoryview, index: int, value: int) -> None:
    """Locked-publish mode: store a control word while holding the lane's sync lock."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        words[index] = value
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def try_lock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without waiting; False if another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
