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
