"""atheris fuzz target for the HyperVStorage parser and the VM semantic layer.

    python3 tests/fuzz/fuzz_hyperv.py [-max_total_time=N] [CORPUS_DIR]

Seeds: files made by tests/hvs_builder.py (a VM config with two key tables, a file
object, repeated names; a file with an active replay log). The first input byte
picks whether every CRC is re-sealed after libFuzzer's mutation, so structural
edits reach the code behind the checksums. Anything but a VhdxError is a crash.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import atheris  # noqa: E402 - after the sys.path set-up

with atheris.instrument_imports(include=["vhdx"]):
    from vhdx.errors import VhdxError
    from vhdx.hyperv import open_config
    from vhdx.hyperv.vm import config_kind, read_host_registry, read_vm_config

import hvs_builder as B  # noqa: E402

_TMP = tempfile.mkdtemp(prefix="fuzz_hyperv_")
_PATH = os.path.join(_TMP, "input.vmcx")


def seeds() -> list[bytes]:
    tree = B.vm_tree("Fuzz", "12345678-1234-1234-1234-123456789ABC", ide=[r"C:\a.vhdx"], scsi=[r"C:\b.avhdx"])
    tree[0].children.append(B.N("m", *[B.N("dup", B.V("v", i)) for i in range(3)],
                                B.V("blob", b"z" * 3000, file_object=True), B.V("d", 1.25)))
    old = B.vm_tree("Old", "12345678-1234-1234-1234-123456789ABC")
    return [B.build(tree).data, B.build(tree, dirty_from=old).data]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    if data[0] & 1:
        body = bytes(B.reseal(body))
    with open(_PATH, "wb") as f:
        f.write(body)
    for strict in (True, False):
        try:
            cfg = open_config(_PATH, strict=strict)
        except VhdxError:
            continue
        cfg.to_dict()
        cfg.stats()
        if config_kind(cfg) == "host":
            read_host_registry(cfg)
        else:
            read_vm_config(cfg)


def main() -> None:
    args = list(sys.argv)
    corpus = [a for a in args[1:] if not a.startswith("-")]
    if corpus:
        for i, s in enumerate(seeds()):
            for flag in (b"\0", b"\1"):
                with open(os.path.join(corpus[0], f"seed{i}{flag.hex()}"), "wb") as f:
                    f.write(flag + s)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
