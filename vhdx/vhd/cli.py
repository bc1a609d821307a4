"""CLI pieces for VHD outputs, called from vhdx/cli.py (``convert OUT.vhd``)."""

from __future__ import annotations

import argparse
import sys

from ..create import parse_size
from ..errors import UsageError
from ..progress import Progress


def cmd_convert_to_vhd(args: argparse.Namespace) -> int:
    """``vhdx convert SRC OUT.vhd [--type fixed|dynamic] [--block-size S] [--azure]``."""
    from ..formats import open_source
    from .convert import convert_to_vhd

    out = args.output
    if out.lower().endswith(".avhd"):
        raise UsageError(f"{out}: a converted disk is standalone; name it .vhd")
    if args.azure and args.type == "dynamic":
        raise UsageError(f"{out}: --azure makes a fixed VHD; drop --type dynamic")
    block_size = parse_size(args.block_size) if args.block_size else None
    with open_source(args.image, parents=args.parent, search_dirs=args.search_dir,
                     ignore_linkage=args.ignore_linkage,
                     ignore_checksums=getattr(args, "ignore_checksums", False)) as src:
        for w in src.warnings:  # as vhdx.cli._warn: stderr, stdout stays the command's output
            print(f"vhdx: warning: {w}", file=sys.stderr)
        bar = Progress(src.data_bytes, "convert")
        try:
            convert_to_vhd(src, out, type=args.type or "dynamic", block_size=block_size,
                           azure=args.azure, force=args.force, progress=bar)
        finally:
            bar.close()
    return 0
