"""An opt-in, bounded log of this node's verdicts, for `vipctl replay --mode packets`.

The lab packet replay sends a capture's packets into the real cluster and must learn what
each node's shim did with each one, to compare packet by packet with the pure model.
Counters cannot say *which* packet; this log can: for every packet the queue decides it
keeps (seq, digest, service, verdict), the digest being clustercore.capture.packet_digest
of the IP bytes. A HOLD is resolved later by the migration code calling accept() / drop()
on the handle; the handle is wrapped so that those calls append a resolution entry
(seq, -, -, "accept"|"drop", of=seq of the hold). get_payload() on a held packet means its
bytes are being handed to the destination, which re-injects them on `lo` (past the queue):
it is logged as "handover".

Off unless asked (`start` with a time to live, renewed by every request), so the data
path pays nothing when nobody replays; bounded (a deque), so a forgotten replay costs a
few MB at most. Packets decided in the kernel (the fast path) never reach this log: a
replay must look at the node's datapath and say so.
"""

from __future__ import annotations

import time
from collections import deque

from clustercore.capture import packet_digest
from clustercore.errors import LocalControlError

MAX_ENTRIES = 65536
DEFAULT_TTL_S = 120.0
MAX_PAGE = 5000


class _LoggedHandle:
    """A netfilterqueue packet whose later verdict is also written to the log."""

    __slots__ = ("_pkt", "_log", "_seq")

    def __init__(self, pkt, log: "VerdictLog", seq: int) -> None:
        self._pkt, self._log, self._seq = pkt, log, seq

    def accept(self):
        self._log.resolve(self._seq, "accept")
        return self._pkt.accept()

    def drop(self):
        self._log.resolve(self._seq, "drop")
        return self._pkt.drop()

    def get_payload(self):
        self._log.resolve(self._seq, "handover")
        return self._pkt.get_payload()

    def __getattr__(self, name):
        return getattr(self._pkt, name)


class VerdictLog:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: deque[list] = deque(maxlen=max_entries)
        self._seq = 0
        self._until = 0.0

    def active(self) -> bool:
        return self._until > 0.0 and time.monotonic() < self._until

    def decide(self, node_filter, data: bytes, epoch, handle, now):
        """NodeFilter.decide, logged. Returns the verdict, like NodeAgent.decide."""
        self._seq += 1
        seq = self._seq
        wrapped = _LoggedHandle(handle, self, seq) if handle is not None else None
        d = node_filter.decide(data, epoch, wrapped, now)
        self._entries.append([seq, packet_digest(data), d.service, d.verdict.value, None])
        return d.verdict

    def resolve(self, of: int, verdict: str) -> None:
        self._seq += 1
        self._entries.append([self._seq, None, None, verdict, of])

    def request(self, msg) -> dict:
        """The agent's NodeVerdicts request (clustercore.messages): action start | read | stop."""
        action = msg.action
        ttl = DEFAULT_TTL_S if msg.ttl is None else msg.ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 3600:
            raise LocalControlError(f"verdicts: ttl must be seconds in (0, 3600], got {ttl!r}")
        if action == "start":
            self._until = time.monotonic() + ttl
            return {"seq": self._seq, "active": True}
        if action == "stop":
            self._until = 0.0
            return {"seq": self._seq, "active": False}
        if action != "read":
            raise LocalControlError(f"verdicts: unknown action {action!r} (start, read, stop)")
        since, limit = msg.since, MAX_PAGE if msg.limit is None else msg.limit
        if type(since) is not int or since < 0 or type(limit) is not int or not 0 < limit <= MAX_PAGE:
            raise LocalControlError("verdicts: since must be an int >= 0 and limit an int in 1..5000")
        if self.active():
            self._until = max(self._until, time.monotonic() + ttl)
        oldest = self._entries[0][0] if self._entries else self._seq + 1
        page = [e for e in self._entries if e[0] > since][:limit]
        return {"seq": self._seq, "active": self.active(), "entries": page,
                "more": bool(page) and page[-1][0] < self._seq,
                "overflowed": since + 1 < oldest}  # entries after `since` were pushed out
