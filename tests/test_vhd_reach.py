"""The NBD export and the FUSE mount (their own modules) serve VHD chains like
VHDX ones, since ``vhdx.open`` hands them a VirtualDisk. Skipped where those
commands, nbdcopy or /dev/fuse are not available."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vhd_helpers import vhd_expected

REPO = Path(__file__).resolve().parent.parent


def _has_command(name: str) -> bool:
    p = subprocess.run([sys.executable, "-m", "vhdx", name, "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=60, check=False)
    return p.returncode == 0


def _wait_for(pred, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_nbd_serves_a_vhd_chain(shared_dir, fixture_file, tmp_path) -> None:
    if shutil.which("nbdcopy") is None or not _has_command("serve"):
        pytest.skip("vhdx serve or nbdcopy not available")
    images = vhd_expected(shared_dir)
    rel = "vhd/dfvfs-fat-differential.vhd.gz"
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vhdx", "serve", "--socket", str(sock), str(fixture_file(rel)),
                             "--parent", str(fixture_file(images[rel]["parent"]))], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(sock.exists), "the server did not start"
        out = subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "-"], capture_output=True,
                             timeout=120, check=True).stdout
        assert hashlib.sha256(out).hexdigest() == images[rel]["sha256"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mount_shows_a_vhd(shared_dir, fixture_file, tmp_path) -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or not _has_command("mount"):
        pytest.skip("FUSE or vhdx mount not available")
    images = vhd_expected(shared_dir)
    rel = "vhd/dissect-dynamic.vhd.gz"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vhdx", "mount", "-f", str(fixture_file(rel)), str(mnt)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not _wait_for(lambda: any(mnt.iterdir())):
            pytest.skip("the mount did not come up (no FUSE permission here?)")
        whole = [p for p in mnt.iterdir() if p.name.endswith(".raw") and ".p" not in p.name]
        assert whole
        assert hashlib.sha256(whole[0].read_bytes()).hexdigest() == images[rel]["sha256"]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=30)
