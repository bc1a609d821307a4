"""Legacy VHD / AVHD (Virtual PC, Virtual Server, Hyper-V 2008) behind the vhdx API.

``vhdx.open`` detects a VHD by its footer signature and returns a
:class:`VhdDisk` (a :class:`vhdx.VirtualDisk`). See docs/vhd.md.
"""

from __future__ import annotations

from .disk import VhdDisk, open_vhd
from .file import VhdFile, is_vhd_file

__all__ = ["VhdDisk", "VhdFile", "is_vhd_file", "open_vhd"]
