"""vipwire: the authenticated, encrypted control transport shared by the gateway, the node agents and
the CLI. It imports neither daemon nor the CLI; the messages it carries are the typed ones
of `clustercore.messages`.

- `framing`  bytes <-> envelopes: JSON lines, bounded, total (any bytes give messages or a
             PeerControlError), request/reply/notification envelopes.
- `rpc`      asyncio request/reply over one stream, dispatch by message type.
- `client`   the CLI's blocking request over the gateway's Unix socket.
- `pki`      the cluster CA and the identities it issues (gateway, node NAME, admin NAME).
- `tls`      TLS 1.3 contexts with mutual certificates, and the peer's verified identity.
- `bpfsys`   bpf(2) and a tiny eBPF assembler: the one kernel helper both daemons' fast
             paths share (gateway.bpf, nodeshim.bpfnode), so neither imports the other.
"""
