"""CLI pieces for VHD outputs, called from vhdx/cli.py (``convert OUT.vhd``)."""

from __future__ import annotations

import argparse

from ..create import parse_size
from ..errors import VhdxError
from ..progress import Progress


def cmd_convert_to_vhd(args: argparse.Namespace) -> int:
    """``vhdx convert SRC OUT.vhd [--type fixed|dynamic] [--block-size S] [--azure]``."""
    from .convert import convert_to_vhd

    out = args.output
    if out.lower().endswith(".avhd"):
        raise VhdxError(f"{out}: a converted disk is standalone; name it .vhd")
    if not out.lower().endswith(".vhd"):
        raise VhdxError(f"{out}: --azure makes a VHD; name the output .vhd")
    if args.azure and args.type == "dynamic":
        raise VhdxError("--azure makes a fixed VHD; drop --type dynamic")
    with_bar = Progress(0, "convert")
    convert_to_vhd(args.image, out, type=args.type or "dynamic",
                   block_size=parse_size(args.block_size) if args.block_size else None,
                   azure=args.azure, parents=args.parent, search_dirs=args.search_dir,
                   ignore_linkage=args.ignore_linkage,
                   ignore_checksums=getattr(args, "ignore_checksums", False),
                   force=args.force, progress=with_bar)
    with_bar.close()
    return 0
