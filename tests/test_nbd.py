"""``vhdx serve`` / :mod:`vhdx.nbd`: the NBD server against real clients (qemu-img,
qemu-io, nbdinfo) and a raw-socket client for the protocol's error paths.

Ground truth is the builder's description of a 3-deep chain (``BuiltChain.expected``),
and ``vhdx map`` for allocation; every read-only test hashes the chain's files before
and after. Sockets live in a short private temp directory (a Unix socket path is
limited to 108 bytes); TCP uses port 0 (picked at run time).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from builder import FULLY, PARTIAL, Block, DirtyLog, build_chain, random_spec

import vhdx
from vhdx import nbd as N

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SIZE = 48 * MiB


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} not installed")


def cli(*args: str, check_rc: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "vhdx", *map(str, args)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def digests(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base (4 MiB blocks) <- mid <- top (2 MiB blocks, partial blocks included)."""
    d = tmp_path_factory.mktemp("nbdchain")
    rng = random.Random(81)
    specs = [random_spec(rng, name="base", virtual_size=SIZE, block_size=4 * MiB, lss=512,
                         differencing=False, density=0.6),
             random_spec(rng, name="mid", virtual_size=SIZE, block_size=2 * MiB, lss=512,
                         differencing=True, density=0.4),
             random_spec(rng, name="top", virtual_size=SIZE, block_size=2 * MiB, lss=512,
                         differencing=True, density=0.3)]
    specs[2].blocks[0] = Block(PARTIAL)  # sector-granular data right at the start
    specs[1].blocks[1] = Block(FULLY)
    built = build_chain(d, specs)
    built.truth = built.expected()  # type: ignore[attr-defined]
    return built


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vnbd")
    if len(d) > 80 and os.path.isdir("/tmp"):  # a long $TMPDIR would not fit a socket path
        os.rmdir(d)
        d = tempfile.mkdtemp(prefix="vnbd", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(chain, sockdir):
    """The chain served read-only on a Unix socket; the files are hashed around it."""
    before = digests(chain.paths)
    disk = vhdx.open(chain.top)
    server = N.NbdServer(disk, socket_path=sockdir / "s").start()
    try:
        yield server
    finally:
        server.stop()
        disk.close()
    assert not (sockdir / "s").exists()
    assert digests(chain.paths) == before


# --- a raw client: the protocol by hand ----------------------------------------------
class Client:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(os.fspath(path))
        self.structured = False
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            k = self.sock.recv(n - len(out))
            if not k:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += k
        return bytes(out)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self, flags: int = N.FLAG_C_FIXED_NEWSTYLE | N.FLAG_C_NO_ZEROES) -> None:
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt_magic) == (N.NBDMAGIC, N.IHAVEOPT)
        assert hflags & N.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; the replies up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", N.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == N.OPT_REPLY_MAGIC and ropt == opt
            out.append((rtype, self.recv(length)))
            if rtype == N.REP_ACK or rtype & (1 << 31):
                return out

    def go(self, name: str = "", structured: bool = True, meta: bool = True) -> tuple[int, int]:
        """Negotiate and enter transmission; returns (size, transmission flags)."""
        self.greet()
        if structured:
            assert self.option(N.OPT_STRUCTURED_REPLY)[-1][0] == N.REP_ACK
            self.structured = True
        if meta:
            q = N.BASE_ALLOCATION.encode()
            r = self.option(N.OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">II", 1, len(q)) + q)
            assert r[0][0] == N.REP_META_CONTEXT and r[0][1][4:] == q and r[-1][0] == N.REP_ACK
        n = name.encode()
        replies = self.option(N.OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">HH", 1, N.INFO_BLOCK_SIZE))
        assert replies[-1][0] == N.REP_ACK, replies
        infos = {struct.unpack(">H", d[:2])[0]: d for t, d in replies if t == N.REP_INFO}
        _, size, tflags = struct.unpack(">HQH", infos[N.INFO_EXPORT])
        return size, tflags

    def send(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> int:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", N.REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + payload)
        return self.cookie

    def reply(self, read_length: int | None = None) -> tuple[int, int, bytes, list]:
        """(cookie, error, data, chunks) of the next reply; ``read_length`` is the length
        of the read it answers when it may be a simple reply carrying data."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == N.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_length) if (read_length and not err) else b""
            return cookie, err, data, []
        assert magic == N.STRUCTURED_REPLY_MAGIC, hex(magic)
        data, chunks, err = {}, [], 0
        while True:
            if chunks:
                assert struct.unpack(">I", self.recv(4))[0] == N.STRUCTURED_REPLY_MAGIC
            flags, typ, cookie, length = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(length)
            chunks.append((typ, body))
            if typ == N.REPLY_TYPE_OFFSET_DATA:
                data[struct.unpack(">Q", body[:8])[0]] = body[8:]
            elif typ == N.REPLY_TYPE_ERROR:
                err = struct.unpack(">I", body[:4])[0]
            if flags & N.REPLY_FLAG_DONE:
                break
        return cookie, err, b"".join(data[k] for k in sorted(data)), chunks

    def read(self, offset: int, length: int) -> bytes:
        c = self.send(N.CMD_READ, offset, length)
        cookie, err, data, _ = self.reply(length)
        assert cookie == c and err == 0
        return data


# --- real clients ------------------------------------------------------------------
def test_qemu_img_convert_equals_vhdx_hash(chain, served, tmp_path):
    need("qemu-img")
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(out)],
                   check=True, capture_output=True, timeout=120)
    got = hashlib.sha256(out.read_bytes()).hexdigest()
    line = cli("hash", chain.top).stdout.split()[0]
    assert got == line == hashlib.sha256(chain.truth).hexdigest()


def test_forensics_recipe_qcow2_over_nbd(chain, sockdir, tmp_path):
    """docs/forensics.md, section NBD: serve, convert to qcow2, stop with SIGTERM."""
    need("qemu-img")
    sock = sockdir / "s"
    p, uri = _start_cli(str(chain.top), "--socket", str(sock))
    try:
        out = tmp_path / "out.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(out)],
                       check=True, capture_output=True, timeout=120)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(back)],
                   check=True, capture_output=True, timeout=120)
    assert back.read_bytes() == chain.truth
    # the holes the server reported stayed holes: the qcow2 holds no more than the data
    with vhdx.open(chain.top) as disk:
        data = sum(e.length for e in disk.extents() if e.kind == "data")
    assert out.stat().st_size < data + 4 * MiB


def _runs(pairs) -> list[tuple[int, int, bool]]:  # (start, length, is_data)
    out: list[list] = []
    for start, length, data in pairs:
        if out and out[-1][2] == data and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length, data])
    return [tuple(r) for r in out]


def test_qemu_img_map_over_nbd_agrees_with_vhdx_map(chain, served):
    need("qemu-img")
    p = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", served.uri],
                       check=True, capture_output=True, text=True, timeout=120)
    qemu = _runs((e["start"], e["length"], e["data"]) for e in json.loads(p.stdout))
    ours = _runs((e["offset"], e["length"], e["kind"] == "data")
                 for e in json.loads(cli("map", chain.top, "--json").stdout)["extents"])
    assert qemu == ours
    assert any(d for *_, d in ours) and any(not d for *_, d in ours)  # both kinds are exercised
    for start, length, data in qemu:  # and the holes really read zeros
        if not data:
            assert chain.truth[start:start + length].count(0) == length


def test_nbdinfo_reports_size_and_export(chain, served):
    need("nbdinfo")
    info = json.loads(subprocess.run(["nbdinfo", "--json", served.uri], check=True, capture_output=True,
                                     text=True, timeout=60).stdout)
    (ex,) = info["exports"]
    assert ex["export-size"] == SIZE
    assert ex["is_read_only"] is True
    assert "base:allocation" in ex["contexts"]
    listing = json.loads(subprocess.run(["nbdinfo", "--list", "--json", served.uri], check=True,
                                        capture_output=True, text=True, timeout=60).stdout)
    (ex,) = listing["exports"]
    assert ex["export-name"] == chain.top.name == served.export_name
    assert ex["export-size"] == SIZE
    assert "read-only" in ex["description"] and chain.top.name in ex["description"]


def test_export_name_option_names_the_export(chain, sockdir):
    need("nbdinfo")
    p, uri = _start_cli(str(chain.top), "--socket", str(sockdir / "n"), "--export-name", "evidence1")
    try:
        named = uri.replace("nbd+unix:///?", "nbd+unix:///evidence1?")
        for u, ok in ((named, True), (uri, True), (uri.replace("///?", "///other?"), False)):
            r = subprocess.run(["nbdinfo", "--size", u], capture_output=True, text=True, timeout=60)
            assert (r.returncode == 0) == ok, (u, r.stderr)
            if ok:
                assert r.stdout.strip() == str(SIZE)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0


def test_two_clients_read_at_once(chain, served, tmp_path):
    need("qemu-img")
    outs = [tmp_path / f"c{i}.raw" for i in range(2)]
    procs = [subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(o)],
                              stderr=subprocess.PIPE) for o in outs]
    # Meanwhile two raw sessions are open together and answer interleaved reads.
    a, b = Client(served.socket_path), Client(served.socket_path)
    try:
        a.go(), b.go()
        ca = a.send(N.CMD_READ, 3 * MiB, MiB)
        cb = b.send(N.CMD_READ, 7 * MiB + 512, 4096)
        assert b.reply() [:3] == (cb, 0, chain.truth[7 * MiB + 512:7 * MiB + 4608])
        assert a.reply()[:3] == (ca, 0, chain.truth[3 * MiB:4 * MiB])
    finally:
        a.close(), b.close()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    for o in outs:
        assert o.read_bytes() == chain.truth


def test_client_disconnecting_mid_transfer_leaves_the_others_served(chain, served):
    keeper = Client(served.socket_path)
    keeper.go()
    quitter = Client(served.socket_path)
    quitter.go()
    for i in range(4):  # 128 MiB of replies asked for, then it hangs up after a few KiB
        quitter.send(N.CMD_READ, (i * 8 * MiB) % (SIZE - 32 * MiB), 32 * MiB)
    quitter.recv(5000)
    quitter.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    quitter.close()  # reset, not a clean close
    try:
        got = b"".join(keeper.read(off, MiB) for off in range(0, SIZE, MiB))
        assert got == chain.truth
    finally:
        keeper.close()
    fresh = Client(served.socket_path)  # and new clients still get in
    try:
        fresh.go()
        assert fresh.read(SIZE - 4096, 4096) == chain.truth[-4096:]
    finally:
        fresh.close()


def test_dirty_log_chain_is_served_through_the_python_path(tmp_path, sockdir):
    """A replayed log's overlay (Python read path) serves the same bytes, to 2 clients."""
    need("qemu-img")
    rng = random.Random(3)
    spec = random_spec(rng, name="dirty", virtual_size=8 * MiB, block_size=MiB, lss=512, differencing=False)
    spec.dirty_log = DirtyLog(entries=2)
    built = build_chain(tmp_path, [spec])
    before = digests(built.paths)
    with vhdx.open(built.top) as disk, N.NbdServer(disk, socket_path=sockdir / "d") as server:
        assert disk._native is None
        outs = [tmp_path / f"d{i}.raw" for i in range(2)]
        procs = [subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(o)])
                 for o in outs]
        assert [p.wait(120) for p in procs] == [0, 0]
    for o in outs:
        assert o.read_bytes() == built.expected()
    assert digests(built.paths) == before  # the log stays unreplayed on disk


# --- bad input -----------------------------------------------------------------------
def test_malformed_handshakes_are_dropped_and_the_server_keeps_serving(chain, served):
    c = Client(served.socket_path)  # unknown client flags: the protocol says drop it
    c.greet(flags=0xFFFF0000)
    assert c.closed_by_server()
    c.close()
    c = Client(served.socket_path)  # not an option header
    c.greet()
    c.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert c.closed_by_server()
    c.close()
    c = Client(served.socket_path)  # truncated mid-option, then gone
    c.greet()
    c.sock.sendall(struct.pack(">QI", N.IHAVEOPT, N.OPT_GO))
    c.close()
    c = Client(served.socket_path)  # option length beyond any sane limit
    c.greet()
    c.sock.sendall(struct.pack(">QII", N.IHAVEOPT, N.OPT_GO, 0xFFFFFFFF))
    assert c.closed_by_server()
    c.close()
    c = Client(served.socket_path)
    try:
        c.go()
        assert c.read(0, 8192) == chain.truth[:8192]
    finally:
        c.close()


def test_unknown_and_invalid_options_get_error_replies(chain, served):
    c = Client(served.socket_path)
    try:
        c.greet()
        for opt, data in ((0x77, b"whatever"), (N.OPT_STARTTLS, b""), (11, b"")):
            (rtype, _), = c.option(opt, data)
            assert rtype == N.REP_ERR_UNSUP
        (rtype, _), = c.option(N.OPT_LIST, b"junk")
        assert rtype == N.REP_ERR_INVALID
        (rtype, _), = c.option(N.OPT_GO, b"\x00\x00\x00\x09abc")  # name longer than the data
        assert rtype == N.REP_ERR_INVALID
        (rtype, msg), = c.option(N.OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
        assert rtype == N.REP_ERR_UNKNOWN and b"nope" in msg
        q = N.BASE_ALLOCATION.encode()
        (rtype, _), = c.option(N.OPT_SET_META_CONTEXT, struct.pack(">III", 0, 1, len(q)) + q)
        assert rtype == N.REP_ERR_INVALID  # structured replies were not negotiated yet
        listing = c.option(N.OPT_LIST)
        assert listing[0][0] == N.REP_SERVER and listing[-1][0] == N.REP_ACK
        (nlen,) = struct.unpack(">I", listing[0][1][:4])
        assert listing[0][1][4:4 + nlen] == chain.top.name.encode()
        metas = c.option(N.OPT_LIST_META_CONTEXT, struct.pack(">II", 0, 0))
        assert [d[4:] for t, d in metas if t == N.REP_META_CONTEXT] == [q]
        # After all that the same connection still negotiates and serves.
        assert c.option(N.OPT_STRUCTURED_REPLY)[-1][0] == N.REP_ACK
        n = chain.top.name.encode()
        replies = c.option(N.OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">HH", 1, N.INFO_NAME))
        assert replies[-1][0] == N.REP_ACK
        c.structured = True
        assert c.read(5 * MiB, 4096) == chain.truth[5 * MiB:5 * MiB + 4096]
    finally:
        c.close()


def test_stalled_handshakes_time_out_and_connections_are_bounded(chain, sockdir):
    with vhdx.open(chain.top) as disk:
        server = N.NbdServer(disk, socket_path=sockdir / "s", handshake_timeout=1.5,
                             max_connections=2, log=lambda _msg: None).start()
        try:
            stalled = Client(server.socket_path)
            stalled.greet()  # and then nothing
            busy = Client(server.socket_path)
            busy.go()
            extra = Client(server.socket_path)  # a third one: closed before any greeting
            assert extra.closed_by_server()
            extra.close()
            t0 = time.monotonic()
            assert stalled.closed_by_server()  # after the handshake timeout
            assert time.monotonic() - t0 < 10
            stalled.close()
            time.sleep(1.6)  # the transmitting client is never timed out
            assert busy.read(0, 4096) == chain.truth[:4096]
            busy.close()
        finally:
            server.stop()


def test_abort_is_acknowledged(served):
    c = Client(served.socket_path)
    try:
        c.greet()
        assert c.option(N.OPT_ABORT) == [(N.REP_ACK, b"")]
        assert c.closed_by_server()
    finally:
        c.close()


def test_export_name_option_and_oldstyle_zero_padding(chain, served):
    c = Client(served.socket_path)
    try:
        c.greet(flags=N.FLAG_C_FIXED_NEWSTYLE)  # no NO_ZEROES: 124 bytes of padding follow
        c.sock.sendall(struct.pack(">QII", N.IHAVEOPT, N.OPT_EXPORT_NAME, 0))
        size, tflags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and tflags & N.TF_READ_ONLY
        assert c.recv(124) == bytes(124)
        assert c.read(SIZE - 512, 512) == chain.truth[-512:]  # simple replies
    finally:
        c.close()
    c = Client(served.socket_path)  # EXPORT_NAME cannot answer an error: dropped
    c.greet()
    c.sock.sendall(struct.pack(">QII", N.IHAVEOPT, N.OPT_EXPORT_NAME, 3) + b"bad")
    assert c.closed_by_server()
    c.close()


@pytest.mark.parametrize("structured", [True, False])
def test_bad_requests_get_the_protocols_errors_and_nothing_is_written(chain, served, structured):
    c = Client(served.socket_path)
    try:
        _, tflags = c.go(structured=structured, meta=structured)
        assert tflags & N.TF_READ_ONLY and not tflags & N.TF_SEND_WRITE_ZEROES
        cases = [
            (N.CMD_READ, SIZE - 4096, 8192, 0, b"", N.EINVAL),  # past the end
            (N.CMD_READ, SIZE + MiB, 512, 0, b"", N.EINVAL),
            (N.CMD_READ, 0, N.MAX_PAYLOAD + 1, 0, b"", N.EINVAL),  # over the maximum payload
            (N.CMD_READ, 0, 512, 1 << 9, b"", N.EINVAL),  # unknown flag
            (N.CMD_WRITE, 4096, 4096, 0, b"\xee" * 4096, N.EPERM),  # read-only export
            (N.CMD_WRITE_ZEROES, 0, MiB, 0, b"", N.EPERM),
            (N.CMD_TRIM, 0, MiB, 0, b"", N.EPERM),
            (42, 0, 0, 0, b"", N.EINVAL),  # unknown command
        ]
        if not structured:  # no metadata context was selected
            cases.append((N.CMD_BLOCK_STATUS, 0, MiB, 0, b"", N.EINVAL))
        else:
            cases.append((N.CMD_BLOCK_STATUS, SIZE - 512, 1024, 0, b"", N.EINVAL))
        for cmd, off, length, flags, payload, want in cases:
            cookie = c.send(cmd, off, length, flags, payload)
            got_cookie, err, data, chunks = c.reply()
            assert (got_cookie, err, data) == (cookie, want, b""), (cmd, off, length)
            if structured and cmd == N.CMD_READ:
                assert chunks[0][0] == N.REPLY_TYPE_ERROR and chunks[0][1][6:]  # with a message
            # ... and the connection keeps serving after every one of them
            assert c.read(off % (SIZE - 4096), 4096) == chain.truth[off % (SIZE - 4096):][:4096]
        cookie = c.send(N.CMD_FLUSH)
        assert c.reply()[:2] == (cookie, 0)
    finally:
        c.close()


def test_block_status_reports_the_extent_map(chain, served):
    c = Client(served.socket_path)
    try:
        c.go()
        with vhdx.open(chain.top) as disk:
            want = _runs((e.offset, e.length, e.kind == "data") for e in disk.extents())
        got, pos = [], 0
        while pos < SIZE:
            cookie = c.send(N.CMD_BLOCK_STATUS, pos, SIZE - pos)
            rc, err, _, chunks = c.reply()
            assert (rc, err) == (cookie, 0) and chunks[0][0] == N.REPLY_TYPE_BLOCK_STATUS
            body = chunks[0][1]
            assert struct.unpack(">I", body[:4])[0] == N.META_ID
            for i in range(4, len(body), 8):
                length, st = struct.unpack(">II", body[i:i + 8])
                assert st in (0, N.STATE_HOLE | N.STATE_ZERO) and length
                got.append((pos, length, st == 0))
                pos += length
        assert _runs(got) == want
        cookie = c.send(N.CMD_BLOCK_STATUS, 0, SIZE, N.CMD_FLAG_REQ_ONE)
        _, err, _, chunks = c.reply()
        body = chunks[0][1]
        assert err == 0 and len(body) == 12
        assert struct.unpack(">II", body[4:]) == (want[0][1], 0 if want[0][2] else 3)
    finally:
        c.close()


# --- writable ------------------------------------------------------------------------
def test_write_to_export_lands_in_the_new_child_only(chain, sockdir, tmp_path):
    need("qemu-io", "qemu-img")
    before = digests(chain.paths)
    new = tmp_path / "exam.avhdx"
    sock = sockdir / "w"
    p = subprocess.Popen([sys.executable, "-m", "vhdx", "serve", str(chain.top), "--write-to", str(new),
                          "--socket", str(sock)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        uri = p.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={sock}"
        io = subprocess.run(["qemu-io", "-f", "raw",
                             "-c", "write -P 0xab 1048576 65536",
                             "-c", "write -P 0xcd 4194404 1000",  # unaligned: read-modify-write
                             "-c", "write -z 8388608 2097152",  # whole block -> zeros
                             "-c", "write -z 12583424 4096",  # unaligned to blocks
                             "-c", "flush", uri], capture_output=True, text=True, timeout=120)
        assert io.returncode == 0, io.stderr
        assert "error" not in io.stdout.lower(), io.stdout
        check = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xab 1048576 65536", uri],
                               capture_output=True, text=True, timeout=60)
        assert "Pattern verification failed" not in check.stdout and check.returncode == 0
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", uri],
                                         capture_output=True, text=True, timeout=60).stdout)
        assert info["virtual-size"] == SIZE
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, p.stderr.read()
    assert digests(chain.paths) == before  # the chain's files are byte-identical
    want = bytearray(chain.truth)
    want[1048576:1048576 + 65536] = b"\xab" * 65536
    want[4194404:4194404 + 1000] = b"\xcd" * 1000
    want[8388608:8388608 + 2097152] = bytes(2097152)
    want[12583424:12583424 + 4096] = bytes(4096)
    with vhdx.open(new) as disk:
        assert [f.path for f in disk.chain] == [str(new)] + [str(x) for x in chain.paths]
        assert disk.read_at(0, SIZE) == bytes(want)
    cli("check", new)
    assert not sock.exists()


def test_writable_api_write_flush_trim_and_errors(chain, sockdir, tmp_path):
    before = digests(chain.paths)
    new = tmp_path / "w.avhdx"
    disk = N.open_for_serving(chain.top, write_to=new)
    server = N.NbdServer(disk, socket_path=sockdir / "s").start()
    c = Client(server.socket_path)
    try:
        _, tflags = c.go()
        assert not tflags & N.TF_READ_ONLY
        assert tflags & N.TF_SEND_WRITE_ZEROES and tflags & N.TF_SEND_TRIM and tflags & N.TF_SEND_FUA
        cookie = c.send(N.CMD_WRITE, 3 * MiB + 7, 5, N.CMD_FLAG_FUA, b"hello")
        assert c.reply()[:2] == (cookie, 0)
        assert c.read(3 * MiB, 16) == (chain.truth[3 * MiB:3 * MiB + 7] + b"hello"
                                       + chain.truth[3 * MiB + 12:3 * MiB + 16])
        cookie = c.send(N.CMD_WRITE, SIZE - 2, 4, 0, b"abcd")  # past the end: ENOSPC
        assert c.reply()[:2] == (cookie, N.ENOSPC)
        cookie = c.send(N.CMD_WRITE_ZEROES, SIZE - 512, 1024)
        assert c.reply()[:2] == (cookie, N.ENOSPC)
        cookie = c.send(N.CMD_WRITE_ZEROES, 0, MiB, N.CMD_FLAG_FAST_ZERO)  # not advertised
        assert c.reply()[:2] == (cookie, N.EINVAL)
        cookie = c.send(N.CMD_WRITE_ZEROES, 20 * MiB, 2 * MiB, N.CMD_FLAG_NO_HOLE)
        assert c.reply()[:2] == (cookie, 0)
        assert c.read(20 * MiB, 2 * MiB) == bytes(2 * MiB)
        cookie = c.send(N.CMD_TRIM, 30 * MiB, 4 * MiB)
        assert c.reply()[:2] == (cookie, 0)
        cookie = c.send(N.CMD_BLOCK_STATUS, 20 * MiB, 2 * MiB, N.CMD_FLAG_REQ_ONE)
        _, err, _, chunks = c.reply()
        assert err == 0 and struct.unpack(">II", chunks[0][1][4:]) == (2 * MiB, 0)  # provisioned
        cookie = c.send(N.CMD_FLUSH)
        assert c.reply()[:2] == (cookie, 0)
    finally:
        c.close()
        server.stop()
        disk.close()
    assert digests(chain.paths) == before
    with vhdx.open(new) as d:
        assert d.read_at(3 * MiB + 7, 5) == b"hello"
        assert d.read_at(20 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert d.read_at(0, 3 * MiB) == chain.truth[:3 * MiB]


def test_writable_export_serializes_concurrent_writers(chain, sockdir, tmp_path):
    new = tmp_path / "cw.avhdx"
    disk = N.open_for_serving(chain.top, write_to=new)
    server = N.NbdServer(disk, socket_path=sockdir / "s").start()
    want = bytearray(chain.truth)
    rng = random.Random(5)
    plans = []
    for k in range(2):  # disjoint halves, unaligned pieces crossing block edges
        plan = []
        for _ in range(40):
            off = k * (SIZE // 2) + rng.randrange(0, SIZE // 2 - 70000)
            data = bytes([rng.randrange(1, 256)]) * rng.randrange(1, 70000)
            plan.append((off, data))
            want[off:off + len(data)] = data
        plans.append(plan)
    errors: list[BaseException] = []

    def writer(plan) -> None:
        c = Client(server.socket_path)
        try:
            c.go()
            for off, data in plan:
                cookie = c.send(N.CMD_WRITE, off, len(data), 0, data)
                assert c.reply()[:2] == (cookie, 0)
                assert c.read(off, len(data)) == data
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(p,)) for p in plans]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.stop()
        disk.close()
    assert not errors, errors
    with vhdx.open(new) as d:
        assert d.read_at(0, SIZE) == bytes(want)


def test_random_requests_on_a_writable_export_match_a_model(chain, sockdir, tmp_path):
    """Seeded random writes, zeroes (with and without NO_HOLE), reads, block status and
    flushes over one connection, against a bytearray model of the disk."""
    new = tmp_path / "m.avhdx"
    disk = N.open_for_serving(chain.top, write_to=new)
    server = N.NbdServer(disk, socket_path=sockdir / "s").start()
    model = bytearray(chain.truth)
    rng = random.Random(1234)
    c = Client(server.socket_path)
    try:
        c.go()
        for _ in range(300):
            op = rng.random()
            off = rng.randrange(SIZE)
            n = min(rng.choice((1, 511, 512, 4096, 65536, 3 * MiB)), SIZE - off) or 1
            off = min(off, SIZE - n)
            if op < 0.4:
                data = rng.randbytes(n)
                cookie = c.send(N.CMD_WRITE, off, n, rng.choice((0, N.CMD_FLAG_FUA)), data)
                assert c.reply()[:2] == (cookie, 0)
                model[off:off + n] = data
            elif op < 0.55:
                cookie = c.send(N.CMD_WRITE_ZEROES, off, n, rng.choice((0, N.CMD_FLAG_NO_HOLE)))
                assert c.reply()[:2] == (cookie, 0)
                model[off:off + n] = bytes(n)
            elif op < 0.65:
                cookie = c.send(N.CMD_BLOCK_STATUS, off, n)
                _, err, _, chunks = c.reply()
                assert err == 0
                body, pos = chunks[0][1], off
                for i in range(4, len(body), 8):  # a hole must read zeros
                    length, st = struct.unpack(">II", body[i:i + 8])
                    end = min(pos + length, off + n)
                    if st & N.STATE_ZERO:
                        assert model[pos:end].count(0) == end - pos
                    pos += length
            elif op < 0.7:
                cookie = c.send(N.CMD_FLUSH)
                assert c.reply()[:2] == (cookie, 0)
            else:
                assert c.read(off, n) == model[off:off + n]
    finally:
        c.close()
        server.stop()
        disk.close()
    with vhdx.open(new) as d:
        assert d.read_at(0, SIZE) == bytes(model)
    cli("check", new)


def test_writable_extents_see_pending_sector_bitmaps(chain, tmp_path):
    """WritableDisk.extents (block status of a writable export) before any flush."""
    new = tmp_path / "p.avhdx"
    vhdx.create(new, parent=chain.top)
    with vhdx.open(new, "r+") as disk:
        disk.write_at(6 * MiB + 1024, b"\x01" * 512)  # one sector of a fresh partial block
        (e,) = [x for x in disk.extents(6 * MiB + 1024, 512)]
        assert (e.kind, e.source) == ("data", 0)


# --- the command ---------------------------------------------------------------------
def _start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "vhdx", "serve", *args], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = p.stdout.readline().strip()
    return p, uri


def test_serve_prints_the_uri_and_stops_cleanly_on_sigterm(chain, sockdir):
    need("nbdinfo")
    before = digests(chain.paths)
    sock = sockdir / "cli.sock"
    p, uri = _start_cli(str(chain.top), "--socket", str(sock))
    try:
        assert uri == f"nbd+unix:///?socket={sock}", p.stderr.read() if not uri else uri
        assert sock.exists()
        size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
        assert size.stdout.strip() == str(SIZE)
        c = Client(sock)  # a client still connected when the signal comes
        c.go()
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
    assert rc == 0, p.stderr.read()
    assert c.closed_by_server()
    c.close()
    assert not sock.exists()
    assert digests(chain.paths) == before


def test_serve_over_tcp_on_a_free_port(chain):
    need("nbdinfo")
    p, uri = _start_cli(str(chain.top), "--bind", "127.0.0.1", "--port", "0")
    try:
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/")
        port = int(uri.rsplit(":", 1)[1].rstrip("/"))
        assert port > 0
        size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
        assert size.stdout.strip() == str(SIZE)
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(60)
    assert rc == 0, p.stderr.read()


def test_serve_errors_are_one_line(chain, sockdir, tmp_path):
    r = cli("serve", tmp_path / "missing.vhdx", "--socket", sockdir / "x", check_rc=1)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vhdx: error: ") and "missing.vhdx" in r.stderr
    r = cli("serve", chain.top, "--socket", sockdir / "x", "--port", "5", check_rc=1)
    assert r.stderr.count("\n") == 1 and "--socket" in r.stderr
    existing = tmp_path / "exists.avhdx"
    existing.write_bytes(b"keep me")
    r = cli("serve", chain.top, "--write-to", existing, "--socket", sockdir / "x", check_rc=1)
    assert r.stderr.count("\n") == 1 and "exists.avhdx" in r.stderr
    assert existing.read_bytes() == b"keep me"
    plain = sockdir / "plain"
    plain.write_bytes(b"")
    r = cli("serve", chain.top, "--socket", plain, check_rc=1)
    assert r.stderr.count("\n") == 1 and "not a socket" in r.stderr
    assert not (sockdir / "x").exists()


def test_a_socket_in_use_is_refused_and_a_stale_one_replaced(chain, sockdir):
    with vhdx.open(chain.top) as disk:
        path = sockdir / "s"
        with N.NbdServer(disk, socket_path=path):
            with pytest.raises(vhdx.VhdxError, match="another server"):
                N.NbdServer(disk, socket_path=path)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))  # bound, never listening: what a killed server leaves
        stale.close()
        server = N.NbdServer(disk, socket_path=path).start()
        try:
            c = Client(path)
            c.go()
            assert c.read(0, 512) == chain.truth[:512]
            c.close()
        finally:
            server.stop()
