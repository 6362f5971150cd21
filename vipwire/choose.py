"""Which gateway `vipctl` talks to when it is given several control sockets
(comma-separated, e.g. the two gateways of an HA pair on one machine).

Each is asked `ping`; the answer of a gateway says how many node agents it serves now
(`agents`: sessions heard from within two heartbeats). The agents follow the floating
address, so the gateway that serves the most of them is the master: vipctl talks to it.
A gateway that does not answer (gone, or its socket stale) is skipped; none answering is
one clear error naming them all.
"""

from __future__ import annotations

from clustercore.errors import LocalControlError, VipError
from clustercore.messages import Ping

PING_TIMEOUT_S = 2.0


def choose(paths: list[str], timeout: float = PING_TIMEOUT_S) -> str:
    from .client import ControlClient

    best: tuple[int, int, str] | None = None
    problems = []
    for i, path in enumerate(paths):
        try:
            with ControlClient(path, min(timeout, PING_TIMEOUT_S)) as c:
                pong = c.request(Ping())
        except VipError as e:
            problems.append(f"{path}: {e}")
            continue
        agents = pong.get("agents", 0) if isinstance(pong, dict) else 0
        agents = agents if isinstance(agents, int) and not isinstance(agents, bool) else 0
        if best is None or agents > best[0]:
            best = (agents, i, path)
    if best is None:
        raise LocalControlError("no gateway answers: " + "; ".join(problems))
    return best[2]
