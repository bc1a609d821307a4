"""``vhdx serve``: the virtual disk over NBD, in pure standard-library Python.

The protocol is the NBD project's ``doc/proto.md``: fixed newstyle handshake;
options EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT,
SET_META_CONTEXT (anything else gets ``NBD_REP_ERR_UNSUP``); commands READ, WRITE,
DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES and BLOCK_STATUS with the
``base:allocation`` context taken from :meth:`VirtualDisk.extents` (data ->
allocated, zero / unallocated -> HOLE|ZERO), so clients skip what holds nothing.

One thread per connection. Reads go through ``readinto_at`` (the C reader: GIL
released, thread-safe) straight into the reply buffer behind the reply header, and
header and payload leave in one ``sendall``. A writable disk is not thread-safe,
so every operation on one takes a single lock. The wire formats are network
protocol messages, not on-disk structures: they are packed with :mod:`struct`,
which costs a fraction of what construct does on the per-request path.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from .disk import VirtualDisk
from .errors import InvalidArgumentError, OutputExistsError, ReadOnlyError, VhdxError, VhdxIOError

if TYPE_CHECKING:
    from .writer import WritableDisk

DEFAULT_PORT = 10809  # IANA-assigned NBD port

# --- handshake -----------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission flags ----------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

# --- requests and replies ------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"
META_ID = 1  # the one context this server offers

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 << 20  # the protocol's default maximum, what qemu-img uses
MAX_OPTION = 1 << 20  # option data beyond this is taken as a denial of service
MAX_STRING = 4096  # the protocol's limit on names and queries
_BS_PIECE = 64 << 20  # block status is resolved in pieces ...
_BS_MAX_DESCRIPTORS = 1 << 14  # ... until this many descriptors (bounded reply and latency)

_REQ = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length (28 bytes)
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie (16 bytes)
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length (20 bytes)
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + offset of an OFFSET_DATA chunk (28)
_OPT = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_DATA_AT = _CHUNK_DATA.size  # payload offset in a connection's buffer (room for either header)
_SIMPLE_AT = _DATA_AT - _SIMPLE.size


class _Disconnect(Exception):  # noqa: N818 - control flow inside this module, not an error
    """The peer went away, or broke the protocol so that the stream cannot go on."""


class _Export:
    """What every connection serves: the disk, its name, its flags and its lock."""

    def __init__(self, disk: VirtualDisk, name: str, read_only: bool, description: str) -> None:
        self.disk = disk
        self.size = disk.size
        self.name = name
        self.read_only = read_only
        self.description = description
        # WritableDisk is not thread-safe (reads commit pending metadata), so a
        # writable export does everything under one lock; read-only reads run free.
        self.lock = None if read_only else threading.Lock()

    def flags(self, structured: bool) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN
        if self.read_only:
            f |= TF_READ_ONLY
        else:
            f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        if structured:
            f |= TF_SEND_DF  # every read is answered with one content chunk anyway
        return f

    def matches(self, name: str) -> bool:
        return name in ("", self.name)


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, ReadOnlyError):
        return EPERM
    if isinstance(exc, InvalidArgumentError):
        return EINVAL
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ENOSPC
    return EIO


class _Connection:
    """One client: handshake, then requests answered in order."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.export = server._export
        self.sock = sock
        self.structured = False
        self.no_zeroes = False
        self.meta_selected = False  # base:allocation chosen by the last SET_META_CONTEXT
        self.block_status = False
        self._buf = bytearray(_DATA_AT + (2 << 20))
        self._mv = memoryview(self._buf)

    # --- socket helpers ----------------------------------------------------------
    def _recv_into(self, mv: memoryview) -> None:
        got, n = 0, len(mv)
        recv_into = self.sock.recv_into
        while got < n:
            k = recv_into(mv[got:], n - got, socket.MSG_WAITALL)
            if not k:
                raise _Disconnect
            got += k

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        if n:
            self._recv_into(memoryview(buf))
        return bytes(buf)

    def _drain(self, n: int) -> None:
        """Read and drop ``n`` bytes (a refused write's payload) in bounded memory."""
        scratch = self._mv[:min(len(self._mv), 1 << 20)]
        while n > 0:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k])
            n -= k

    def _buffer(self, size: int) -> memoryview:
        if len(self._buf) < size:  # the old buffer goes with its last view
            self._buf = bytearray(max(size, min(2 * len(self._buf), _DATA_AT + MAX_PAYLOAD)))
            self._mv = memoryview(self._buf)
        return self._mv

    # --- main ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            # A client that never completes the handshake must not hold a slot forever;
            # once transmitting, an idle client is normal (no timeout).
            self.sock.settimeout(self.server.handshake_timeout)
            if self._handshake():
                self.sock.settimeout(None)
                self._transmission()
        except (_Disconnect, ConnectionError, TimeoutError):
            pass
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.ENOTCONN, errno.EPIPE, errno.ESHUTDOWN):
                self.server._report(f"connection error: {e}")
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            self.server._report(f"connection dropped after an internal error: {type(e).__name__}: {e}")
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    # --- handshake ---------------------------------------------------------------------
    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.sock.sendall(_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self._reply(opt, rtype, message.encode()[:MAX_STRING])

    def _handshake(self) -> bool:
        """Negotiate; True when the transmission phase starts."""
        sock = self.sock
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self._recv(4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return False  # the protocol says: drop a client that sets unknown flags
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(self._recv(_OPT.size))
            if magic != IHAVEOPT or length > MAX_OPTION:
                return False  # not an option: the stream cannot be resynchronised
            data = self._recv(length)
            if self.server._stopping and opt != OPT_ABORT:
                self._error(opt, REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if opt == OPT_EXPORT_NAME:
                name = self._decode(data)
                if name is None or not self.export.matches(name):
                    return False  # EXPORT_NAME cannot answer an error: hard disconnect
                self._enter(name)
                sock.sendall(struct.pack(">QH", self.export.size, self.export.flags(self.structured))
                             + (b"" if self.no_zeroes else bytes(124)))
                return True
            if opt == OPT_ABORT:
                self._reply(opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                if data:
                    self._error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                raw = self.export.name.encode()
                self._reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw
                            + self.export.description.encode())
                self._reply(opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._info(opt, data) and opt == OPT_GO:
                    return True
            elif opt == OPT_STRUCTURED_REPLY:
                if data:
                    self._error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                self.structured = True
                self._reply(opt, REP_ACK)
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                self._meta_context(opt, data)
            else:
                self._error(opt, REP_ERR_UNSUP, f"option {opt} is not supported")

    @staticmethod
    def _decode(raw: bytes) -> str | None:
        if len(raw) > MAX_STRING or b"\0" in raw:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _enter(self, name: str) -> None:
        # BLOCK_STATUS needs a context chosen for this export (there is only one).
        self.block_status = self.meta_selected

    def _info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO; True when the export was accepted."""
        if len(data) < 6:
            self._error(opt, REP_ERR_INVALID, "option data too short")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > len(data) - 6:
            self._error(opt, REP_ERR_INVALID, "export name length exceeds the option data")
            return False
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 6 + nlen + 2 * nreq != len(data):
            self._error(opt, REP_ERR_INVALID, "information request list does not fit the option data")
            return False
        name = self._decode(data[4:4 + nlen])
        if name is None:
            self._error(opt, REP_ERR_INVALID, "export name is not a valid string")
            return False
        if not self.export.matches(name):
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name!r} (this server has {self.export.name!r})")
            return False
        wanted = set(struct.unpack_from(f">{nreq}H", data, 6 + nlen))
        ex = self.export
        self._reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, ex.size, ex.flags(self.structured)))
        # Sent unasked too: these are the protocol's defaults, which every client may assume.
        self._reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        if INFO_NAME in wanted:
            self._reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + ex.name.encode())
        if INFO_DESCRIPTION in wanted:
            self._reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + ex.description.encode())
        self._reply(opt, REP_ACK)
        if opt == OPT_GO:
            self._enter(name)
        return True

    def _meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == OPT_SET_META_CONTEXT
        if setting:
            self.meta_selected = False  # replaced even when the option fails
            if not self.structured:
                self._error(opt, REP_ERR_INVALID, "negotiate structured replies first")
                return
        parsed = self._parse_meta(data)
        if parsed is None:
            self._error(opt, REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        if not self.export.matches(name):
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if setting:
            hit = BASE_ALLOCATION in queries
        else:  # LIST: no query lists everything; "base:" is the namespace wildcard
            hit = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        if hit:
            self._reply(opt, REP_META_CONTEXT,
                        struct.pack(">I", META_ID if setting else 0) + BASE_ALLOCATION.encode())
        self.meta_selected = setting and hit
        self._reply(opt, REP_ACK)

    def _parse_meta(self, data: bytes) -> tuple[str, list[str]] | None:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = self._decode(data[4:4 + nlen])
            if name is None or 4 + nlen + 4 > len(data):
                return None
            (count,) = struct.unpack_from(">I", data, 4 + nlen)
            pos = 8 + nlen
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                q = self._decode(data[pos + 4:pos + 4 + qlen])
                if q is None or pos + 4 + qlen > len(data):
                    return None
                queries.append(q)
                pos += 4 + qlen
            return (name, queries) if pos == len(data) else None
        except struct.error:
            return None

    # --- transmission --------------------------------------------------------------------
    def _simple(self, cookie: int, err: int) -> None:
        self.sock.sendall(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, cookie))

    def _fail(self, cookie: int, err: int, message: str) -> None:
        if self.structured:  # carries the message for a person to read
            msg = message.encode()[:MAX_STRING]
            self.sock.sendall(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                          cookie, 6 + len(msg)) + struct.pack(">IH", err, len(msg)) + msg)
        else:
            self._simple(cookie, err)

    def _transmission(self) -> None:
        hdr = bytearray(_REQ.size)
        hv = memoryview(hdr)
        unpack = _REQ.unpack_from
        ex = self.export
        size = ex.size
        read_ok = CMD_FLAG_FUA | (CMD_FLAG_DF if self.structured else 0)
        while True:
            self._recv_into(hv)
            magic, flags, cmd, cookie, offset, length = unpack(hdr)
            if magic != REQUEST_MAGIC:
                return  # lost framing: only a hard disconnect is left
            if cmd == CMD_READ:
                if flags & ~read_ok:
                    self._fail(cookie, EINVAL, f"unsupported flags {flags:#x} for NBD_CMD_READ")
                elif offset + length > size:
                    self._fail(cookie, EINVAL, f"read {offset:#x}+{length:#x} past the end ({size:#x})")
                elif length > MAX_PAYLOAD:
                    self._fail(cookie, EINVAL, f"read of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
                else:
                    self._read(cookie, offset, length)
            elif cmd == CMD_WRITE:
                self._write(cookie, flags, offset, length)
            elif cmd == CMD_DISC:
                return
            elif cmd == CMD_FLUSH:
                if flags & ~CMD_FLAG_FUA:
                    self._fail(cookie, EINVAL, f"unsupported flags {flags:#x} for NBD_CMD_FLUSH")
                else:
                    self._locked_op(cookie, self._flush)
            elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
                self._zero(cmd, cookie, flags, offset, length)
            elif cmd == CMD_BLOCK_STATUS:
                self._block_status(cookie, flags, offset, length)
            elif cmd == CMD_CACHE:  # advisory; some clients send it unadvertised
                if flags & ~CMD_FLAG_FUA or offset + length > size:
                    self._fail(cookie, EINVAL, "invalid NBD_CMD_CACHE")
                else:
                    self._simple(cookie, 0)
            else:
                self._fail(cookie, EINVAL, f"unknown command {cmd}")

    def _read(self, cookie: int, offset: int, length: int) -> None:
        mv = self._buffer(_DATA_AT + length)
        ex = self.export
        if length:
            try:
                if ex.lock is None:
                    got = ex.disk.readinto_at(offset, mv[_DATA_AT:_DATA_AT + length])
                else:
                    with ex.lock:
                        got = ex.disk.readinto_at(offset, mv[_DATA_AT:_DATA_AT + length])
            except (VhdxError, OSError, ValueError) as e:
                self._fail(cookie, _errno_of(e), f"read failed: {e}")
                return
            if got < length:  # cannot happen inside the disk; never send stale bytes
                mv[_DATA_AT + got:_DATA_AT + length] = bytes(length - got)
        if self.structured:
            if not length:
                self.sock.sendall(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
                return
            _CHUNK_DATA.pack_into(mv, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                                  cookie, 8 + length, offset)
            self.sock.sendall(mv[:_DATA_AT + length])
        else:
            _SIMPLE.pack_into(mv, _SIMPLE_AT, SIMPLE_REPLY_MAGIC, 0, cookie)
            self.sock.sendall(mv[_SIMPLE_AT:_DATA_AT + length])

    def _write(self, cookie: int, flags: int, offset: int, length: int) -> None:
        ex = self.export
        if length > MAX_PAYLOAD:
            self._drain(length)
            self._fail(cookie, EINVAL, f"write of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
            return
        mv = self._buffer(length)
        self._recv_into(mv[:length])
        if flags & ~CMD_FLAG_FUA:
            self._fail(cookie, EINVAL, f"unsupported flags {flags:#x} for NBD_CMD_WRITE")
        elif ex.read_only:
            self._fail(cookie, EPERM, "the export is read-only")
        elif offset + length > ex.size:
            self._fail(cookie, ENOSPC, f"write {offset:#x}+{length:#x} past the end ({ex.size:#x})")
        else:
            fua = bool(flags & CMD_FLAG_FUA)
            self._locked_op(cookie, lambda: self._do_write(offset, mv[:length], fua))

    def _do_write(self, offset: int, data: memoryview, fua: bool) -> None:
        disk = cast("WritableDisk", self.export.disk)  # a writable export serves a WritableDisk
        disk.write_at(offset, data)
        if fua:
            disk.flush()

    def _flush(self) -> None:
        if not self.export.read_only:
            self.export.disk.flush()

    def _zero(self, cmd: int, cookie: int, flags: int, offset: int, length: int) -> None:
        ex = self.export
        trim = cmd == CMD_TRIM
        allowed = CMD_FLAG_FUA | (0 if trim else CMD_FLAG_NO_HOLE)
        what = "NBD_CMD_TRIM" if trim else "NBD_CMD_WRITE_ZEROES"
        if flags & ~allowed:
            self._fail(cookie, EINVAL, f"unsupported flags {flags:#x} for {what}")
        elif ex.read_only:
            self._fail(cookie, EPERM, "the export is read-only")
        elif offset + length > ex.size:
            self._fail(cookie, EINVAL if trim else ENOSPC,
                       f"{what} {offset:#x}+{length:#x} past the end ({ex.size:#x})")
        else:
            fua = bool(flags & CMD_FLAG_FUA)
            no_hole = bool(flags & CMD_FLAG_NO_HOLE)
            self._locked_op(cookie, lambda: self._do_zero(offset, length, trim, no_hole, fua))

    def _do_zero(self, offset: int, length: int, trim: bool, no_hole: bool, fua: bool) -> None:
        disk: Any = self.export.disk
        if no_hole:
            # The client wants the range provisioned: real zero data, not a ZERO block state.
            zeros = memoryview(bytes(min(length, 1 << 20)))
            pos, end = offset, offset + length
            while pos < end:
                k = min(len(zeros), end - pos)
                disk.write_at(pos, zeros[:k])
                pos += k
        elif length:
            # A trim may leave partial blocks alone (advisory); zeroes must read back as zeros.
            disk.write_zeroes_at(offset, length, discard=trim)
        if fua:
            disk.flush()

    def _locked_op(self, cookie: int, op: Callable[[], None]) -> None:
        lock = self.export.lock
        try:
            if lock is None:
                op()
            else:
                with lock:
                    op()
        except (VhdxError, OSError, ValueError) as e:
            self._fail(cookie, _errno_of(e), str(e))
            return
        self._simple(cookie, 0)

    def _block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        ex = self.export
        if not self.block_status:
            self._fail(cookie, EINVAL, "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)")
            return
        if flags & ~(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE):
            self._fail(cookie, EINVAL, f"unsupported flags {flags:#x} for NBD_CMD_BLOCK_STATUS")
            return
        if not length or offset + length > ex.size:
            self._fail(cookie, EINVAL, f"block status {offset:#x}+{length:#x} outside the export ({ex.size:#x})")
            return
        try:
            descs = self._extents(offset, length, bool(flags & CMD_FLAG_REQ_ONE))
        except (VhdxError, OSError, ValueError) as e:
            self._fail(cookie, _errno_of(e), f"block status failed: {e}")
            return
        body = struct.pack(f">I{2 * len(descs)}I", META_ID, *[v for d in descs for v in d])
        self.sock.sendall(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                                      cookie, len(body)) + body)

    def _extents(self, offset: int, length: int, one: bool) -> list[list[int]]:
        """[length, flags] descriptors from ``offset``, neighbours of equal status merged."""
        ex = self.export
        descs: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end and len(descs) < _BS_MAX_DESCRIPTORS:
            n = min(_BS_PIECE, end - pos)
            if ex.lock is None:
                extents = ex.disk.extents(pos, n)
            else:
                with ex.lock:
                    extents = ex.disk.extents(pos, n)
            for e in extents:
                st = 0 if e.kind == "data" else STATE_HOLE | STATE_ZERO
                if descs and descs[-1][1] == st:
                    descs[-1][0] += e.length
                else:
                    descs.append([e.length, st])
            pos += n
            if one and len(descs) > 1:
                break
        if not descs:
            raise VhdxError("no extent found for the range")
        return descs[:1] if one else descs


class NbdServer:
    """An NBD server for one virtual disk, on a Unix socket or TCP.

    The listening socket is bound when the object is made, so :attr:`uri` is known
    at once (``port=0`` picks a free port). :meth:`serve_forever` runs until
    :meth:`request_stop` (safe from a signal handler); :meth:`start` runs it in a
    thread and :meth:`stop` ends it. Neither closes the disk: its owner does.
    Serving a :class:`~vhdx.writer.WritableDisk` makes the export writable unless
    ``read_only`` says otherwise. At most ``max_connections`` clients at once (each
    may hold a buffer of up to 32 MiB); one that has not finished its handshake
    after ``handshake_timeout`` seconds is dropped.
    """

    def __init__(self, disk: VirtualDisk, *, socket_path: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", port: int = DEFAULT_PORT, export_name: str | None = None,
                 read_only: bool | None = None, max_connections: int = 16,
                 handshake_timeout: float | None = 60.0,
                 log: Callable[[str], None] | None = None) -> None:
        writable = bool(disk.writable())
        ro = (not writable) if read_only is None else (read_only or not writable)
        base = os.path.basename(str(getattr(disk, "path", "") or "")) or "disk"
        name = export_name if export_name is not None else base
        desc = (f"vhdx: {base} ({len(disk.chain)} file(s) in the chain), "
                + ("read-only" if ro else "writable"))
        self._export = _Export(disk, name, ro, desc)
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self._log = log
        self._stopping = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self._listener, self.host, self.port = self._bind(host, port)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    # --- addresses -------------------------------------------------------------------
    @property
    def export_name(self) -> str:
        return self._export.name

    @property
    def read_only(self) -> bool:
        return self._export.read_only

    @property
    def uri(self) -> str:
        """The NBD URI of the default export (``nbd+unix:///?socket=...`` or ``nbd://h:p/``)."""
        if self.socket_path is not None:
            return f"nbd+unix:///?socket={self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/"

    def _bind(self, host: str, port: int) -> tuple[socket.socket, str, int]:
        if self.socket_path is not None:
            path = self.socket_path
            self._claim_socket_path(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(path)
                os.chmod(path, 0o600)  # the disk is nobody else's business (before listen: no client yet)
                self._sock_ident = _ident(path)
                s.listen(16)
            except OSError as e:
                s.close()
                raise VhdxIOError.from_os(e, path, "cannot listen") from None
            return s, "", 0
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, OverflowError) as e:
            raise VhdxError(f"{host}:{port}: cannot resolve: {e}") from None
        family, stype, proto, _, addr = infos[0]
        s = socket.socket(family, stype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(16)
        except OSError as e:
            s.close()
            raise VhdxIOError.from_os(e, f"{host}:{port}", "cannot listen") from None
        bound = s.getsockname()
        return s, bound[0], bound[1]

    @staticmethod
    def _claim_socket_path(path: str) -> None:
        """Refuse a path in use; take over a stale socket left by a killed server."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise VhdxIOError.from_os(e, path) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise OutputExistsError(path, "already exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
            return
        finally:
            probe.close()
        raise VhdxError(f"{path}: another server is listening on this socket")

    # --- running ---------------------------------------------------------------------
    def _report(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
        else:
            print(f"vhdx serve: {message}", file=sys.stderr, flush=True)

    def serve_forever(self) -> None:
        """Accept and serve clients until :meth:`request_stop`; then disconnect them all."""
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stopping:
                        break
                    self._accept()
        finally:
            sel.close()
            self._shutdown()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._report(f"cannot accept a connection: {e.strerror}")
                return
            raise
        with self._conns_lock:
            if len(self._conns) >= self.max_connections:
                sock.close()  # bounded memory: each connection may hold a 32 MiB buffer
                self._report(f"refused a connection: {self.max_connections} already open")
                return
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small replies go at once
            conn = _Connection(self, sock)
            t = threading.Thread(target=self._run_connection, args=(conn,), daemon=True,
                                 name="vhdx-nbd-client")
            self._conns[sock] = t
        t.start()

    def _run_connection(self, conn: _Connection) -> None:
        try:
            conn.run()
        finally:
            with self._conns_lock:
                self._conns.pop(conn.sock, None)

    def _shutdown(self) -> None:
        try:
            self._listener.close()
            if self.socket_path is not None and _ident(self.socket_path) == self._sock_ident:
                os.unlink(self.socket_path)  # only our own socket, not one that replaced it
        except OSError:
            pass
        # First stop reading: a request being served completes and its reply is sent,
        # then the client's next read ends. A client that does not drain its replies
        # is then cut off completely.
        for how, wait in ((socket.SHUT_RD, 5.0), (socket.SHUT_RDWR, None)):
            with self._conns_lock:
                conns = list(self._conns.items())
            for s, _ in conns:
                try:
                    s.shutdown(how)
                except OSError:
                    pass
            for _, t in conns:
                t.join(wait)
        self._wake_r.close()
        self._wake_w.close()
        self._done.set()

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return; safe from a signal handler or any thread."""
        self._stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def start(self) -> NbdServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="vhdx-nbd-server")
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop serving, disconnect every client and wait for them (the disk stays open)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        elif not self._done.is_set():
            self._shutdown()

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def serve(disk: VirtualDisk, **kwargs: Any) -> None:
    """Serve ``disk`` until interrupted; keyword arguments as for :class:`NbdServer`."""
    NbdServer(disk, **kwargs).serve_forever()


def open_for_serving(image: str | os.PathLike[str], *, parents: Sequence[str | os.PathLike[str]] = (),
                     search_dirs: Sequence[str | os.PathLike[str]] = (), ignore_linkage: bool = False,
                     write_to: str | os.PathLike[str] | None = None) -> VirtualDisk:
    """Open IMAGE's chain read-only, or with ``write_to`` first create that file as a new
    differencing child of IMAGE and open it writable: every write then lands in the new
    file while the chain's existing files stay byte-identical."""
    from .formats import open as open_disk

    if write_to is None:
        return open_disk(image, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage)
    from .formats import create

    with open_disk(image, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage) as base:
        chain = [f.path for f in base.chain]  # validated now; the child reuses exactly these files
    new = os.fspath(write_to)
    create(new, parent=image)
    try:
        return open_disk(new, "r+", parents=chain, ignore_linkage=ignore_linkage)
    except BaseException:
        os.unlink(new)  # ours, just made, holds nothing yet
        raise


# --- CLI ----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    if args.socket is not None and (args.bind is not None or args.port is not None):
        raise VhdxError("--socket excludes --bind and --port")
    port = DEFAULT_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise VhdxError(f"--port {port}: not a TCP port")
    disk = open_for_serving(args.image, parents=args.parent, search_dirs=args.search_dir,
                            ignore_linkage=args.ignore_linkage, write_to=args.write_to)
    try:
        server = NbdServer(disk, socket_path=args.socket, host=args.bind or "127.0.0.1", port=port,
                           export_name=args.export_name)

        def handler(_sig: int, _frame: object) -> None:
            server.request_stop()

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            print(server.uri, flush=True)
            server.serve_forever()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        disk.close()
    return 0


def register(subparsers: Any, chain_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the virtual disk over NBD (read-only unless --write-to)",
        description="Serve the virtual disk over NBD until SIGINT/SIGTERM; prints the NBD URI "
                    "once listening. Read-only unless --write-to.")
    chain_options(p)
    p.add_argument("--socket", metavar="PATH", help="listen on this Unix socket (instead of TCP)")
    p.add_argument("--bind", metavar="ADDR", help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, metavar="N", help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--write-to", metavar="NEW.avhdx",
                   help="create NEW.avhdx as a differencing child of IMAGE and serve it writable; "
                        "the chain's existing files are never written")
    p.add_argument("--export-name", metavar="NAME",
                   help="export name (default: the served file's name; the empty name always works)")
    p.set_defaults(func=cmd_serve)


__all__ = ["DEFAULT_PORT", "NbdServer", "open_for_serving", "serve"]
