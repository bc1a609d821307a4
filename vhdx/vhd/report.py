"""Human-readable lines of ``vhdx info`` for one VHD file (from ``VhdFile.info()``)."""

from __future__ import annotations

from typing import Any

from ..progress import human_size as _human


def info_lines(f: dict[str, Any]) -> list[str]:
    bs = f", block size {_human(f['block_size'])}" if f["block_size"] else ""
    out = [f"VHD {f['type']}, virtual size {_human(f['virtual_size'])} ({f['virtual_size']} bytes){bs}, "
           "sectors 512/512",
           f"creator {f['creator']!r} on {f['creator_os']!r}, file size {f['file_size']}, "
           f"created {f['timestamp_utc']}",
           f"unique id {f['unique_id']} (as GUID {f['virtual_disk_id']}), footer used: {f['footer_used']}",
           f"CHS {'/'.join(map(str, f['chs']))} = {f['chs_size']} bytes; original size {f['original_size']}"]
    if "blocks" in f:
        out.append(f"blocks: {f['blocks']['allocated']} of {f['blocks']['total']} allocated; "
                   f"BAT @{f['table_offset']:#x} ({f['max_table_entries']} entries)")
    if "parent_unique_id" in f:
        out.append(f"parent unique id {f['parent_unique_id']}, parent time stamp {f['parent_timestamp']}")
        for k, v in (f.get("parent_locator") or {}).items():
            out.append(f"parent {k}: {v}")
    return out
