"""One exception hierarchy for everything the library raises on bad input.

Every failure caused by the contents of a file or by the caller's arguments is a
:class:`VhdxError`; the CLI turns it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations


class VhdxError(Exception):
    """Root of every error this package raises for bad input or unusable files."""


def naming(e: VhdxError, path: str) -> VhdxError:
    """``e`` with ``path`` in front of its message when it does not name it yet (the
    CLI's one line must name the file); the same class, the cause kept."""
    if path in str(e):
        return e
    try:
        new = type(e)(f"{path}: {e}")
    except TypeError:  # a class with its own constructor: leave it alone
        return e
    new.__dict__.update(e.__dict__)
    new.__cause__ = e.__cause__
    return new


class CorruptImageError(VhdxError):
    """A structure is malformed, truncated, inconsistent or out of the spec's bounds."""


class ChecksumError(CorruptImageError):
    """A CRC-32C check failed (header, region table, log entry)."""


class UnsupportedFeatureError(VhdxError):
    """The file uses something this implementation refuses to process (unknown
    required region or metadata item, other format version, reserved states)."""


class ParentNotFoundError(VhdxError):
    """The parent of a differencing disk could not be located."""


class ParentMismatchError(VhdxError):
    """A parent was found but does not belong to the child (linkage GUID, sector
    size), or the chain is cyclic or absurdly deep."""


class InvalidArgumentError(VhdxError, ValueError):
    """The caller passed an argument that makes no sense (bad offset, size, mode)."""


class ReadOnlyError(VhdxError):
    """A write was attempted on a disk opened read-only."""


class LockedError(VhdxError):
    """Another process holds a conflicting lock on an image of the chain."""


class CancelledError(VhdxError):
    """A long operation was cancelled by its progress callback."""


class DependentDisksError(VhdxError):
    """Other disks depend on a file that an operation would change (a merge target's
    other children); the operation refuses and names them unless forced."""


class PartitionTableError(CorruptImageError):
    """A partition table (MBR, EBR chain, GPT) is present but unusable."""


class CorruptConfigError(CorruptImageError):
    """A Hyper-V configuration or runtime-state file (HyperVStorage container:
    .vmcx, .vmrs, data.vmcx) is malformed, truncated, inconsistent or out of bounds."""


class ConfigChecksumError(CorruptConfigError, ChecksumError):
    """A CRC-32 of a HyperVStorage structure (header, object-table entry, key table,
    key entry, replay log) failed."""
class NotWritableError(VhdxError):
    """A file an operation must change cannot be written (permissions, read-only
    file system, immutable or append-only flag); found before any byte is written."""


class InsufficientSpaceError(VhdxError):
    """The file system lacks the free space an operation plans to use; refused
    before any byte is written."""


class OperationFailedError(VhdxError):
    """An I/O error (disk full, EIO) stopped an operation part-way; the message
    names the file, what state the disks are in and what to run next.
    ``errno`` is the OS error number."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ConfinementError(VhdxError):
    """A file lies outside the folders an operation may touch (a merge target
    outside the child's folder and not named by the user, a parent outside the
    ``confine`` trees)."""
