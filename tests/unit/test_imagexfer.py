"""nodeshim.imagexfer without root or criu: the files channel's format and checks, and whole
transfers on loopback with the dump replaced by a fake that writes files (the pages then
travel as files: no page server), including every refusal: cut, corrupt, too large, from
the wrong address, too late, the wrong node's certificate."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from clustercore.errors import KernelError, LocalControlError
from nodeshim import criu, criutcp, imagewire, imagexfer
from nodeshim.imagewire import FileEntry, Limits, Manifest

HERE = "127.0.0.1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- pure

def test_headers_parse_or_are_refused():
    assert imagewire.parse_header(imagewire.file_header("core-1.img", 42)) == ("F", 42, "core-1.img")
    assert imagewire.parse_header(imagewire.manifest_header(b"x" * 7)) == ("M", 7, "")
    for bad in (b"F 1\n", b"F -1 a\n", b"F x a\n", b"X 1 a\n", b"M 1 extra\n", b"\n", b"F 1 a b\n",
                b"F 1 \xff\n"):
        with pytest.raises(KernelError) as info:
            imagewire.parse_header(bad)
        assert "bad header" in info.value.detail


def test_only_plain_image_names_are_accepted():
    for good in ("core-1.img", "stats-dump", "pagemap-shmem-1207.img", "tcp-stream-a1b2.img"):
        imagewire.check_name(good, pages_streamed=False)
    for bad in ("../core-1.img", "a/b", ".hidden", "", "x" * 201, "dump.log", "page-server.log",
                "with space", "naïve"):
        with pytest.raises(KernelError):
            imagewire.check_name(bad, pages_streamed=False)
    # with a page server, page files come from it alone
    imagewire.check_name("pages-1.img", pages_streamed=False)
    for name in ("pages-1.img", "pagemap-1.img", "pagemap-shmem-9.img"):
        with pytest.raises(KernelError) as info:
            imagewire.check_name(name, pages_streamed=True)
        assert "page server" in info.value.detail


def test_manifest_round_trips_and_garbage_is_refused():
    files = [FileEntry("core-1.img", 3, sha(b"abc")), FileEntry("mm-1.img", 0, sha(b""))]
    body = imagewire.manifest_body(files, 8192)
    assert imagewire.parse_manifest(body) == Manifest(tuple(files), 8192)
    for bad in (b"", b"{", b"[]", b'{"files": [["a", 1]], "page_bytes": 0}', b'{"files": []}'):
        with pytest.raises(KernelError) as info:
            imagewire.parse_manifest(bad)
        assert "manifest" in info.value.detail


def test_verify_names_the_first_difference_in_one_line():
    m = Manifest((FileEntry("a.img", 3, sha(b"abc")), FileEntry("b.img", 1, sha(b"x"))), 4096)
    ok = {"a.img": (3, sha(b"abc")), "b.img": (1, sha(b"x"))}
    imagewire.verify(m, ok, 4096)
    cases = [
        ({"a.img": ok["a.img"]}, 4096, "b.img is in the manifest but never arrived"),
        ({**ok, "c.img": (1, sha(b"y"))}, 4096, "c.img arrived but is not in the manifest"),
        ({**ok, "a.img": (2, sha(b"ab"))}, 4096, "a.img: 2 bytes arrived, the manifest says 3"),
        ({**ok, "a.img": (3, sha(b"abd"))}, 4096, "a.img: sha256 does not match"),
        (ok, 0, "0 bytes of pages arrived, the dump wrote 4096"),
    ]
    for received, pages, reason in cases:
        with pytest.raises(KernelError) as info:
            imagewire.verify(m, received, pages)
        assert reason in info.value.detail and "\n" not in str(info.value)


def test_image_files_leave_out_logs_and_streamed_pages(tmp_path):
    for name in ("core-1.img", "pages-1.img", "pagemap-1.img", "dump.log", "stats-dump"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "subdir").mkdir()
    assert imagewire.image_files(str(tmp_path), pages_streamed=True) == ["core-1.img", "stats-dump"]
    assert imagewire.image_files(str(tmp_path), pages_streamed=False) == \
        ["core-1.img", "pagemap-1.img", "pages-1.img", "stats-dump"]


def test_limits_must_be_positive():
    with pytest.raises(LocalControlError):
        Limits(max_files=0)
    with pytest.raises(LocalControlError):
        Limits(deadline_s=-1)


# ---------------------------------------------------------------- transfers on loopback

IMAGE = {"core-1.img": os.urandom(5000), "inventory.img": b"inv", "empty.img": b"",
         "pagemap-1.img": b"m" * 48, "pages-1.img": os.urandom(3 * 4096)}


@pytest.fixture
def fake_dump(monkeypatch):
    """criu.dump replaced: writes IMAGE (pages included: no page server) and its log."""
    calls = []

    def dump(pid, images_dir, *, netns_path=None, page_server=None, tls=None, **kw):
        calls.append(pid)
        assert page_server is None
        os.makedirs(images_dir, exist_ok=True)
        for name, data in IMAGE.items():
            with open(os.path.join(images_dir, name), "wb") as f:
                f.write(data)
        with open(os.path.join(images_dir, criu.DUMP_LOG), "w") as f:
            f.write("log")
        return criu.DumpStats(1.0, sum(map(len, IMAGE.values())), len(IMAGE["pages-1.img"]))

    monkeypatch.setattr(criu, "dump", dump)
    return calls


def receive(tmp_path, **kw) -> imagexfer.Receiver:
    kw.setdefault("stream_pages", False)
    return imagexfer.start_receive(str(tmp_path / "dst"), HERE, HERE, **kw)


def test_an_image_moves_and_arrives_verified(tmp_path, fake_dump):
    with receive(tmp_path) as rx:
        assert rx.endpoint.address == HERE and rx.endpoint.page_port is None
        sent = imagexfer.dump_to(4242, str(tmp_path / "src"), rx.endpoint)
        got = rx.wait(5)
        assert fake_dump == [4242]
        assert sorted(os.listdir(rx.images_dir)) == sorted(IMAGE)
        for name, data in IMAGE.items():
            assert (tmp_path / "dst" / name).read_bytes() == data
        assert got.files == sent.files == len(IMAGE)
        assert got.page_bytes == sent.page_bytes == 3 * 4096
        assert got.file_bytes == sent.file_bytes == sum(map(len, IMAGE.values()))
        assert got.refused_peers == 0 and not sent.streamed
        assert oct(os.stat(rx.images_dir).st_mode & 0o777) == "0o700"
    assert not (tmp_path / "dst").exists()  # close() removes it


class FakeSource:
    """Speaks the files channel by hand, to send what a real source never would."""

    def __init__(self, endpoint, bind: str = HERE) -> None:
        self.sock = socket.create_connection((endpoint.address, endpoint.files_port), timeout=5,
                                             source_address=(bind, 0))
        self.reader = self.sock.makefile("rb")

    def hello(self) -> None:
        self.send(imagewire.HELLO)
        assert self.reader.readline() == imagewire.READY

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_file(self, name: str, data: bytes) -> None:
        self.send(imagewire.file_header(name, len(data)) + data)

    def send_manifest(self, entries, page_bytes: int) -> None:
        body = imagewire.manifest_body(entries, page_bytes)
        self.send(imagewire.manifest_header(body) + body)

    def answer(self) -> bytes:
        return self.reader.readline()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def refused(rx, reason: str) -> None:
    with pytest.raises(KernelError) as info:
        rx.wait(5)
    assert reason in info.value.detail, info.value.detail
    assert not os.path.exists(rx.images_dir), "a refused image must be removed"


def test_a_corrupt_file_is_refused_and_removed(tmp_path):
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.send_file("core-1.img", b"corrupted")
        src.send_manifest([FileEntry("core-1.img", 9, sha(b"original!"))], 0)
        assert src.answer() == b"ERR core-1.img: sha256 does not match the manifest\n"
        src.close()
        refused(rx, "sha256 does not match")


def test_a_cut_transfer_is_refused_and_removed(tmp_path):
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.send(imagewire.file_header("pages-1.img", 1 << 20) + b"half" * 1000)
        src.close()
        refused(rx, "the peer closed the connection")


def test_a_file_left_out_of_the_stream_is_refused(tmp_path):
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.send_file("core-1.img", b"abc")
        src.send_manifest([FileEntry("core-1.img", 3, sha(b"abc")), FileEntry("mm-1.img", 1, sha(b"m"))], 0)
        assert src.answer().startswith(b"ERR mm-1.img is in the manifest but never arrived")
        src.close()
        refused(rx, "never arrived")


def test_more_than_the_size_limit_is_refused_before_it_is_read(tmp_path):
    with receive(tmp_path, limits=Limits(max_file_bytes=1000)) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.send(imagewire.file_header("pages-1.img", 1001))
        assert src.answer() == b"ERR more than 1000 bytes of files\n"
        src.close()
        refused(rx, "more than 1000 bytes")


def test_the_source_hears_why_the_destination_refused(tmp_path, fake_dump):
    with receive(tmp_path, limits=Limits(max_file_bytes=100)) as rx:
        with pytest.raises(KernelError) as info:
            imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint)
        assert info.value.detail == "the destination refused: more than 100 bytes of files"
        refused(rx, "more than 100 bytes")


def test_a_name_sent_twice_or_escaping_the_directory_is_refused(tmp_path):
    for first, second in ((b"a.img", b"a.img"), (b"a.img", b"../a.img")):
        with imagexfer.start_receive(str(tmp_path / "dst"), HERE, HERE, stream_pages=False) as rx:
            src = FakeSource(rx.endpoint)
            src.hello()
            src.send(b"F 1 " + first + b"\nx" + b"F 1 " + second + b"\nx")
            assert src.answer().startswith(b"ERR ")
            src.close()
            with pytest.raises(KernelError):
                rx.wait(5)
    assert not (tmp_path / "a.img").exists()


def test_a_peer_that_is_no_source_is_refused(tmp_path):
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.send(b"GET / HTTP/1.1\r\n\r\n")
        assert src.answer() == b""
        src.close()
        refused(rx, "does not speak the image transfer protocol")


def test_connections_from_other_addresses_are_closed_unheard(tmp_path, fake_dump):
    with receive(tmp_path) as rx:
        stranger = socket.create_connection((HERE, rx.endpoint.files_port), timeout=5,
                                            source_address=("127.0.0.2", 0))
        assert stranger.recv(10) == b""  # closed without a word
        stranger.close()
        imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint)
        assert rx.wait(5).refused_peers == 1


def test_nothing_arrives_before_the_deadline(tmp_path):
    with receive(tmp_path, limits=Limits(deadline_s=0.3)) as rx:
        refused(rx, "deadline passed")


def test_a_cancelled_receive_says_so_and_removes_the_directory(tmp_path):
    rx = receive(tmp_path)
    src = FakeSource(rx.endpoint)
    src.hello()
    src.send(imagewire.file_header("pages-1.img", 1 << 20) + b"x" * 1000)
    threading.Timer(0.2, rx.cancel).start()
    refused(rx, "cancelled")
    src.close()
    rx.close()


def test_a_cancel_ends_a_receive_whose_page_server_never_starts(tmp_path, monkeypatch):
    """The lab's `image.receive cut` flake: the cancel came while the page server started
    (its log in the directory is what the fault waits for), so cancel() did not kill it,
    and the receiving thread sat in wait_ready, blind to the cancel, until cancel()'s 10 s
    join gave up on the agent's event loop (the gateway then marked the node down). Here
    the page server is a real process that never says ready, and the cancel's kill misses
    it: the cancel must still end the receive, at once."""
    import sys
    started = []
    monkeypatch.setattr(criu, "_require_binary", lambda: sys.executable)
    monkeypatch.setattr(criu, "page_server_args",
                        lambda exe, images_dir, **kw: [exe, "-c", "import time; time.sleep(60)"])
    real_init, real_kill = criu.PageServer.__init__, criu.PageServer.kill

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        started.append(self)

    missed = []

    def kill(self):  # the first kill is the cancel's, which came too early to see it
        if not missed:
            missed.append(self)
            return
        real_kill(self)
    monkeypatch.setattr(criu.PageServer, "__init__", init)
    monkeypatch.setattr(criu.PageServer, "kill", kill)
    rx = imagexfer.start_receive(str(tmp_path / "dst"), HERE, HERE, stream_pages=True,
                                 limits=Limits(deadline_s=60))
    pages = socket.create_connection((HERE, rx.endpoint.page_port), timeout=5)
    files = socket.create_connection((HERE, rx.endpoint.files_port), timeout=5)
    try:
        files.sendall(imagexfer.HELLO)
        for _ in range(500):  # bounded: the page server has started (the receiver now waits for it)
            if started:
                break
            time.sleep(0.01)
        assert started, "the receiver never started its page server"
        rx.cancel()
        assert missed, "the test's premise: the cancel's kill missed the page server"
        refused(rx, "cancelled")
        assert files.recv(100) in (b"", b"ERR cancelled\n")  # the source sees the transfer end
    finally:
        files.close()
        pages.close()
        for ps in started:  # ours, by its Popen (its PID)
            if ps.proc.poll() is None:
                ps.proc.kill()
            ps.proc.wait(5)
        rx.close()


@pytest.mark.parametrize("destination_gone", [True, False])
def test_a_dump_that_fails_says_whether_the_destination_ended_it(tmp_path, monkeypatch, destination_gone):
    """The lab's cut fault, when it lands inside criu dump: criu only says its page server
    does not answer; the destination's closed connection makes it the image send's
    failure. A dump failing on its own stays criu's."""
    receivers = []

    def dump(pid, images_dir, **kw):
        if destination_gone:
            receivers[0].cancel()
        raise KernelError("criu dump", None, "page-xfer: The page server doesn't answer")
    monkeypatch.setattr(criu, "dump", dump)
    with receive(tmp_path) as rx:
        receivers.append(rx)
        with pytest.raises(KernelError) as info:
            imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint)
        if destination_gone:
            assert info.value.operation == imagexfer.SEND, info.value
            assert info.value.detail.startswith("the destination"), info.value.detail
            assert "(criu dump: page-xfer: The page server doesn't answer)" in info.value.detail
        else:
            assert info.value.operation == "criu dump", info.value
            rx.cancel()


class FakePrebuilt:
    """criutcp.Prebuilt as the receiver sees it: made when our file is here, discarded."""

    def __init__(self, made: list, images_dir: str, netns) -> None:
        self.data = open(os.path.join(images_dir, criutcp.FILE), "rb").read()
        self.discarded = False
        made.append(self)

    def discard(self) -> None:
        self.discarded = True


@pytest.fixture
def fake_prebuild(monkeypatch):
    made: list[FakePrebuilt] = []
    monkeypatch.setattr(criutcp, "prebuild", lambda images_dir, netns=None: FakePrebuilt(made, images_dir, netns))
    return made


OURS = b"our connections " * 1000


@pytest.mark.parametrize("written", [True, False])
def test_our_file_goes_while_criu_dumps_and_is_rebuilt_at_once(tmp_path, monkeypatch, fake_prebuild, written):
    """EarlyFile: written while criu dumps, it is sent at once and the destination starts
    rebuilding the connections before criu's files (and the manifest) are there; it is
    sent and verified once. Not written in time (its writer was slower than criu): it
    goes with the others."""
    seen_during_dump = []

    def dump(pid, images_dir, **kw):
        os.makedirs(images_dir, exist_ok=True)
        with open(os.path.join(images_dir, criutcp.FILE), "wb") as f:
            f.write(OURS)
        if written:
            early.written()  # our dump's thread, in the lab
            deadline = time.monotonic() + 5
            while not fake_prebuild and time.monotonic() < deadline:
                time.sleep(0.005)
        seen_during_dump.append(len(fake_prebuild))
        for name, data in IMAGE.items():
            with open(os.path.join(images_dir, name), "wb") as f:
                f.write(data)
        return criu.DumpStats(1.0, 0, len(IMAGE["pages-1.img"]))
    monkeypatch.setattr(criu, "dump", dump)
    early = imagexfer.EarlyFile(str(tmp_path / "src"), criutcp.FILE)
    with receive(tmp_path) as rx:
        sent = imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint, early=early)
        got = rx.wait(5)
        assert seen_during_dump == [1 if written else 0]
        assert got.files == sent.files == len(IMAGE) + 1
        assert got.file_bytes == sent.file_bytes == sum(map(len, IMAGE.values())) + len(OURS)
        assert [p.data for p in fake_prebuild] == [OURS]  # one rebuild, of the whole file
        pre = rx.take_prebuilt()
        assert pre is fake_prebuild[0] and rx.take_prebuilt() is None
    assert not pre.discarded  # the restore's now: close() leaves it alone


def test_a_rebuild_nobody_took_is_discarded_with_the_image(tmp_path, fake_dump, fake_prebuild):
    """Closed after a verified image but without a restore (the migration was given up):
    the early rebuild's silent sockets are closed with the directory."""
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.send_file(criutcp.FILE, OURS)
        src.send_manifest([FileEntry(criutcp.FILE, len(OURS), sha(OURS))], 0)
        assert src.answer() == b"OK\n"
        src.close()
        rx.wait(5)
    assert len(fake_prebuild) == 1 and fake_prebuild[0].discarded


def test_an_image_that_fails_its_checks_discards_the_early_rebuild(tmp_path, fake_prebuild):
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.send_file(criutcp.FILE, OURS)
        src.send_manifest([FileEntry(criutcp.FILE, len(OURS), sha(b"something else"))], 0)
        src.close()
        refused(rx, criutcp.FILE)
        assert rx.take_prebuilt() is None
    assert len(fake_prebuild) == 1 and fake_prebuild[0].discarded


def test_an_early_send_that_fails_fails_the_image_send(tmp_path):
    """The early file's writer sends on a broken connection: the error is kept and
    raised when dump_to takes the connection back; nothing is sent outside the loan."""
    (tmp_path / criutcp.FILE).write_bytes(OURS)
    early = imagexfer.EarlyFile(str(tmp_path), criutcp.FILE)
    ours, theirs = socket.socketpair()
    wire = imagewire._Wire(ours, time.monotonic() + 5, imagexfer.SEND)
    early.written()  # not lent: nothing happens
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1)
    theirs.close()
    early._lend(wire)
    early.written()
    with pytest.raises(KernelError) as info:
        early._take_back()
    assert info.value.operation == imagexfer.SEND
    ours.close()


def test_restore_runs_only_on_a_verified_image(tmp_path, monkeypatch):
    restored = []
    monkeypatch.setattr(criu, "restore", lambda *a, **kw: restored.append(a) or 1)
    with receive(tmp_path) as rx:
        src = FakeSource(rx.endpoint)
        src.hello()
        src.close()
        with pytest.raises(KernelError):
            imagexfer.restore(rx, pidfile=str(tmp_path / "pid"), timeout=5)
    assert restored == []


def test_a_destination_that_is_gone_is_one_clear_error(tmp_path, fake_dump):
    with receive(tmp_path) as rx:
        endpoint = rx.endpoint
    with pytest.raises(KernelError) as info:
        imagexfer.dump_to(1, str(tmp_path / "src"), endpoint, timeout=5)
    assert info.value.operation == "image send" and "cannot reach" in info.value.detail
    assert fake_dump == []  # nothing dumped, nothing frozen


def test_bad_arguments_are_the_callers_error(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(LocalControlError):
        imagexfer.start_receive(str(tmp_path / "exists"), HERE, HERE)
    with pytest.raises(LocalControlError):
        imagexfer.start_receive(str(tmp_path / "d"), HERE, "not-an-address")
    tls = criu.TlsFiles("ca", "cert", "key")
    with pytest.raises(LocalControlError):
        imagexfer.start_receive(str(tmp_path / "d"), HERE, HERE, tls=tls)  # no source_node
    with pytest.raises(LocalControlError):
        imagexfer.start_receive(str(tmp_path / "d"), HERE, HERE, tls=tls, source_node="n1")  # no files
    with pytest.raises(LocalControlError):
        imagexfer.dump_to(1, str(tmp_path / "s"), imagexfer.Endpoint(HERE, 1, None), tls=tls)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- TLS between nodes

@pytest.fixture(scope="module")
def pki_dirs(tmp_path_factory):
    from vipwire import pki
    ours, other = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("otherpki")
    pki.init(str(ours), nodes=["n1", "n2", "n3"])
    pki.init(str(other), nodes=["n1", "n2"])

    def files(directory, node):
        p = pki.paths(str(directory), "node", node)
        return criu.TlsFiles(p.ca_cert, p.cert, p.key)
    return lambda node, foreign=False: files(other if foreign else ours, node)


def test_over_tls_each_end_checks_the_others_node_name(tmp_path, fake_dump, pki_dirs):
    with receive(tmp_path, tls=pki_dirs("n2"), source_node="n1") as rx:
        imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint, tls=pki_dirs("n1"), dest_node="n2")
        assert rx.wait(5).files == len(IMAGE)


def test_over_tls_the_wrong_destination_gets_nothing(tmp_path, fake_dump, pki_dirs):
    with receive(tmp_path, tls=pki_dirs("n3"), source_node="n1") as rx:
        with pytest.raises(KernelError) as info:
            imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint, tls=pki_dirs("n1"), dest_node="n2")
        assert info.value.detail == "the peer is n3.node.vipcluster, not n2.node.vipcluster"
        refused(rx, "closed the connection")
    assert fake_dump == []  # refused before anything was dumped


def test_over_tls_the_wrong_source_is_refused_before_it_dumps(tmp_path, fake_dump, pki_dirs):
    with receive(tmp_path, tls=pki_dirs("n2"), source_node="n1") as rx:
        with pytest.raises(KernelError) as info:
            imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint, tls=pki_dirs("n3"), dest_node="n2")
        assert "the destination refused: the peer is n3.node.vipcluster, not n1" in info.value.detail
        refused(rx, "not n1.node.vipcluster")
    assert fake_dump == []


def test_over_tls_a_certificate_from_another_cluster_is_refused(tmp_path, fake_dump, pki_dirs):
    with receive(tmp_path, tls=pki_dirs("n2"), source_node="n1") as rx:
        with pytest.raises(KernelError) as info:
            imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint, tls=pki_dirs("n1", foreign=True),
                              dest_node="n2")
        assert info.value.operation == "image send"
        refused(rx, "TLS handshake failed")
    assert fake_dump == []


def test_a_plain_source_cannot_talk_to_a_tls_destination(tmp_path, fake_dump, pki_dirs):
    with receive(tmp_path, tls=pki_dirs("n2"), source_node="n1") as rx:
        with pytest.raises(KernelError):
            imagexfer.dump_to(1, str(tmp_path / "src"), rx.endpoint, timeout=5)
        refused(rx, "TLS handshake failed")
    assert fake_dump == []


def test_node_certificates_are_checked_by_issuer_and_name(pki_dirs):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    def der(files):
        with open(files.cert, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)
    ca = pki_dirs("n1").ca
    imagewire.check_peer_node(der(pki_dirs("n2")), ca, "n2", "x")
    with pytest.raises(KernelError, match="not n1.node.vipcluster"):
        imagewire.check_peer_node(der(pki_dirs("n2")), ca, "n1", "x")
    with pytest.raises(KernelError, match="not from the cluster CA"):
        imagewire.check_peer_node(der(pki_dirs("n2", foreign=True)), ca, "n2", "x")
    with pytest.raises(KernelError, match="no certificate"):
        imagewire.check_peer_node(None, ca, "n2", "x")


def test_many_small_files_arrive_whole_whatever_the_segment_boundaries(tmp_path):
    """The sender gathers small files into large sends and the reader keeps a read position
    in one buffer: every header and every byte must still come out in order, however the
    stream is cut into pieces on the way."""
    src = tmp_path / "src"
    src.mkdir()
    sizes = [0, 1, 7, 470, 4096, 100_000] + [i * 37 % 2000 for i in range(600)]
    for i, size in enumerate(sizes):
        (src / f"tcp-stream-{i}.img").write_bytes(os.urandom(size))
    (src / "big.img").write_bytes(os.urandom(imagewire.CHUNK + 12345))  # streamed, not queued
    names = sorted(os.listdir(src))
    a, b = socket.socketpair()
    relay_in, relay_out = socket.socketpair()

    def send():
        wire = imagewire._Wire(a, time.monotonic() + 60, imagewire.SEND)
        entries = [imagexfer._send_file(wire, str(src), n) for n in names]
        wire.send(b"END\n")
        sent.extend(entries)
        a.close()

    def relay():  # re-cut the stream into odd pieces
        sizes, i = (1, 3, 1000, 65536, 13, 7777), 0
        while data := b.recv(70000):
            view = memoryview(data)
            while view:
                n = sizes[i % len(sizes)]
                relay_in.sendall(view[:n])
                view, i = view[n:], i + 1
        relay_in.close()
    sent: list = []
    threads = [threading.Thread(target=send), threading.Thread(target=relay)]
    for t in threads:
        t.start()
    wire = imagewire._Wire(relay_out, time.monotonic() + 60, imagewire.RECEIVE)
    got = {}
    while (line := wire.readline()) != b"END\n":
        kind, size, name = imagewire.parse_header(line)
        got[name] = wire.read(size)
    for t in threads:
        t.join()
    assert sorted(got) == names
    for name in names:
        assert got[name] == (src / name).read_bytes()
    assert [e.sha256 for e in sent] == [hashlib.sha256((src / n).read_bytes()).hexdigest() for n in names]
    with pytest.raises(KernelError):
        wire.readline()  # the peer closed
