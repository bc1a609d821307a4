"""Hyper-V virtual machines offline: the HyperVStorage container (.vmcx, .vmrs,
data.vmcx), the VM and checkpoint model derived from it and from the disk chains.

Read-only throughout: no configuration file is ever written (docs/hyperv.md).
"""

from __future__ import annotations

from .container import ConfigFile, FileObjectRef, Key, open_config

__all__ = ["ConfigFile", "FileObjectRef", "Key", "open_config"]
