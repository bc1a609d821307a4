"""Build script: the package metadata lives in pyproject.toml; this only adds the
C extensions, both optional and both on the stable ABI (one wheel per platform
for every CPython >= 3.11):

* ``vhdx._native`` (cffi, csrc/vhdx_native.c): the chain reader, bitmap runs,
  batch I/O;
* ``vhdx._fastread`` (csrc/vhdx_fastread.c): the chain reader's cheap per-call entry.

Without a working C compiler the build prints why and goes on: the package then
uses its pure-Python paths (same results, slower) and says so once at import.
``VHDX_REQUIRE_NATIVE=1`` turns a failed extension build into a failed install
(for CI, where a compile error must not pass as a fallback).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import drop_stale, fastread_extension  # noqa: E402 - csrc/ is on sys.path only now


# What the package uses instead of each extension when its build fails.
_INSTEAD = {"vhdx._native": "its pure-Python paths (same results, slower)",
            "vhdx._fastread": "the chain reader's cffi entry, when vhdx._native is built "
                              "(same results, a little slower per read)"}


class OptionalBuildExt(build_ext):
    """build_ext whose failures leave the package installable without the extension."""

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError, OSError) as e:
            if os.environ.get("VHDX_REQUIRE_NATIVE") == "1":
                raise
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            sys.stderr.write(
                f"WARNING: vhdx: building the C extension {ext.name} failed ({msg}).\n"
                f"WARNING: vhdx installs without it and uses {_INSTEAD.get(ext.name, 'Python code')}; "
                "install a C compiler and the Python headers, then reinstall, for the C paths.\n")
            return
        # An older build under another suffix would shadow this one at import
        # (the import system tries .cpython-3XX-*.so first) or travel beside it
        # in the wheel: here in build/lib, in run() for the in-place copies.
        drop_stale(self.get_ext_fullpath(ext.name))

    def run(self) -> None:
        super().run()
        if not self.inplace:
            return
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = ext.name.rpartition(".")[0]
            made = os.path.join(build_py.get_package_dir(package), os.path.basename(self.get_ext_filename(ext.name)))
            if os.path.exists(made):
                drop_stale(made)


setup(
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    ext_modules=[fastread_extension()],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
