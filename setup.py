"""Build script: the package metadata lives in pyproject.toml; this only adds the
C extensions: vhdx._native (cffi, sources in csrc/) and vhdx._fastread (the chain
reader's per-call entry as a plain CPython type, optional)."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import fastread_extension  # noqa: E402

setup(cffi_modules=["csrc/build_native.py:ffibuilder"], ext_modules=[fastread_extension()])
