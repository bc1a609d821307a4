"""A large BAT is read only where the file holds data (SEEK_DATA), into an anonymous
mapping; the scans then look at those spans only. Every result must equal what a
whole read of the BAT gives: entries, validation, allocated blocks, reads, and the
in-memory log overlay of a dirty image (whose BAT sectors may lie in a hole)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import vhdx
import vhdx.image as image_mod
from vhdx import structures as S
from vhdx.bat import iter_nonzero, normalize_spans
from vhdx.fdio import data_extents
from vhdx.image import ImageFile
from vhdx.log_writer import LogWriter
from vhdx.storage import FileStorage

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def whole_table(img: ImageFile) -> list[int]:
    """Every BAT entry, read with plain preads (the reference)."""
    region = img.header_section.bat_region
    count = img.geometry.total_entries
    raw = bytearray(count * 8)
    image_mod.pread_into(img.fd, memoryview(raw), region.file_offset, img.path)
    if img.overlay.touches(region.file_offset, len(raw)):
        img.overlay.patch(region.file_offset, memoryview(raw))
    return list(memoryview(raw).cast("Q"))


def make_sparse(tmp_path, seed: int) -> tuple[str, dict[int, bytes]]:
    """A 4 TiB dynamic image (32 MiB BAT) with blocks written far apart."""
    rng = random.Random(seed)
    path = str(tmp_path / f"big{seed}.vhdx")
    vhdx.create(path, 4 * TiB, block_size=MiB)
    written: dict[int, bytes] = {}
    with vhdx.open(path, "r+") as d:
        nblocks = d.size // MiB
        for b in sorted({0, nblocks - 1, *(rng.randrange(nblocks) for _ in range(6))}):
            data = rng.randbytes(4096)
            off = b * MiB + rng.randrange(0, MiB - 4096, 512)
            d.write_at(off, data)
            written[off] = data
    return path, written


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sparse_bat_equals_whole_read(tmp_path, seed):
    path, written = make_sparse(tmp_path, seed)
    with ImageFile(path) as img:
        region = img.header_section.bat_region
        assert img.geometry.total_entries * 8 > image_mod._SPARSE_BAT_MIN
        try:
            ext = data_extents(img.fd, region.file_offset, region.file_offset + len(img.bat) * 8)
        except OSError:
            pytest.skip("this file system cannot report holes")
        covered = sum(e - s for s, e in normalize_spans(img.bat_spans, len(img.bat))) * 8
        # Only the file's data extents were read: far less than the table.
        assert covered == sum(e - s for s, e in ext) < img.geometry.total_entries * 8 // 4
        ref = whole_table(img)
        assert list(img.bat) == ref
        assert list(iter_nonzero(img.bat, spans=img.bat_spans)) == [(i, e) for i, e in enumerate(ref) if e]
        assert list(iter_nonzero(img.bat, 256, img.bat_spans)) == list(iter_nonzero(img.bat, 256))
    with vhdx.open(path) as d:
        for off, data in written.items():
            assert d.read_at(off, len(data)) == data
        assert sum(x.length for x in d.extents() if x.kind == "data") == len({o // MiB for o in written}) * MiB


def test_without_seek_data_reads_everything(tmp_path, monkeypatch):
    path, written = make_sparse(tmp_path, 4)

    def refuse(fd, start, end):  # noqa: ANN001, ANN202
        raise OSError(22, "SEEK_DATA unsupported")

    monkeypatch.setattr(image_mod, "data_extents", refuse)
    with ImageFile(path) as img:
        assert normalize_spans(img.bat_spans, len(img.bat)) == [(0, len(img.bat))]
        assert list(img.bat) == whole_table(img)


def test_writer_entries_outside_spans_are_seen(tmp_path):
    """Entries a writer sets in a hole of the loaded BAT must show in later scans
    (the writer's allocation end and the merge's plan both scan)."""
    path, _ = make_sparse(tmp_path, 5)
    with vhdx.open(path, "r+") as d:
        img = d.image
        before = dict(iter_nonzero(img.bat, spans=img.bat_spans))
        b = d.size // MiB // 2 + 12345
        d.write_at(b * MiB, b"x" * 512)
        after = dict(iter_nonzero(img.bat, spans=img.bat_spans))
        idx = img.geometry.payload_index(b)
        assert idx not in before and after[idx] & S.BAT_STATE_MASK == S.PAYLOAD_BLOCK_FULLY_PRESENT
        d.write_at((b + 7) * MiB, b"y" * 512)  # the next allocation must not reuse b's range
    with vhdx.open(path) as d:
        assert d.read_at(b * MiB, 512) == b"x" * 512
        assert d.read_at((b + 7) * MiB, 512) == b"y" * 512


class _StopBeforeApply(FileStorage):
    """Fails the first write at ``stop_at``: the log entry is durable, not applied."""

    stop_at = -1

    def pwrite(self, offset, data):  # noqa: ANN001, ANN201
        if offset == self.stop_at:
            raise OSError(5, "simulated crash before apply")
        return super().pwrite(offset, data)


def test_dirty_log_entry_in_a_bat_hole(tmp_path):
    """A logged, unapplied BAT change whose sector is a hole in the file: the
    read-only open's overlay must put it into the table and into the spans."""
    path, _ = make_sparse(tmp_path, 6)
    with ImageFile(path) as img:
        region = img.header_section.bat_region
        geo = img.geometry
        block = geo.payload_blocks // 3 + 777
        idx = geo.payload_index(block)
        assert img.bat[idx] == 0
        size = img.file_size
    sector_off = (region.file_offset + idx * 8) // 4096 * 4096
    new_off = -(-size // MiB) * MiB
    os.truncate(path, new_off + MiB)
    with open(path, "r+b") as fh:
        fh.seek(new_off)
        fh.write(b"\xab" * MiB)
    sector = bytearray(4096)
    k = region.file_offset + idx * 8 - sector_off
    sector[k:k + 8] = S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, new_off).to_bytes(8, "little")
    st = _StopBeforeApply.open(path, writable=True)
    st.stop_at = sector_off
    try:
        lw = LogWriter.open(st)
        with pytest.raises(OSError):
            lw.transaction({sector_off: bytes(sector)})
    finally:
        st.close()
    before = Path(path).read_bytes()
    with ImageFile(path) as img:
        assert img.log_replayed
        assert img.bat[idx] & S.BAT_OFFSET_MASK == new_off
        assert idx in dict(iter_nonzero(img.bat, spans=img.bat_spans))
        assert list(img.bat) == whole_table(img)
    with vhdx.open(path) as d:
        assert d.read_at(block * MiB, 4096) == b"\xab" * 4096
    assert Path(path).read_bytes() == before  # read-only: not one byte changed


@pytest.mark.parametrize("seed", range(6))
def test_random_chains_through_the_sparse_path(tmp_path, monkeypatch, seed):
    """Every BAT through the sparse loader (threshold 0): random chains read their
    ground truth, merge into their parent, and check clean."""
    from test_merge import assert_clean, random_chain, read_all

    from vhdx.merge_engine import merge

    monkeypatch.setattr(image_mod, "_SPARSE_BAT_MIN", 0)
    rng = random.Random(seed)
    chain = random_chain(tmp_path, rng, rng.randint(2, 3), rng.choice([512, 4096]))
    expected = chain.expected()
    with ImageFile(chain.top) as img:
        assert isinstance(img.bat.obj, image_mod.mmap.mmap)  # the sparse loader ran
    assert read_all(chain.top) == expected
    merge(chain.top)
    assert read_all(chain.images[1].path) == expected
    assert_clean(chain.images[1].path)
