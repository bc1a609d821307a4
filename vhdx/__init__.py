"""vhdx: read, check, write and merge Hyper-V VHDX/AVHDX virtual disks and chains."""

from __future__ import annotations

from .disk import Extent, VirtualDisk, open
from .errors import (
    CancelledError,
    ChecksumError,
    ConfinementError,
    CorruptImageError,
    DependentDisksError,
    ImageNotFoundError,
    InsufficientSpaceError,
    InvalidArgumentError,
    LockedError,
    NotCopyableError,
    NotWritableError,
    OperationFailedError,
    OutputDirectoryError,
    OutputExistsError,
    ParentMismatchError,
    ParentNotFoundError,
    PartitionTableError,
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
from .relink import RelinkSummary, relink  # noqa: E402
from .compact import CompactSummary, compact  # noqa: E402
from .repair import RepairSummary, repair  # noqa: E402

__all__ = [
    "open", "create", "merge", "MergeSummary", "relink", "RelinkSummary", "compact", "CompactSummary", "repair", "RepairSummary", "VirtualDisk", "ImageFile", "Extent", "__version__",
    "VhdxError", "CorruptImageError", "ChecksumError", "UnsupportedFeatureError",
    "ParentNotFoundError", "ParentMismatchError", "InvalidArgumentError",
    "ReadOnlyError", "LockedError", "CancelledError", "DependentDisksError", "PartitionTableError",
    "NotWritableError", "InsufficientSpaceError", "OperationFailedError", "ConfinementError",
    "ImageNotFoundError", "OutputExistsError", "OutputDirectoryError", "VhdxIOError",
    "TargetKindError", "UsageError", "NotCopyableError",
]
