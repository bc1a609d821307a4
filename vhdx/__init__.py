"""vhdx: read, check, write and merge Hyper-V VHDX/AVHDX virtual disks and chains."""

from __future__ import annotations

from ._version import __version__
from .compact import CompactSummary, compact
from .disk import VirtualDisk
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
from .formats import check_chain, create, merge, open  # noqa: A004 - vhdx.open mirrors io.open
from .image import Extent, ImageFile
from .merge_engine import MergeSummary
from .relink import RelinkSummary, relink
from .repair import RepairSummary, repair

__all__ = [
    "open", "create", "check_chain", "merge", "MergeSummary", "relink", "RelinkSummary", "compact",
    "CompactSummary", "repair", "RepairSummary", "VirtualDisk", "ImageFile", "Extent", "__version__",
    "VhdxError", "CorruptImageError", "ChecksumError", "UnsupportedFeatureError",
    "ParentNotFoundError", "ParentMismatchError", "InvalidArgumentError",
    "ReadOnlyError", "LockedError", "CancelledError", "DependentDisksError", "PartitionTableError",
    "NotWritableError", "InsufficientSpaceError", "OperationFailedError", "ConfinementError",
    "ImageNotFoundError", "OutputExistsError", "OutputDirectoryError", "VhdxIOError",
    "TargetKindError", "UsageError", "NotCopyableError",
]
