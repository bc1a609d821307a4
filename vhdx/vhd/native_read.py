"""The C read path for VHD / AVHD chains (``vhdx_vhd_reader_new`` in
csrc/vhdx_native.c): the VHDX chain reader's segment builder, bitmap cache and
pread loop, with VHD levels (vhd.md §5, §7): host-order copies of the
big-endian BATs (``VhdFile.bat``, kept by pointer so a writer's in-place
updates are seen), MSB-first sector bitmaps before each block's data, fixed
files mapped 1:1. One call per read, GIL released, through ``vhdx._fastread``
where it is built (``read`` fills a new bytes object in place), cffi otherwise;
anything unusual sends the read back to the Python resolver of
:class:`vhdx.vhd.disk.VhdDisk`, which stays the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import native
from .file import VhdFile


class VhdChainReader(native.ChainReader):
    """:class:`vhdx.native.ChainReader` over VHD files (child first); ``fast``,
    ``read``, ``readinto`` and ``invalidate`` behave as there. ``cache_top``
    False: the top file's bitmaps are reread on every read (a writer changes them).
    ``use_fastread`` False keeps the per-call entry on cffi (the tests compare both)."""

    __slots__ = ()
    # (fd, cache bitmaps, fixed, BAT array, BAT entries, virtual size, block size)
    _specs: list[tuple[int, bool, bool, Any, int, int, int]]  # type: ignore[assignment]

    def __init__(self, files: Sequence[VhdFile], cache_top: bool = True, *, use_fastread: bool = True) -> None:
        if not native.HAVE_CHAIN_READER:
            raise NotImplementedError("the native chain reader is not available")
        self._specs = [(f.fd, bool(cache_top or i > 0), f.is_fixed, f.bat,
                        0 if f.is_fixed else f.blocks, f.virtual_size, f.block_size)
                       for i, f in enumerate(files)]
        self._ptr: Any = None
        self._keep: list[Any] = []
        self._impl = None
        if use_fastread and native._fastread is not None:  # the cheap per-call entry (8-tuples: VHD levels)
            self._impl = native._fastread.ChainReader(
                [(fd, bat if not fixed else b"", 0, entries, vsize, bs, fixed, cache)
                 for fd, cache, fixed, bat, entries, vsize, bs in self._specs])
            self.fast = self._impl.readinto
            self.read = self._impl.read
        else:
            self._cffi_reader()
            self.fast = self._cffi_fast()
            self.read = self._cffi_read(self._specs[0][5] if self._specs else 0)

    _CONSTRUCTOR = "vhdx_vhd_reader_new"

    def _cffi_levels(self) -> tuple[Any, list[Any]]:
        ffi = native._ext.ffi  # the cffi module (HAVE_CHAIN_READER: loaded)
        arr = ffi.new("vhdx_vhd_level[]", len(self._specs))
        keep: list[Any] = [arr]
        for d, (fd, cache, fixed, bat, entries, vsize, bs) in zip(arr, self._specs):
            d.fd, d.cache_bitmaps, d.fixed = fd, cache, fixed
            d.virtual_size, d.block_size, d.bat_entries = vsize, bs, entries
            if not fixed:
                if bat.itemsize != 4 or len(bat) < entries:
                    raise ValueError("the BAT must be an array of uint32 entries")
                table = ffi.from_buffer("uint32_t[]", bat)
                keep.append(table)
                d.bat = table
        return arr, keep
