"""Build script: the package metadata lives in pyproject.toml; this only adds the
cffi extension (vhdx._native, sources in csrc/)."""

from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
