"""clustercore: the pure heart of vipcluster, shared by the gateway and the node shim.

Nothing in this package touches a socket, a clock, a file or the kernel. Time is always
an argument (`now`, seconds as a float), bytes come in and decisions go out.

Vocabulary
----------
VIP        the one virtual IP address that fronts the cluster.
node       a machine behind the gateway running a shim and services.
service    a named process with TCP/UDP sockets on VIP:port; owned by exactly one node.
flow       a 5-tuple (proto, src, sport, dst, dport) seen in a packet to the VIP.
verdict    what a node's shim does with a packet: ACCEPT, DROP or HOLD.
epoch      a tag the gateway writes into the source MAC of every copy it delivers for a
           service; both nodes of a migration see the same tag, which makes the
           cutover exact (see clustercore.cutover).
"""
