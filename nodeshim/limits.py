"""Process limits for programs that hold thousands of connections."""

from __future__ import annotations

import fcntl
import os
import resource


def raise_nofile() -> None:
    """Lift the descriptor limit: a migration moves thousands of connections, and the
    agent, the service and the load generator each hold one descriptor per connection.
    Root may raise the hard limit too (up to fs.nr_open); a sandbox may forbid it, then the
    soft limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 1 << 18)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# A descriptor table for this many descriptors is made at start (8 bytes and 2 bits each:
# 512 KB at most); more than that grows on demand as before.
FD_TABLE_AHEAD = 65536


def grow_fd_table(upto: int = FD_TABLE_AHEAD) -> int:
    """Make the kernel's descriptor table big enough for `upto` descriptors (or the
    descriptor limit, if lower) now, once, and return its size (FDSize).

    Why: the table grows by doubling when a new descriptor does not fit, and in a process
    with threads (the agent's event loop has helper threads) every growth waits for an RCU
    grace period (expand_fdtable -> synchronize_rcu) because other threads may be reading
    the old table. Measured in the lab on this 2-core VM: the destination's first 256
    restored sockets of a 1,000-connection handoff took 44 ms to create and the next 256
    14 ms (the table going 256 -> 512 -> 1024), against about 1.3 ms for 256 once the table
    was big enough: 60 ms of a ~150 ms freeze spent waiting, not working. The table never
    shrinks, so growing it before any migration takes that wait out of every freeze.

    How: F_DUPFD asks for the lowest free descriptor >= upto - 1, which makes the kernel
    grow the table to hold it; the duplicate is closed at once (no descriptor in use is
    touched, unlike dup2)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(upto, soft) - 1
    if top > 0:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top))
        except OSError:
            pass  # no free descriptor that high: the table grows on demand, as before
        finally:
            os.close(fd)
    return fd_table_size()


def fd_table_size() -> int:
    """This process's descriptor table size (FDSize in /proc/self/status), 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("FDSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
