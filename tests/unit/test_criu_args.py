"""The pure side of nodeshim.criu: argument lists, version and log parsing (no root, no criu)."""

from __future__ import annotations

import os

import pytest

from clustercore.errors import KernelError
from nodeshim import criu, criuparse

# A real criu 4.2.1 restore log from this lab (restoring where the address is missing),
# and the failure KERNEL-NOTES records for criu 4.1 on kernels >= 6.16 (its file:line is
# illustrative), both in criu's log format.
RESTORE_WITHOUT_VIP = """\
(00.000412) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.003118) Warn  (criu/cr-restore.c:1050): Set CLONE_PARENT | CLONE_NEWPID but it might cause restore problem,because not all kernels support such clone flags combinations!
(00.021702)      1: Error (criu/sk-inet.c:1059): inet: Can't bind inet socket (id 24): Cannot assign requested address
(00.021900)      1: Error (criu/util.c:1510): Can't wait or bad status: errno=0, status=65280
(00.023001) Error (criu/cr-restore.c:2331): Restoring FAILED.
"""
DUMP_ON_OLD_CRIU = """\
(00.010000) Error (criu/sockets.c:420): Can't get 1:16 opt: Operation not supported
(00.010100) Error (criu/cr-dump.c:2098): Dumping FAILED.
"""


def test_version_is_read_from_criu_version_output():
    assert criuparse.parse_version("Version: 4.2.1\n") == (4, 2, 1)
    assert criuparse.parse_version("Version: 4.2\nGitID: v4.2-3-gabc\n") == (4, 2)
    assert criuparse.parse_version("criu: command not found") is None
    assert criuparse.parse_version("Version: 3.17.1\n") < criu.MIN_VERSION <= (4, 2, 1)


def test_reason_is_the_first_specific_error_in_one_line():
    assert criuparse.failure_reason(RESTORE_WITHOUT_VIP) == (
        "inet: Can't bind inet socket (id 24): Cannot assign requested address (criu/sk-inet.c:1059)")
    assert criuparse.failure_reason(DUMP_ON_OLD_CRIU) == (
        "Can't get 1:16 opt: Operation not supported (criu/sockets.c:420)")


def test_reason_falls_back_to_what_there_is():
    assert criuparse.failure_reason("(00.1) Error (criu/cr-dump.c:1): Dumping FAILED.\n") == \
        "Dumping FAILED. (criu/cr-dump.c:1)"
    assert criuparse.failure_reason("(00.000100) something odd\n(00.000200) last words\n") == "last words"
    assert criuparse.failure_reason("", 1) == "criu exited with status 1"


def test_isolated_program_is_pid_1_and_session_leader_in_a_new_pid_namespace_only():
    argv = criu.isolated_argv(["nginx", "-c", "/etc/x.conf"])
    assert argv == ["unshare", "--pid", "--fork", "setsid", "nginx", "-c", "/etc/x.conf"]
    assert not any(a.startswith(("--mount", "--kill-child")) for a in argv)
    with pytest.raises(ValueError):
        criu.isolated_argv([])


def test_network_namespace_is_entered_with_nsenter_net_only():
    assert criu.in_netns_argv(None, ["criu", "check"]) == ["criu", "check"]
    assert criu.in_netns_argv("/run/netns/n2", ["criu", "check"]) == \
        ["nsenter", "--net=/run/netns/n2", "criu", "check"]


def test_dump_arguments():
    args = criu.dump_args("/usr/local/sbin/criu", 4242, "/tmp/img")
    assert args[:7] == ["/usr/local/sbin/criu", "dump", "-t", "4242", "-D", "/tmp/img", "-o"]
    assert "--leave-stopped" in args and "--tcp-established" in args
    i = args.index("--network-lock")
    assert args[i + 1] == "skip"
    bare = criu.dump_args("criu", 1, "d", leave_stopped=False, tcp_established=False,
                          network_lock_skip=False, extra=["--file-locks"])
    assert bare == ["criu", "dump", "-t", "1", "-D", "d", "-o", criu.DUMP_LOG, "--file-locks"]


def test_restore_arguments():
    args = criu.restore_args("criu", "/tmp/img", pidfile="/tmp/p", inherit_fds={7: "pipe:[123]"})
    assert args[:8] == ["criu", "restore", "-D", "/tmp/img", "-o", criu.RESTORE_LOG, "--pidfile", "/tmp/p"]
    for flag in ("--restore-detached", "--restore-sibling", "--tcp-established"):
        assert flag in args
    i = args.index("--inherit-fd")
    assert args[i + 1] == "fd[7]:pipe:[123]"
    attached = criu.restore_args("criu", "d", pidfile="p", detach=False, tcp_established=False)
    assert "--restore-sibling" not in attached and "--restore-detached" not in attached


def test_pipe_key_names_the_pipe_like_proc_does():
    r, w = os.pipe()
    try:
        assert criu.pipe_key(w) == os.readlink(f"/proc/self/fd/{w}") == criu.pipe_key(r)
    finally:
        os.close(r)
        os.close(w)


def test_image_size_counts_images_not_logs(tmp_path):
    (tmp_path / "pages-1.img").write_bytes(b"x" * 1000)
    (tmp_path / "core-1.img").write_bytes(b"y" * 24)
    (tmp_path / criu.DUMP_LOG).write_text("log " * 100)
    assert criu.image_size(str(tmp_path)) == 1024


TLS = criu.TlsFiles("/pki/ca.crt", "/pki/node-n1.crt", "/pki/node-n1.key")


def test_dump_to_a_page_server_arguments():
    args = criu.dump_args("criu", 7, "/tmp/img", page_server=("192.0.2.2", 27000))
    i = args.index("--page-server")
    assert args[i:i + 5] == ["--page-server", "--address", "192.0.2.2", "--port", "27000"]
    assert "--tls" not in args
    secure = criu.dump_args("criu", 7, "/tmp/img", page_server=("192.0.2.2", 27000), tls=TLS)
    i = secure.index("--tls")
    # the client must not check the name: criu compares it with the IP in --address, and
    # our certificates name nodes (n2.node.vipcluster), never addresses
    assert secure[i:] == ["--tls", "--tls-cacert", TLS.ca, "--tls-cert", TLS.cert,
                          "--tls-key", TLS.key, "--tls-no-cn-verify"]
    assert criu.dump_args("criu", 7, "d", tls=TLS) == criu.dump_args("criu", 7, "d")  # no page server, no TLS


def test_page_server_arguments_take_our_accepted_socket():
    args = criu.page_server_args("criu", "/tmp/dst", ps_socket=9)
    assert args == ["criu", "page-server", "-D", "/tmp/dst", "-o", criu.PAGE_SERVER_LOG, "--ps-socket", "9"]
    secure = criu.page_server_args("criu", "/tmp/dst", ps_socket=9, tls=TLS)
    assert secure[8:] == ["--tls", "--tls-cacert", TLS.ca, "--tls-cert", TLS.cert, "--tls-key", TLS.key]
    assert "--address" not in secure and "--port" not in secure


# stats-dump of a real dump of `sleep` (criu 4.2.1): 30 pages written, none shared
STATS_DUMP = bytes.fromhex("4059105506330957220000000a2008c001109e4818d00620e101283a3000381e"
                           "4000480050065806600068007000")


def test_stats_dump_gives_the_pages_written(tmp_path):
    assert criuparse.parse_stats_dump(STATS_DUMP) == {"pages_written": 30, "shpages_written": 0,
                                                 "frozen_time_us": 9246, "freezing_time_us": 192,
                                                 "memdump_time_us": 848, "memwrite_time_us": 225,
                                                 "pages_lazy": 0}
    assert criuparse.dump_times(STATS_DUMP) == {"criu_freezing": 0.19, "criu_frozen": 9.25,
                                           "criu_memdump": 0.85, "criu_memwrite": 0.23}
    for bad in (STATS_DUMP[:10], STATS_DUMP[:-3], STATS_DUMP[:12] + b"\xff" * 34):
        with pytest.raises(ValueError):
            criuparse.parse_stats_dump(bad)
    (tmp_path / criu.STATS_DUMP).write_bytes(STATS_DUMP)
    assert criu.dump_counters(str(tmp_path)) == (30 * criu.PAGE_SIZE, 9.246)
    (tmp_path / criu.STATS_DUMP).write_bytes(b"junk")
    with pytest.raises(KernelError):
        criu.dump_counters(str(tmp_path))


def test_a_killed_criu_says_so():
    assert criuparse.failure_reason("", -9) == "criu killed by signal 9"


def test_the_kernel_cache_is_probed_on_a_private_tmpfs():
    argv = criu.kdat_probe_argv("/usr/local/sbin/criu")
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    script = argv[6]
    # the tmpfs over /run comes first: criu keeps its cache only there, and must not read an old one
    assert script.index("mount -t tmpfs") < script.index('"$0" check') < script.index("cat /run/criu.kdat")
    assert argv[7] == "/usr/local/sbin/criu"


def test_priming_the_kernel_cache_replaces_it_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "criu.kdat"
    path.write_bytes(b"old")
    monkeypatch.setattr(criu, "kdat_probe_argv", lambda c: ["sh", "-c", "printf 'probed\\0bytes'"])
    assert "primed" in criu.prime_kdat_cache("criu", str(path))
    assert path.read_bytes() == b"probed\0bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["criu.kdat"]  # no temporary left
    for failing in (["sh", "-c", "exit 0"], ["sh", "-c", "printf x; echo boom >&2; exit 3"]):
        monkeypatch.setattr(criu, "kdat_probe_argv", lambda c, f=failing: f)
        said = criu.prime_kdat_cache("criu", str(path))
        assert said.startswith("criu kernel cache not primed")
        assert path.read_bytes() == b"probed\0bytes"
    assert "boom" in said
    monkeypatch.setattr(criu, "kdat_probe_argv", lambda c: ["sh", "-c", "printf new"])
    monkeypatch.setenv(criu.KDAT_ENV, "off")
    assert "not primed" in criu.prime_kdat_cache("criu", str(path))
    assert path.read_bytes() == b"probed\0bytes"


# stats-restore of a real restore of `sleep` (criu 4.2.1): 30 pages, restore 8,178 us
STATS_RESTORE = bytes.fromhex("40591055063309570d000000120b08001000180120f23f281e")


def test_stats_restore_gives_criu_s_restore_times():
    assert criuparse.parse_stats_restore(STATS_RESTORE) == {"forking_time_us": 1, "restore_time_us": 8178,
                                                       "pages_restored": 30}
    assert criuparse.parse_stats_restore(STATS_DUMP)["restore_time_us"] == 0  # a dump's: no restore entry
    for bad in (STATS_RESTORE[:10], STATS_RESTORE[:-2], STATS_RESTORE[:12] + b"\x13"):
        with pytest.raises(ValueError):
            criuparse.parse_stats_restore(bad)


MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /run/odd\\040dir tmpfs rw 0 0
proc /proc proc rw 0 0
"""


def test_images_go_to_tmpfs_when_there_is_one():
    assert criu.tmpfs_mount_points(MOUNTS) == {"/dev/shm", "/run/odd dir"}
    parent = criu.images_parent("/var/lib/vipcluster/n1", MOUNTS)
    assert parent.startswith("/dev/shm/vipcluster-images-")
    assert parent != criu.images_parent("/var/lib/vipcluster/n2", MOUNTS)  # one per agent
    assert parent == criu.images_parent("/var/lib/vipcluster/n1/", MOUNTS)
    no_tmpfs = MOUNTS.replace("tmpfs /dev/shm tmpfs", "shm /dev/shm ext4")
    assert criu.images_parent("/var/lib/vipcluster/n1", no_tmpfs) == "/var/lib/vipcluster/n1/images"


def test_criu_runs_without_hardware_breakpoints_unless_asked():
    env = criu.run_env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "CRIU_FAULT": "130"}  # FI_NO_BREAKPOINTS
    assert "CRIU_FAULT" not in criu.run_env({"PATH": "/usr/bin", criu.BREAKPOINTS_ENV: "on"})
    # a fault the caller injects on purpose is not overridden
    assert criu.run_env({"CRIU_FAULT": "5"})["CRIU_FAULT"] == "5"
