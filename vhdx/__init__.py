"""vhdx: read, check, write and merge Hyper-V VHDX/AVHDX virtual disks and chains."""

from __future__ import annotations

from .disk import Extent, VirtualDisk, open
from .errors import (
    CancelledError,
    ChecksumError,
    CorruptImageError,
    DependentDisksError,
    InvalidArgumentError,
    LockedError,
    ParentMismatchError,
    ParentNotFoundError,
    ReadOnlyError,
    UnsupportedFeatureError,
    VhdxError,
)
from .image import ImageFile

__version__ = "0.1.0"

__all__ = [
    "open", "VirtualDisk", "ImageFile", "Extent", "__version__",
    "VhdxError", "CorruptImageError", "ChecksumError", "UnsupportedFeatureError",
    "ParentNotFoundError", "ParentMismatchError", "InvalidArgumentError",
    "ReadOnlyError", "LockedError", "CancelledError", "DependentDisksError",
]
