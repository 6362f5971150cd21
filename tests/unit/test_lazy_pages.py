"""Lazy (post-copy) pages: the choice between lazy and copy, criu's argument lists, and the
files the destination accepts for a lazy image (no root, no criu)."""

from __future__ import annotations

import pytest

from clustercore.errors import KernelError
from clustercore.process import LAZY_MIN_BYTES, memory_mode
from nodeshim import criulazy, imagewire


def test_lazy_only_when_both_nodes_can_and_the_program_is_large():
    big = LAZY_MIN_BYTES
    assert memory_mode(big, source_lazy=True, destination_lazy=True)[0] == "lazy"
    assert memory_mode(big - 1, source_lazy=True, destination_lazy=True)[0] == "copy"
    mode, why = memory_mode(big, source_lazy=True, destination_lazy=False)
    assert mode == "copy" and "destination" in why
    mode, why = memory_mode(big, source_lazy=False, destination_lazy=True)
    assert mode == "copy" and "source" in why
    mode, why = memory_mode(big, source_lazy=True, destination_lazy=True, tls=True)
    assert mode == "copy" and "TLS" in why
    assert memory_mode(10, source_lazy=True, destination_lazy=True, threshold=10)[0] == "lazy"


def test_the_lazy_dump_leaves_the_source_stopped_and_serves_over_the_given_socket():
    args = criulazy.dump_args("criu", 42, "/img", ps_socket=7, status_fd=9)
    assert args[:4] == ["criu", "dump", "-t", "42"]
    for flag in ("--lazy-pages", "--leave-stopped", "--tcp-established"):
        assert flag in args
    assert args[args.index("--ps-socket") + 1] == "7" and args[args.index("--status-fd") + 1] == "9"
    assert args[args.index("--network-lock") + 1] == "skip"
    assert "--page-server" not in args  # the non-lazy pages go to the image directory
    assert "--address" not in args  # criu listens nowhere: the connection is ours


def test_the_lazy_pages_daemon_takes_the_pages_from_the_given_socket():
    args = criulazy.daemon_args("criu", "/img", ps_socket=5, status_fd=6)
    assert args[:3] == ["criu", "lazy-pages", "--page-server"]
    assert args[args.index("--ps-socket") + 1] == "5" and args[args.index("-D") + 1] == "/img"
    assert "--address" not in args


def test_criu_needs_pipes_of_four_mebibytes():
    assert not criulazy.pipe_size_ok(1 << 20)  # the kernel's default: criu's tee fails
    assert criulazy.pipe_size_ok(4 << 20)


def test_a_lazy_image_may_carry_page_files_and_a_full_streamed_one_may_not():
    imagewire.check_name("pages-1.img", pages_streamed=False)  # lazy: the few non-lazy pages
    with pytest.raises(KernelError):
        imagewire.check_name("pages-1.img", pages_streamed=True)
    assert imagewire.HELLO_LAZY != imagewire.HELLO and imagewire.HELLO_LAZY.endswith(b"\n")


def test_local_page_bytes_counts_only_page_files(tmp_path):
    (tmp_path / "pages-1.img").write_bytes(b"x" * 8192)
    (tmp_path / "pagemap-1.img").write_bytes(b"y" * 100)
    (tmp_path / "core-1.img").write_bytes(b"z" * 50)
    assert criulazy.local_page_bytes(str(tmp_path)) == 8192


class FakeDaemon:
    started: list = []

    def __init__(self, images_dir, sock, *, netns_path=None):
        self.images_dir, self.sock, self.ended, self.waited = images_dir, sock, [], []
        FakeDaemon.started.append(self)

    def wait_ready(self, timeout):
        self.waited.append(timeout)

    def running(self):
        return not self.ended

    def end(self, timeout=5.0):
        self.ended.append(timeout)


def _receiver(lazy=True):
    from types import SimpleNamespace
    return SimpleNamespace(lazy=lazy, pages_conn="pages-conn", lazy_daemon=None, images_dir="/img", restore_ms={},
                           wait=lambda timeout: None)


def test_the_lazy_pages_daemon_starts_once_when_the_image_is_verified(monkeypatch):
    from nodeshim import lazyxfer
    monkeypatch.setattr(lazyxfer.criulazy, "LazyPagesDaemon", FakeDaemon)
    FakeDaemon.started = []
    full = _receiver(lazy=False)
    lazyxfer.start_daemon(full)
    assert full.lazy_daemon is None and full.pages_conn == "pages-conn"
    rx = _receiver()
    lazyxfer.start_daemon(rx)
    lazyxfer.start_daemon(rx)
    assert len(FakeDaemon.started) == 1 and rx.lazy_daemon.sock == "pages-conn" and rx.pages_conn is None
    assert rx.lazy_daemon.waited == []  # not waited for: the receiving thread goes on


@pytest.mark.parametrize("early", [True, False])
def test_the_restore_uses_the_daemon_started_early_or_starts_it(monkeypatch, early):
    from nodeshim import lazyxfer
    monkeypatch.setattr(lazyxfer.criulazy, "LazyPagesDaemon", FakeDaemon)
    restored = []
    monkeypatch.setattr(lazyxfer.criu, "restore",
                        lambda d, **kw: restored.append((d, kw["lazy_pages"], kw["extra"], kw["worker"])) or 4321)
    FakeDaemon.started = []
    rx = _receiver()
    if early:
        lazyxfer.start_daemon(rx)
    assert lazyxfer.restore_lazy(rx, pidfile="/img.pid", timeout=3.0) == 4321
    assert len(FakeDaemon.started) == 1 and rx.lazy_daemon.waited == [3.0]  # ready before the restore
    assert restored == [("/img", True, (), None)]  # no worker on this receiver: criu's command line
    assert rx.restore_ms["lazy_daemon_early"] is early and not rx.lazy_daemon.ended


def test_a_lazy_restore_goes_to_the_receiver_s_criu_worker(monkeypatch):
    from nodeshim import lazyxfer
    monkeypatch.setattr(lazyxfer.criulazy, "LazyPagesDaemon", FakeDaemon)
    restored = []
    monkeypatch.setattr(lazyxfer.criu, "restore",
                        lambda d, **kw: restored.append((kw["lazy_pages"], kw["worker"])) or 4321)

    class Ready:
        def wait_ready(self, timeout=None):
            pass

    FakeDaemon.started = []
    rx = _receiver()
    worker = rx.worker = Ready()
    assert lazyxfer.restore_lazy(rx, pidfile="/img.pid", timeout=3.0) == 4321
    assert restored == [(True, worker)] and rx.worker is None  # used up: the receiver no longer closes it


def test_a_cancelled_receive_kills_a_daemon_no_restore_used_at_once(tmp_path):
    from nodeshim import imagexfer
    rx = imagexfer.start_receive(str(tmp_path / "img"), "127.0.0.1", "127.0.0.1")
    daemon = rx.lazy_daemon = FakeDaemon(rx.images_dir, None)
    rx.cancel()
    assert daemon.ended[0] == 0.0  # not the 5 s a page-serving daemon gets to finish
    with pytest.raises(KernelError):
        rx.wait(1.0)
