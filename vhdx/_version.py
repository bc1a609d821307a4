"""The package version, written once: pyproject.toml reads it (setuptools'
``dynamic`` version, read statically without importing the package),
``vhdx.__version__``, ``vhdx --version`` and the creator field of new files use it."""

__version__ = "0.1.0"
