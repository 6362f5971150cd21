"""Follow the gateway's MAC: the agent's session moves with the floating gateway address.

With two gateways (issue 11) the agents' gateway address floats between the boxes
(keepalived). When the standby takes it, it sends a gratuitous ARP and the node's
neighbour entry for that address changes MAC. The session to the old box is dead from
that moment (its segments go to a box that no longer has the address, and TCP's
retransmission back-off would take seconds to notice), so the agent drops it at once and
logs in to the new master: within a fraction of a second of the move instead of the 5-6 s
measured without this.

The neighbour table is read from /proc/net/arp (the node's own namespace) every
POLL_S: a small file, and no kernel library for it.
"""

from __future__ import annotations

import asyncio
from typing import Callable

PROC_ARP = "/proc/net/arp"
POLL_S = 0.05
ATF_COM = 0x2  # a complete entry


def gateway_mac(arp_table: str, address: str) -> str | None:
    """The MAC of `address` in /proc/net/arp's text, if its entry is complete."""
    for line in arp_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6 or fields[0] != address:
            continue
        try:
            flags = int(fields[2], 16)
        except ValueError:
            continue
        mac = fields[3].lower()
        if flags & ATF_COM and mac != "00:00:00:00:00:00":
            return mac
    return None


def read_mac(address: str) -> str | None:
    try:
        with open(PROC_ARP) as f:
            return gateway_mac(f.read(), address)
    except OSError:
        return None


async def watch(address: str, moved: Callable[[str, str], None], poll_s: float = POLL_S) -> None:
    """Call moved(old_mac, new_mac) once when the MAC of `address` changes, then return."""
    last = read_mac(address)
    while True:
        await asyncio.sleep(poll_s)
        mac = read_mac(address)
        if mac is None:
            continue
        if last is not None and mac != last:
            moved(last, mac)
            return
        last = mac
