"""One exception hierarchy for everything the library raises on bad input.

Every failure caused by the contents of a file or by the caller's arguments is a
:class:`VhdxError`; the CLI turns it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class VhdxError(Exception):
    """Root of every error this package raises for bad input or unusable files."""


def naming(e: VhdxError, path: str) -> VhdxError:
    """``e`` with ``path`` in front of its message when it does not name it yet (the
    CLI's one line must name the file); the same class, the cause kept."""
    if path in str(e) or isinstance(e, OSError):  # OSError kinds carry their filename
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


class NativeFallbackError(VhdxError):
    """The C chain reader met something only the Python path handles (a BAT entry
    to report as corrupt, an offset past int64): redo the read there. Raised by
    :meth:`vhdx.native.ChainReader.readinto`; the disk's read path never lets it out."""


class ParentNotFoundError(VhdxError):
    """The parent of a differencing disk could not be located."""


class ParentMismatchError(VhdxError):
    """A parent was found but does not belong to the child (linkage GUID, sector
    size), or the chain is cyclic or absurdly deep."""


class InvalidArgumentError(VhdxError, ValueError):
    """The caller passed an argument that makes no sense (bad offset, size, mode)."""


class ReadOnlyError(VhdxError, io.UnsupportedOperation):
    """A write was attempted on a disk opened read-only (also an
    ``io.UnsupportedOperation``, which file objects raise for the same mistake)."""


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


class _OSErrorMixin:
    """str() of an OSError-compatible VhdxError: ``FILE: what``, as the CLI prints it,
    while ``errno``, ``strerror`` and ``filename`` stay available to callers."""

    def __str__(self) -> str:
        what = self.strerror or (self.args[0] if self.args else "")  # type: ignore[attr-defined]
        name = self.filename  # type: ignore[attr-defined]
        return f"{name}: {what}" if name is not None else str(what)


class ImageNotFoundError(_OSErrorMixin, VhdxError, FileNotFoundError):
    """An input file does not exist (``except FileNotFoundError`` catches it too)."""

    def __init__(self, filename: str, message: str = "no such file") -> None:
        super().__init__(2, message, filename)  # ENOENT


class OutputExistsError(_OSErrorMixin, VhdxError, FileExistsError):
    """The output already exists and the operation does not overwrite it."""

    def __init__(self, filename: str, message: str = "already exists") -> None:
        super().__init__(17, message, filename)  # EEXIST


class OutputDirectoryError(_OSErrorMixin, VhdxError, FileNotFoundError):
    """The folder an output should be created in does not exist."""

    def __init__(self, filename: str, message: str | None = None) -> None:
        import os

        folder = os.path.dirname(os.path.abspath(filename))
        super().__init__(2, message or f"the output folder {folder} does not exist", filename)


class VhdxIOError(_OSErrorMixin, VhdxError, OSError):
    """The operating system failed a read, write or open (errno and filename kept)."""

    def __init__(self, errno_: int | None, message: str, filename: str | None = None) -> None:
        super().__init__(errno_, message, filename)

    @classmethod
    def from_os(cls, e: OSError, filename: str | None = None, doing: str | None = None) -> "VhdxIOError":
        """Wrap ``e``; ``doing`` (e.g. "write failed at 0x1000") prefixes its strerror."""
        what = e.strerror or str(e)
        return cls(e.errno, f"{doing}: {what}" if doing else what,
                   filename if filename is not None else e.filename)


@contextmanager
def os_errors(filename: str | os.PathLike[str] | None, doing: str | None = None) -> Iterator[None]:
    """The one OS-error boundary of an operation: an ``OSError`` that is not a
    :class:`VhdxError` yet leaves as :class:`VhdxIOError`, errno kept, named by its
    own filename when the OS gave one (a parent, a temporary file), else ``filename``.
    ``BrokenPipeError`` passes unchanged: the reader of a pipe went away (``| head``),
    which is the end of the output, not a failure of a file."""
    try:
        yield
    except (VhdxError, BrokenPipeError):
        raise
    except OSError as e:
        name = e.filename if e.filename is not None else (
            os.fspath(filename) if filename is not None else None)
        raise VhdxIOError.from_os(e, name, doing) from e


def converts_os_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a public operation whose first argument is the file it works on
    (``open``, ``create``, ``merge``, ...) with :func:`os_errors` around its body."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        first = args[0] if args else next(iter(kwargs.values()), None)
        name = first if isinstance(first, (str, os.PathLike)) else None
        with os_errors(name):
            return func(*args, **kwargs)

    return wrapper


class TargetKindError(InvalidArgumentError):
    """A path names something an operation cannot read or write (a character
    device, FIFO, directory or socket where a file or block device is needed)."""


class UsageError(InvalidArgumentError):
    """The command line (or a call) combines options that make no sense together;
    the CLI exits 2 for it, as for any usage error."""


class NotCopyableError(VhdxError, TypeError):
    """An open disk holds file descriptors and locks that a copy would share."""


class LogFullError(InvalidArgumentError):
    """A single update does not fit in the log even after the empty-entry step
    of FORMAT.md §6.5 step 2; the log must be enlarged (new session) instead."""


class LogWriterFailedError(VhdxError):
    """An I/O error interrupted a header update, log write or apply earlier in this
    session; the writer refuses further work so that the durable log is replayed
    by the next writable open instead of being declared clean."""
