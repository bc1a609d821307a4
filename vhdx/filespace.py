"""Space inside one image file: where its live data ends, copies within it and
hole punches (for resize and compact; both stand on the writer, so this sits
below it: the free-space bookkeeping that used to make writer -> resize ->
compact -> writer a cycle)."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any

from . import native
from . import structures as S
from .bat import iter_nonzero
from .storage import DeferredSyncStorage, FileStorage, Storage

__all__ = ["live_end", "FileSpace", "align_up", "punch"]

MiB = S.MiB
_CHUNK = 4 * MiB
_ZEROS = bytes(_CHUNK)
_PRESENT = (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)


def align_up(n: int, a: int = MiB) -> int:
    """``n`` rounded up to a multiple of ``a`` (1 MiB: VHDX objects' alignment)."""
    return -(-n // a) * a


def live_end(img: Any) -> int:
    """1 MiB-aligned end of everything ``img`` references: regions, log, blocks."""
    geo = img.geometry
    end = max(e for _, e, _ in img.reserved_spans())
    # Bare zero states are skipped (chunk_ratio): only entries with an offset matter.
    for i, e in iter_nonzero(img.bat, geo.chunk_ratio, spans=img.bat_spans):
        off, state = e & S.BAT_OFFSET_MASK, e & S.BAT_STATE_MASK
        if not off:
            continue
        if geo.is_sb_index(i):
            if state == S.SB_BLOCK_PRESENT:
                end = max(end, off + S.SECTOR_BITMAP_BLOCK_SIZE)
        elif state in _PRESENT:
            end = max(end, off + geo.block_size)
    return align_up(end)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def punch(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) keeping the size (Linux fallocate); False
    where the platform or file system cannot."""
    global _libc
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        e = ctypes.get_errno()
        if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(e, os.strerror(e))
    return True


class FileSpace:
    """Copies, zero-checks and hole punches on the image: through the C engine and
    fallocate on a plain file, through the storage otherwise (the power-loss tests
    record every write)."""

    def __init__(self, storage: Storage, fd: int) -> None:
        self.st = storage
        self.fd = fd
        self.native = type(storage) in (FileStorage, DeferredSyncStorage)

    def copy(self, src: int, dst: int, n: int) -> None:
        if self.native:
            native.copy_ranges(self.fd, self.fd, [(src, dst, n)])
            self.st.note_external_write()  # type: ignore[attr-defined]
            return
        for k in range(0, n, _CHUNK):
            m = min(_CHUNK, n - k)
            self.st.pwrite(dst + k, self.st.pread(src + k, m).ljust(m, b"\0"))

    def free(self, offset: int, n: int) -> int:
        """Make an unreferenced range give its space back; bytes punched."""
        if self.native:
            try:
                return n if punch(self.fd, offset, n) else 0
            except OSError:
                return 0  # space is given back by the truncate, or on the next run
        # Recorded storage: a punch reads as zeros; model it as zeros written.
        for k in range(0, n, _CHUNK):
            self.st.pwrite(offset + k, _ZEROS[:min(_CHUNK, n - k)])
        return n
