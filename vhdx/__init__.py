"""vhdx: read, check, write and merge Hyper-V VHDX/AVHDX virtual disks and chains."""

from __future__ import annotations

from .disk import Extent, VirtualDisk, open
from .errors import (
    CancelledError,
    ChecksumError,
    CorruptImageError,
    DependentDisksError,
    ImageNotFoundError,
    InvalidArgumentError,
    LockedError,
    NotCopyableError,
    OutputDirectoryError,
    OutputExistsError,
    ParentMismatchError,
    ParentNotFoundError,
    ReadOnlyError,
    TargetKindError,
    UnsupportedFeatureError,
    UsageError,
    VhdxError,
    VhdxIOError,
)
from .image import ImageFile

__version__ = "0.1.0"

from .create import create  # noqa: E402 - create.py reads __version__ lazily
from .merge_engine import MergeSummary, merge  # noqa: E402

__all__ = [
    "open", "create", "merge", "MergeSummary", "VirtualDisk", "ImageFile", "Extent", "__version__",
    "VhdxError", "CorruptImageError", "ChecksumError", "UnsupportedFeatureError",
    "ParentNotFoundError", "ParentMismatchError", "InvalidArgumentError",
    "ReadOnlyError", "LockedError", "CancelledError", "DependentDisksError",
    "ImageNotFoundError", "OutputExistsError", "OutputDirectoryError", "VhdxIOError",
    "TargetKindError", "UsageError", "NotCopyableError",
]
