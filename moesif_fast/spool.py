"""The spool: a bounded on-disk FIFO of opaque byte records, for the shipper.

When the collector is slow or away, the shipper's mover thread appends raw ring records here
and the loop thread reads them back in order, delivers them and commits them. The spool knows
nothing of Django, HTTP or the record format: a record is a byte string.

Folder (a private folder, `moesif_fast.private`: a real folder of this user, mode 0700)
    spool.lock          held with a non-blocking `flock` for the Spool's lifetime: one process
                        at a time (SpoolBusyError otherwise); the kernel drops it on any exit
    <seq>.seg           segments, mode 0600, created exclusively and only ever appended to;
                        <seq> is the sequence number of the segment's first record (records are
                        numbered in append order from 0) as 16 lowercase hex digits
    ledger              the committed position, replaced atomically (temporary file, rename)

Every integer is little-endian. CRC-32 is `zlib.crc32`: IEEE 802.3 (polynomial 0x04C11DB7, as
in gzip and PNG), not CRC-32C.

    Segment header, 16 bytes
        0  char[7] magic b"MFSPOOL"     7  u8 version (2)
        8  u64 created_ns (time.time_ns() when the file was created)
    Blocks from offset 16, one after another: one per append call and segment it reaches
        0  char[4] sync marker b"\\xf3\\x5a\\x0b\\xc9"
        4  u32 CRC-32 of bytes 8..28 (the rest of this header)
        8  u32 count: how many records the block holds (at least 1)
       12  u32 body bytes (what follows this header)
       16  u64 written_ns (time.time_ns() of the append call that wrote it)
       24  u32 CRC-32 of the body
       28  body: the table (each record's payload length, u32), then the payloads in order
    Ledger, 28 bytes
        0  char[7] magic b"MFSPLDG"     7  u8 version (1)
        8  u64 sequence number of the segment holding the committed position
       16  u64 byte offset in that segment where the first record not delivered begins (its
           block's header if it is the block's first record, else its payload)
       24  u32 CRC-32 of bytes 0..24

One checksum per block, not per record: zlib.crc32 has a fixed cost per call, so over 1 KB
records one CRC of the whole body costs about half as much per record, and the header is
packed once per block. The header has a CRC of its own, so a block whose body is damaged still
says how many records it held. The price: damage anywhere in a body loses the whole block (at
most one append call's records), not just the record it hit.

A segment rolls over when the next block would take it past SEGMENT_BYTES; a record never spans
two segments (a record larger than that gets a segment of its own). A block goes to the file in
one `pwrite` of one buffer (the table and the payloads joined once, the header filled in after
the CRC): no per-record header, syscall or checksum call.

Opening. Byte and record counts are recomputed from the segment files, never taken from the
ledger: every block is checked (sync marker, header CRC, body within the file, body CRC, a
table that adds up to the body). A block is kept or dropped whole. In the last segment, a torn
tail (a partial block, or bytes that are no good block, after the last good one) is cut off and
counted in `truncated_bytes`: its records were either never acknowledged (the process died in
the write) or not yet synced (a power loss), which the durability promise below allows. A
damaged stretch elsewhere is skipped up to the next sync marker whose block checks out; its
records are counted in `dropped_corrupt` block by block (exactly, from a header whose CRC
checks out even if its marker is lost; from the count field of a header with a bad CRC and an
intact marker if that many table entries fit; else one) and logged. A segment whose header is
not this format and version (version 1 segments included: nothing was converted) is logged,
counted the same way (a version 1 frame counts as one) and deleted. The search for a marker
does a bounded amount of work, so damage never makes opening loop. Reading starts at the
ledger's position. A ledger naming a segment that no longer exists (dropped to stay under a
bound, or damaged) means the first existing segment; segments before the ledger's were
delivered and are deleted. A damaged or missing ledger means the first segment: records are
sent again rather than lost.

Reading and committing. The spool keeps, per segment, the offset and length of every good
record's payload (12 bytes of memory per record held) and the offset, first record and write
time of every block (24 bytes per block): from the scan at open, and from `append`. `read`
takes its batch from that index with one `pread`, from where its first record begins to the
end of its last, and slices the records out of it. It checks that it got every byte and that
every block header in the range checks out (marker, CRC) with the write time the index holds;
it does not recompute body CRCs, which were checked when the blocks were written or scanned.
A segment found changed under the spool (it no longer matches the index) is given up from
there: counted in `dropped_corrupt` and logged; `read` never raises. (The next open scans the
file again and keeps what still checks out.) `commit`
may come in any order, but the committed position only moves over a prefix of batches that
are all committed, as in the ring's reader. A segment whose every record is committed, and
that is not the one being written, is deleted: the ledger is persisted first, then the file
unlinked, so a crash in between leaves a ledger that names a later segment, never one that
names a deleted file.

Bounds. Before an append, if the held bytes (from the committed position to the end) plus the
new block would pass `max_bytes`, the held records plus the new ones would pass `max_records`,
or the file system's free space (`statvfs`: f_bavail * f_frsize) would fall under
max(MIN_FREE_BYTES, MIN_FREE_SHARE of the file system), the OLDEST whole segments (never the
one being written) are deleted, and their records not yet read are counted in `dropped_full`
(records already read are the caller's: delivered later, they are counted as committed, not
twice). Batches already read from a deleted segment still commit, harmlessly; the read cursor
moves past it. When only the segment being written is left and it is still too much, the
NEWEST records of the call are dropped and counted. Oldest first, because Fluent Bit
(storage.total_limit_size) and the Datadog agent's retry files do the same; because what
dashboards and alerts need most after an outage is the newest traffic; and because deleting a
whole file is one cheap unlink.

Errors. An OSError while writing (ENOSPC, EIO, ...) never leaves `append`: the segment is cut
back to its last good block where possible, the call returns how many of its records were
taken, and the rest are counted in `write_errors` and logged (at most once a minute). Only the
constructor raises (an unusable folder: OSError, `private.UnsafePathError`, SpoolBusyError);
the shipper then runs without a spool.

Durability. Nothing is synced per record. A record `append` returned for lives in the page
cache: a crash or SIGKILL of the process loses none of them. A power loss loses at most what
was written since the last `sync()`, which the shipper calls about once a second and at exit
(a segment rolled over in between is synced by the next `sync()` too). Commits are persisted
by `sync()` and before a segment is deleted, not per commit: after a crash, the batches
committed since then are delivered again. That is at-least-once delivery; a duplicate keeps
its transaction id, so it can be recognized. The ledger is replaced without an fsync of its
own (the folder is synced by `sync()`): one lost to a power loss means records sent again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add, sub

from . import private

SEGMENT_BYTES = 16 << 20  # a segment rolls over when the next block would pass this
MIN_FREE_BYTES = 64 << 20  # the free space left on the file system, at least ...
MIN_FREE_SHARE = 0.05  # ... and at least this share of the file system
MAGIC = b"MFSPOOL"
VERSION = 2  # of the segments
LEDGER_MAGIC = b"MFSPLDG"
LEDGER_VERSION = 1
SYNC = b"\xf3\x5a\x0b\xc9"
SEGMENT_HEADER = struct.Struct("<7sBQ")
HEADER_BYTES = SEGMENT_HEADER.size  # 16
BLOCK = struct.Struct("<4sIIIQI")  # marker, header CRC, count, body bytes, written_ns, body CRC
BLOCK_BYTES = BLOCK.size  # 28
ENTRY_BYTES = 4  # a record's entry in its block's table: its length
LEDGER = struct.Struct("<7sBQQ")
LEDGER_BYTES = LEDGER.size + 4  # 28, with the CRC
LOCK_NAME = "spool.lock"
LEDGER_NAME = "ledger"
SEGMENT_NAME = re.compile(r"[0-9a-f]{16}\.seg")
LEFTOVER_NAME = re.compile(r"\.ledger\..*\.tmp")  # a temporary ledger a crash left behind
WARN_INTERVAL = 60.0  # seconds between two warnings of the same kind

_BLOCK_FIELDS = struct.Struct("<IIQI")  # the header's bytes 8..28, which its CRC covers
_NO_HEADER = bytes(BLOCK_BYTES)  # where a block's header goes once its body is checksummed
_crc32 = zlib.crc32
logger = logging.getLogger("moesif_fast.shipper")


class SpoolBusyError(OSError):
    """Another Spool (in this process or another) holds the folder's lock."""


@dataclass(frozen=True)
class SpoolStats:
    bytes: int  # held: from the committed position to the end of the newest segment
    records: int  # held: appended, not yet committed (nor dropped)
    segments: int
    oldest_ns: int  # write time of the oldest held record, 0 if none
    appended: int  # records written by append()
    committed: int  # records in committed batches
    dropped_full: int  # records dropped to stay under a bound
    dropped_corrupt: int  # records skipped as damaged
    truncated_bytes: int  # torn tail cut off at open
    write_errors: int  # records an I/O error kept out of the spool (append returned less)


class SpoolBatch:
    """Records read together (`records`, in append order), committed together."""

    __slots__ = ("records", "sequences", "_end", "_first_ns", "_committed")

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.sequences: list[int] = []  # each record's sequence number (its segment's first
        # plus its index there): the same for the same record when the spool is opened again
        self._end: tuple[_Segment, int] | None = None  # (segment, index) after the batch
        self._first_ns = 0
        self._committed = False


class _Segment:
    __slots__ = ("seq", "path", "fd", "end", "starts", "lengths", "blocks", "firsts", "times",
                 "read", "committed", "alive")

    def __init__(self, seq: int, path: str, fd: int, end: int) -> None:
        self.seq = seq
        self.path = path
        self.fd = fd  # -1 when closed
        self.end = end  # end of the last good block
        self.starts = array("Q")  # offset of each good record's payload
        self.lengths = array("I")  # its length
        self.blocks = array("Q")  # offset of each block holding good records
        self.firsts = array("Q")  # index of its first record
        self.times = array("Q")  # its written_ns
        self.read = 0  # index of the next record to read
        self.committed = 0  # index of the first record not committed
        self.alive = True  # False once deleted

    def add(self, at: int, end: int, lengths: Sequence[int], written_ns: int) -> None:
        """Index the good block at `at` (ending at `end`) of records `lengths` long."""
        self.blocks.append(at)
        self.firsts.append(len(self.starts))
        self.times.append(written_ns)
        first = at + BLOCK_BYTES + ENTRY_BYTES * len(lengths)
        self.starts.extend(accumulate(lengths[:-1], initial=first))
        self.lengths.extend(lengths)
        self.end = end

    def offset(self, index: int) -> int:
        """Where record `index` begins: at its block's header if it is the block's first
        record, else at its payload; one past the last record: the end."""
        if index >= len(self.starts):
            return self.end
        block = self.block_of(index)
        return self.blocks[block] if self.firsts[block] == index else self.starts[index]

    def block_of(self, index: int) -> int:
        """The block holding record `index`."""
        return bisect_right(self.firsts, index) - 1


# --- blocks ------------------------------------------------------------------------------------


def _header(data: bytes, at: int, size: int) -> tuple[int, int, int, int] | None:
    """(count, end, written_ns, body CRC) of the block header at `at` in data[:size], if its
    marker and CRC check out and its body can hold its table; else None."""
    if at + BLOCK_BYTES > size:
        return None
    sync, crc, count, body, written_ns, body_crc = BLOCK.unpack_from(data, at)
    if (sync != SYNC or crc != _crc32(data[at + 8:at + BLOCK_BYTES]) or count < 1
            or body < ENTRY_BYTES * count):
        return None
    return count, at + BLOCK_BYTES + body, written_ns, body_crc


def _block(data: bytes, view: memoryview, at: int, size: int
           ) -> tuple[tuple[int, ...], int, int] | None:
    """(payload lengths, end, written_ns) of the good block at `at` in data[:size], or None."""
    header = _header(data, at, size)
    if header is None:
        return None
    count, end, written_ns, body_crc = header
    if end > size or _crc32(view[at + BLOCK_BYTES:end]) != body_crc:
        return None
    lengths = struct.unpack_from(f"<{count}I", data, at + BLOCK_BYTES)
    if BLOCK_BYTES + ENTRY_BYTES * count + sum(lengths) != end - at:
        return None
    return lengths, end, written_ns


def _next_block(data: bytes, view: memoryview, at: int, size: int) -> int:
    """The start of the first good block after `at`, or `size` if there is none. The bytes
    checked are bounded (a stretch full of false markers must not take forever)."""
    budget = 4 * size + (1 << 20)
    candidate = data.find(SYNC, at + 1, size)
    while candidate >= 0 and budget > 0:
        if _block(data, view, candidate, size) is not None:
            return candidate
        header = _header(data, candidate, size)
        budget -= BLOCK_BYTES + (min(header[1], size) - candidate if header else 0)
        candidate = data.find(SYNC, candidate + 1, size)
    return size


def _count_lost(data: bytes, start: int, stop: int) -> int:
    """How many records the damaged stretch data[start:stop] held, as far as can be told,
    block by block: the count of a header whose CRC checks out (its marker may be damaged),
    else the count field after an intact marker if that many table entries fit, else 1. At
    least 1."""
    count, at = 0, start
    while at < stop:
        claimed, end = 1, -1
        if at + BLOCK_BYTES <= stop:
            sync, crc, fields_count, body, _, _ = BLOCK.unpack_from(data, at)
            if crc == _crc32(data[at + 8:at + BLOCK_BYTES]):
                claimed, end = fields_count, at + BLOCK_BYTES + body
            elif sync == SYNC and BLOCK_BYTES + ENTRY_BYTES * fields_count <= stop - at:
                claimed = fields_count
        count += max(claimed, 1)
        if at < end <= stop:
            at = end
            continue
        at = data.find(SYNC, at + 1, stop)
        if at < 0:
            break
    return max(count, 1)


def _segment_path(folder: str, seq: int) -> str:
    return os.path.join(folder, f"{seq:016x}.seg")


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size and (chunk := os.pread(fd, size - offset, offset)):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# --- the spool ---------------------------------------------------------------------------------


class Spool:
    """A bounded on-disk FIFO of byte records in `folder` (created if missing; its parent must
    exist). `append` and `sync` belong to one thread, `read` and `commit` to another."""

    def __init__(self, folder: str, max_bytes: int = 1 << 30, max_records: int = 1_000_000
                 ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._lock = threading.Lock()
        self._closed = False
        self._segments: list[_Segment] = []  # oldest first; the newest is being written
        self._reading: _Segment  # the segment read() takes from
        self._pending: list[SpoolBatch] = []  # read, not yet released, in read order
        self._unsynced: list[_Segment] = []  # rolled over since the last sync()
        self._total_bytes = 0  # sum of the segments' ends
        self._held = 0  # records not committed (nor dropped)
        self._unread = 0  # records not yet handed out by read()
        self._appended = self._committed = self._dropped_full = 0
        self._dropped_corrupt = self._truncated_bytes = self._write_errors = 0
        self._ledger_dirty = self._folder_dirty = False
        self._tail_dirty = False  # the last segment was written since the last sync()
        self._warned: dict[str, float] = {}
        self._folder_fd = -1
        private.make_folder(folder)
        self._lock_fd = private.open_file(os.path.join(folder, LOCK_NAME), os.O_RDWR,
                                          create=True)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolBusyError(errno.EWOULDBLOCK, f"{folder} is in use by another spool "
                                 "(one process at a time)") from None
        try:
            self._folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._open()
        except BaseException:
            self._close_files()
            raise

    # -- the writer thread ---------------------------------------------------------------------

    def append(self, records: list[bytes]) -> int:
        """Write `records` in order; returns how many of them (a prefix of the list) the spool
        took: written, or dropped to stay under a bound (counted in `dropped_full`). The rest,
        if any, were kept out by an I/O error (counted in `write_errors`): the caller keeps
        them."""
        with self._lock:
            if self._closed or not records:
                return 0
            block_bytes = BLOCK_BYTES + sum(map(len, records)) + ENTRY_BYTES * len(records)
            fits = self._make_room(records, block_bytes)
            written = self._write(records, fits) if fits else 0
            self._tail_dirty = self._tail_dirty or written > 0
            self._appended += written
            self._held += written
            self._unread += written
            if written < fits:
                self._write_errors += len(records) - written
                return written
            if fits < len(records):
                self._dropped_full += len(records) - fits
                self._warn("full", "spool full: dropped the newest %d records of %d",
                           len(records) - fits, len(records))
            return len(records)

    def sync(self) -> None:
        """Make what was appended survive a power loss (fdatasync), and persist the committed
        position. Errors are logged, not raised."""
        with self._lock:
            if self._closed:
                return
            to_sync = []  # descriptors this call owns
            for segment in self._unsynced:  # rolled over: its descriptor is not needed after
                if segment.fd >= 0 and segment is not self._reading:
                    to_sync.append(segment.fd)
                    segment.fd = -1
                else:
                    with contextlib.suppress(OSError):
                        to_sync.append(os.dup(self._read_fd(segment)))
            self._unsynced.clear()
            if self._tail_dirty:  # an idle spool does no I/O
                self._tail_dirty = False
                with contextlib.suppress(OSError):
                    to_sync.append(os.dup(self._segments[-1].fd))
        for fd in to_sync:  # outside the lock: the reader need not wait for the disk
            try:
                os.fdatasync(fd)
            except OSError as error:
                self._warn("sync", "spool: could not sync a segment to disk: %s", error)
            finally:
                os.close(fd)
        with self._lock:
            if not self._closed:
                self._persist_ledger()
                self._sync_folder()

    # -- the reader thread ---------------------------------------------------------------------

    def read(self, max_records: int, max_bytes: int) -> SpoolBatch:
        """Up to `max_records` records and about `max_bytes` payload bytes (at least one record
        when any is unread, even a larger one), the oldest unread first. Empty when nothing is
        unread."""
        batch = SpoolBatch()
        with self._lock:
            if self._closed or max_records <= 0:
                return batch
            self._read_into(batch, max_records, max_bytes)
            if batch.records:
                batch._end = (self._reading, self._reading.read)
                self._pending.append(batch)
        return batch

    def commit(self, batch: SpoolBatch) -> None:
        """Mark `batch` delivered. The committed position moves over the batches read before
        it once they are all committed; fully committed segments are deleted."""
        with self._lock:
            if batch._committed or batch not in self._pending:  # empty, or not this spool's
                return
            batch._committed = True
            self._committed += len(batch.records)
            released, end = 0, None
            for done in self._pending:
                if not done._committed:
                    break
                released += 1
                if done._end[0].alive:
                    end = done._end
            if released:
                del self._pending[:released]
                if end is not None and not self._closed:
                    self._advance(*end)

    def unread(self) -> int:
        """Records appended and not yet returned by read()."""
        with self._lock:
            return self._unread

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(
                bytes=self._held_bytes(), records=self._held, segments=len(self._segments),
                oldest_ns=self._oldest_ns(), appended=self._appended,
                committed=self._committed, dropped_full=self._dropped_full,
                dropped_corrupt=self._dropped_corrupt, truncated_bytes=self._truncated_bytes,
                write_errors=self._write_errors)

    def close(self) -> None:
        """Sync, persist the committed position and release the folder. Records read and not
        committed are read again by the next Spool."""
        if self._closed:
            return
        self.sync()
        with self._lock:
            self._closed = True
            self._close_files()

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        folder = self.folder
        names = sorted(os.listdir(folder))
        for name in names:
            if LEFTOVER_NAME.fullmatch(name):
                private.remove_file(os.path.join(folder, name))
        ledger = self._load_ledger()
        found = [int(name[:16], 16) for name in names if SEGMENT_NAME.fullmatch(name)]
        if ledger is not None and ledger[0] in found:
            for seq in found:  # before the ledger's segment: delivered already
                if seq < ledger[0]:
                    private.remove_file(_segment_path(folder, seq))
            found = [seq for seq in found if seq >= ledger[0]]
        else:
            ledger = None
        for index, seq in enumerate(found):
            self._open_segment(seq, ledger[1] if ledger and seq == ledger[0] else 0,
                               last=index == len(found) - 1)
        segments = self._segments
        if not segments or segments[-1].fd < 0:  # none, or the newest one's header was bad
            after = segments[-1].seq + max(len(segments[-1].starts), 1) if segments else 0
            self._new_segment(max(after, ledger[0] if ledger else 0))
        first = segments[0]
        if ledger is None or first.seq != ledger[0]:
            first.committed = 0
        first.read = first.committed
        self._reading = first
        self._total_bytes = sum(segment.end for segment in segments)
        self._held = self._unread = sum(len(s.starts) for s in segments) - first.committed

    def _load_ledger(self) -> tuple[int, int] | None:
        path = os.path.join(self.folder, LEDGER_NAME)
        try:
            data = private.read_file(path, LEDGER_BYTES)
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("spool: cannot read the ledger %s (%s): every record in the spool "
                           "is sent again", path, error)
            return None
        if len(data) == LEDGER_BYTES and _crc32(data[:-4]) == int.from_bytes(data[-4:], "little"):
            magic, version, seq, offset = LEDGER.unpack_from(data)
            if magic == LEDGER_MAGIC and version == LEDGER_VERSION:
                return seq, offset
        logger.warning("spool: the ledger %s is damaged: every record in the spool is sent "
                       "again", path)
        return None

    def _open_segment(self, seq: int, ledger_offset: int, last: bool) -> None:
        """Scan the segment file `seq` and add it to the spool, or delete it if its header is
        bad. `ledger_offset`: the ledger's committed position in it (0: none)."""
        path = _segment_path(self.folder, seq)
        fd = private.open_file(path, os.O_RDWR if last else os.O_RDONLY)
        try:
            data = _read_all(fd)
        except OSError:
            os.close(fd)
            raise
        size = len(data)
        magic, version, _ = SEGMENT_HEADER.unpack_from(data.ljust(HEADER_BYTES, b"\0"))
        if size < HEADER_BYTES and last and MAGIC.startswith(data[:7]):
            self._truncated_bytes += size  # created, header not yet written: torn, empty
            os.close(fd)
            private.remove_file(path)
            return
        if magic != MAGIC or version != VERSION:
            lost = _count_lost(data, HEADER_BYTES, size) if size > HEADER_BYTES else 0
            self._dropped_corrupt += lost
            logger.warning("spool: %s is damaged: its header is not a version %d segment; "
                           "deleted it, and about %d records in it", path, VERSION, lost)
            os.close(fd)
            private.remove_file(path)
            return
        segment = _Segment(seq, path, fd, HEADER_BYTES)
        view = memoryview(data)
        at, lost = HEADER_BYTES, 0
        while at < size:
            block = _block(data, view, at, size)
            if block is not None:
                lengths, end, written_ns = block
                segment.add(at, end, lengths, written_ns)
                at = end
                continue
            following = _next_block(data, view, at, size)
            if following == size:
                break  # no good block after it: a damaged tail
            if following > ledger_offset:  # not delivered already
                lost += _count_lost(data, at, following)
            at = following
        view.release()
        tail = size - segment.end
        if tail and last:
            os.ftruncate(fd, segment.end)
            self._truncated_bytes += tail
            logger.warning("spool: cut a torn tail of %d bytes off %s (a write the process or "
                           "machine did not finish)", tail, path)
        elif tail:
            lost += _count_lost(data, segment.end, size)
        if lost:
            self._dropped_corrupt += lost
            logger.warning("spool: %s is damaged: skipped about %d records", path, lost)
        segment.committed = bisect_left(segment.starts, ledger_offset)  # before the ledger's
        if not last:
            os.close(fd)
            segment.fd = -1
        self._segments.append(segment)

    # -- writing -------------------------------------------------------------------------------

    def _held_bytes(self) -> int:
        first = self._segments[0]
        return self._total_bytes - first.offset(first.committed)

    def _make_room(self, records: list[bytes], block_bytes: int) -> int:
        """Drop the oldest segments until `records` (`block_bytes` as a block) fit under the
        bounds; returns how many of them fit then: all, unless only the segment being written
        is left."""
        segments, count = self._segments, len(records)
        free = self._free_bytes()

        def excess() -> tuple[int, int]:  # (bytes, records) over the tightest bound
            return (max(self._held_bytes() + block_bytes - self.max_bytes, block_bytes - free),
                    self._held + count - self.max_records)

        over_bytes, over_records = excess()
        if over_bytes <= 0 and over_records <= 0:
            return count
        dropped = 0
        while len(segments) > 1 and (over_bytes > 0 or over_records > 0):
            free += segments[0].end
            dropped += self._drop_oldest()
            over_bytes, over_records = excess()
        if dropped:
            self._warn("full", "spool full: dropped the oldest %d records not yet sent",
                       dropped)
        fits = max(0, count - max(over_records, 0))
        if over_bytes > 0:
            budget = block_bytes - over_bytes - BLOCK_BYTES
            for index, record in enumerate(records[:fits]):
                budget -= ENTRY_BYTES + len(record)
                if budget < 0:
                    return index
        return fits

    def _free_bytes(self) -> int:
        """Free space on the file system above the floor (negative: under it)."""
        try:
            status = os.statvfs(self.folder)
        except OSError:
            return 1 << 62
        floor = max(MIN_FREE_BYTES, int(status.f_blocks * status.f_frsize * MIN_FREE_SHARE))
        return status.f_bavail * status.f_frsize - floor

    def _drop_oldest(self) -> int:
        """Delete the oldest segment (not the one being written); returns its unread records
        (counted as dropped)."""
        oldest = self._segments.pop(0)
        count = len(oldest.starts)
        unread = count - oldest.read
        self._dropped_full += unread
        self._unread -= unread
        self._held -= count - oldest.committed
        self._total_bytes -= oldest.end
        self._forget(oldest)
        if self._reading is oldest:
            self._reading = self._segments[0]
        self._ledger_dirty = True
        return unread

    def _write(self, records: list[bytes], count: int) -> int:
        """Write the first `count` records, one block per segment; returns how many were
        written (fewer on error)."""
        now = time.time_ns()
        todo = records[:count]
        lengths = list(map(len, todo))
        ends = list(accumulate(map(add, lengths, repeat(ENTRY_BYTES))))  # from the call's start
        segment, written = self._segments[-1], 0
        while written < count:
            base = ends[written - 1] if written else 0
            room = SEGMENT_BYTES - segment.end - BLOCK_BYTES
            stop = bisect_right(ends, base + room, written)  # the records that fit
            if stop == written:  # the next record does not fit
                if segment.end == HEADER_BYTES:
                    stop += 1  # larger than a segment: alone in a new one
                else:
                    segment = self._roll(segment)
                    if segment is None:
                        return written
                    continue
            if not self._flush(segment, todo[written:stop], lengths[written:stop], now):
                return written
            written = stop
        return written

    def _flush(self, segment: _Segment, payloads: list[bytes], lengths: list[int], now: int
               ) -> bool:
        """Write `payloads` (`lengths` long) as one block at the end of `segment` and index
        it; False on an I/O error (the segment is cut back)."""
        count = len(lengths)
        data = bytearray().join([_NO_HEADER, struct.pack(f"<{count}I", *lengths), *payloads])
        size = len(data)
        start = segment.end
        with memoryview(data) as view:
            fields = _BLOCK_FIELDS.pack(count, size - BLOCK_BYTES, now,
                                        _crc32(view[BLOCK_BYTES:]))
            view[:BLOCK_BYTES] = SYNC + _crc32(fields).to_bytes(4, "little") + fields
            try:
                done = 0
                while done < size:
                    done += os.pwrite(segment.fd, view[done:], start + done)
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, start)
                self._warn("write", "spool: could not write %d records to %s: %s; the "
                           "shipper keeps them", count, segment.path, error)
                return False
        segment.add(start, start + size, lengths, now)
        self._total_bytes += size
        return True

    def _roll(self, segment: _Segment) -> _Segment | None:
        """Start a new segment after `segment`; None on an I/O error."""
        try:
            new = self._new_segment(segment.seq + max(len(segment.starts), 1))
        except OSError as error:
            self._warn("write", "spool: could not start a new segment in %s: %s; the shipper "
                       "keeps the records", self.folder, error)
            return None
        self._unsynced.append(segment)  # sync() syncs and closes it
        self._release()
        return new

    def _new_segment(self, seq: int) -> _Segment:
        path = _segment_path(self.folder, seq)
        fd = private.open_file(path, os.O_RDWR, exclusive=True)
        try:
            os.pwrite(fd, SEGMENT_HEADER.pack(MAGIC, VERSION, time.time_ns()), 0)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        segment = _Segment(seq, path, fd, HEADER_BYTES)
        self._segments.append(segment)
        self._total_bytes += HEADER_BYTES
        self._folder_dirty = True
        return segment

    # -- reading -------------------------------------------------------------------------------

    def _read_into(self, batch: SpoolBatch, max_records: int, max_bytes: int) -> None:
        records = batch.records
        segment = self._reading
        taken = nbytes = 0
        while taken < max_records and nbytes < max_bytes:
            index = segment.read
            count = min(max_records - taken, len(segment.starts) - index)
            if count <= 0:
                if segment is self._segments[-1]:
                    break
                segment = self._reading = self._next_segment(segment)
                continue
            lengths = segment.lengths[index:index + count]
            totals = list(accumulate(lengths))
            count = min(count, bisect_left(totals, max_bytes - nbytes) + 1)  # about max_bytes
            last = index + count - 1
            first = segment.offset(index)
            size = segment.starts[last] + lengths[count - 1] - first
            try:
                data = os.pread(self._read_fd(segment), size, first)
            except OSError as error:
                data = b""
                self._warn("damage", "spool: cannot read %s: %s", segment.path, error)
            if not self._matches(segment, data, first, size, index, last):
                continue
            if not records:
                batch._first_ns = segment.times[segment.block_of(index)]
            starts = list(map(sub, segment.starts[index:last + 1], repeat(first)))
            records.extend(map(data.__getitem__, map(slice, starts, map(add, starts, lengths))))
            batch.sequences.extend(range(segment.seq + index, segment.seq + last + 1))
            segment.read = last + 1
            self._unread -= count
            taken += count
            nbytes += totals[count - 1]

    def _matches(self, segment: _Segment, data: bytes, first: int, size: int, index: int,
                 last: int) -> bool:
        """True if `data`, `size` bytes read from `segment` at `first` for records `index`
        to `last`, is whole and every block header in it checks out and is where the index
        says. Otherwise the file changed since it was scanned or written: the rest of it is
        given up and counted."""
        if len(data) == size:
            block = bisect_left(segment.firsts, index)
            while block < len(segment.firsts) and segment.firsts[block] <= last:
                at = segment.blocks[block] - first
                header = _header(data, at, size)
                if header is None or header[2] != segment.times[block]:
                    break
                block += 1
            else:
                return True
        index = segment.read  # the records from here on leave the index, as if never written
        lost = len(segment.starts) - index
        cut = segment.offset(index)
        block = bisect_left(segment.firsts, index)
        for column in (segment.blocks, segment.firsts, segment.times):
            del column[block:]
        del segment.starts[index:]
        del segment.lengths[index:]
        self._total_bytes -= segment.end - cut
        segment.end = cut
        self._unread -= lost
        self._held -= lost
        self._dropped_corrupt += lost
        self._warn("damage", "spool: %s is damaged: it changed after it was written or "
                   "checked; gave up its last %d records", segment.path, lost)
        return False

    def _next_segment(self, segment: _Segment) -> _Segment:
        """Leave `segment`, read to its end, for the next one."""
        if segment not in self._unsynced:
            self._close_segment(segment)
        return self._segments[self._segments.index(segment) + 1]

    def _read_fd(self, segment: _Segment) -> int:
        if segment.fd < 0:
            segment.fd = private.open_file(segment.path, os.O_RDONLY)
        return segment.fd

    # -- committing ----------------------------------------------------------------------------

    def _advance(self, segment: _Segment, index: int) -> None:
        """Move the committed position to record `index` of `segment` (at or after it)."""
        segments = self._segments
        first = segments[0]
        if segment is first:
            if index <= first.committed:
                return
            self._held -= index - first.committed
        else:
            position = segments.index(segment)
            for passed in segments[:position]:
                self._held -= len(passed.starts) - passed.committed
                passed.committed = len(passed.starts)
            self._held -= index
        segment.committed = index
        self._ledger_dirty = True
        self._release()

    def _release(self) -> None:
        """Delete the fully committed segments (not the one being written), the ledger
        persisted first."""
        segments = self._segments
        done = 0
        while done + 1 < len(segments) and segments[done].committed >= len(segments[done].starts):
            done += 1
        if not done:
            return
        following = segments[done]
        self._ledger_dirty = True
        self._persist_ledger(following)
        for segment in segments[:done]:
            self._unread -= len(segment.starts) - segment.read
            self._total_bytes -= segment.end
            self._forget(segment)
            if self._reading is segment:
                self._reading = following
        del segments[:done]

    def _persist_ledger(self, first: _Segment | None = None) -> None:
        if not self._ledger_dirty:
            return
        first = first or self._segments[0]
        data = LEDGER.pack(LEDGER_MAGIC, LEDGER_VERSION, first.seq, first.offset(first.committed))
        try:
            private.replace_file(os.path.join(self.folder, LEDGER_NAME),
                                 data + _crc32(data).to_bytes(4, "little"))
        except OSError as error:
            self._warn("ledger", "spool: could not save the committed position: %s; records "
                       "already sent may be sent again", error)
            return
        self._ledger_dirty = False
        self._folder_dirty = True

    # -- housekeeping --------------------------------------------------------------------------

    def _forget(self, segment: _Segment) -> None:
        """Close and delete a segment that is no longer in the spool."""
        segment.alive = False
        if segment in self._unsynced:
            self._unsynced.remove(segment)
        self._close_segment(segment)
        try:
            private.remove_file(segment.path)
        except OSError as error:
            self._warn("remove", "spool: could not delete %s: %s", segment.path, error)
        self._folder_dirty = True

    @staticmethod
    def _close_segment(segment: _Segment) -> None:
        if segment.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
            segment.fd = -1

    def _sync_folder(self) -> None:
        if self._folder_dirty:
            try:
                os.fsync(self._folder_fd)
                self._folder_dirty = False
            except OSError as error:
                self._warn("sync", "spool: could not sync %s: %s", self.folder, error)

    def _oldest_ns(self) -> int:
        for batch in self._pending:
            if not batch._committed:
                return batch._first_ns
        if not self._unread or self._closed:
            return 0
        segments = self._segments
        for segment in segments[segments.index(self._reading):]:
            if segment.read < len(segment.starts):
                return segment.times[segment.block_of(segment.read)]
        return 0

    def _warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_INTERVAL) >= WARN_INTERVAL:
            self._warned[kind] = now
            logger.warning(message, *args)

    def _close_files(self) -> None:
        for segment in self._segments:
            self._close_segment(segment)
        for fd in (self._folder_fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._folder_fd = self._lock_fd = -1
