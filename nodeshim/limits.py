"""Process limits for programs that hold thousands of connections."""

from __future__ import annotations

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
