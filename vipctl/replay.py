"""`vipctl replay`: a packet capture said again to the cluster, three ways, one oracle.

    pure      no root: every packet to the VIP, with its capture timestamp as `now`, into
              the in-memory cluster (clustercore.sim) - the same delivery, verdict, hold
              and cutover code the daemons run - with migrations at given frame indices
    packets   the running lab: the capture's client-to-VIP packets sent from the client
              namespace, each node's verdicts read back and compared packet by packet
              with the pure model (vipctl.replaylab)
    sessions  the running lab: each TCP session's client byte stream and each UDP
              exchange said again through real sockets, answers compared byte for byte
              with the capture (vipctl.replaylab, vipctl.replayclient)

This module loads the capture and its sidecar (captures/NAME.json: services, first owners,
what a replay must show), runs the pure mode, and builds the one result every mode
returns (`--json`); it checks the sidecar's expectations where they apply. The human
text of a result is `vipctl.render.render_replay`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from clustercore.capture import (DEFAULT_VIP, Capture, MigrateAt, Sidecar, check_services, classify,
                                 parse_migrate_spec, parse_service_spec, sidecar_from_dict)
from clustercore.errors import ConfigError
from clustercore.ownership import Service
from clustercore.sessions import TcpSession, UdpExchange, rebuild
from clustercore.sim import Cluster, MigrationSpec, describe_services

from .pcapio import read_frames

MAX_MISMATCHES = 10


@dataclass
class Loaded:
    path: str
    fmt: str
    capture: Capture
    tcp: list[TcpSession]
    udp: list[UdpExchange]
    sidecar: Sidecar | None


def sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def read_sidecar(path: str) -> Sidecar | None:
    """The capture's sidecar, or None when it has none."""
    side = sidecar_path(path)
    if not os.path.exists(side):
        return None
    try:
        with open(side, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError("(file)", f"cannot read the sidecar: {e.strerror or e}", side) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("(file)", f"not UTF-8 text (byte {e.start})", side) from None
    except json.JSONDecodeError as e:
        raise ConfigError("(file)", f"not valid JSON: {e}", side) from None
    except RecursionError:
        raise ConfigError("(file)", "not valid JSON: nested too deeply", side) from None
    return sidecar_from_dict(data, side)


def load(path: str, vip: str | None = None) -> Loaded:
    sidecar = read_sidecar(path)
    frames, fmt = read_frames(path)
    cap = classify(frames, vip or (sidecar.vip if sidecar else DEFAULT_VIP))
    tcp, udp = rebuild(cap)
    return Loaded(path, fmt, cap, tcp, udp, sidecar)


def setup(loaded: Loaded, service_specs: tuple[str, ...], nodes: int | None) -> tuple[list[str], list[Service]]:
    """Node names and services for the pure model: --service wins over the sidecar."""
    side = loaded.sidecar
    count = nodes or (side.nodes if side else 3)
    names = [f"n{k}" for k in range(1, count + 1)]
    if service_specs:
        services = [parse_service_spec(s) for s in service_specs]
        return names, check_services(services, names, "--service")
    if side is None or not side.services:
        raise ConfigError("--service", f"{loaded.path} has no sidecar ({sidecar_path(loaded.path)}) naming "
                                       "its services: give them with --service NAME=PROTO:PORT[,PROTO:PORT]@NODE")
    return names, check_services(side.services, names, f"services (in {side.source}; or use --nodes)")


def _frame_number(text: str) -> bool:
    """Plain digits 0-9 of a sane length: int() would also take '²' or '٣' (and raise on
    them later), and a 5,000-digit number ends in a ValueError of its own."""
    return text.isascii() and text.isdigit() and len(text) <= 15


def parse_migrations(specs: tuple[str, ...]) -> list[MigrateAt]:
    out = []
    for spec in specs:
        _, _, index = spec.rpartition("@")
        if index and not _frame_number(index):
            raise ConfigError("--migrate", f"malformed '{spec}': INDEX must be a frame number (digits 0-9)")
        out.append(parse_migrate_spec(spec))
    return out


def parse_lags(specs: tuple[str, ...], names: list[str]) -> dict[str, int]:
    """('n2=5',) -> {'n2': 5}: node n2 decides each packet 5 packets after the gateway sent it."""
    out = {}
    for spec in specs:
        node, eq, n = spec.partition("=")
        if not eq or node not in names or not _frame_number(n):
            raise ConfigError("--lag", f"malformed '{spec}': expected NODE=PACKETS with NODE one of {', '.join(names)}")
        out[node] = int(n)
    return out


# ---------------------------------------------------------------- the result


def base_result(loaded: Loaded, mode: str) -> dict:
    cap = loaded.capture
    return {
        "capture": loaded.path, "format": loaded.fmt, "mode": mode, "vip": cap.vip,
        "packets": cap.frames, "vip_packets": len(cap.to_vip), "skipped": cap.skipped_total,
        "skipped_reasons": dict(sorted(cap.skipped.items())),
        "sessions_total": len(loaded.tcp) + len(loaded.udp), "tcp_sessions": len(loaded.tcp),
        "udp_exchanges": len(loaded.udp),
        "sessions_incomplete": sum(1 for s in loaded.tcp if not s.complete)
        + sum(1 for x in loaded.udp if not x.complete),
        "sessions_matched": None,
        "migrations": [], "mismatches": [],
    }


def check_expectations(result: dict, sidecar: Sidecar | None, *, per_node: bool) -> None:
    """Compare with the sidecar's `expect`; mark the result not ok if anything differs."""
    if sidecar is None or not sidecar.expect:
        return
    checks = []
    for key, want in sorted(sidecar.expect.items()):
        if key == "per_node" and not per_node:
            continue
        if key not in result:
            continue
        got = result[key]
        checks.append({"field": key, "want": want, "got": got, "ok": got == want})
    result["expectations"] = checks
    if not all(c["ok"] for c in checks):
        result["ok"] = False
        bad = [c for c in checks if not c["ok"]]
        result["mismatches"] = (result["mismatches"] + [
            {"packet": None, "reason": f"sidecar expects {c['field']} = {c['want']}, the replay gave {c['got']}"}
            for c in bad])[:MAX_MISMATCHES]


def run_pure(loaded: Loaded, names: list[str], services: list[Service], migrations: list[MigrateAt],
             step_gap: int = 3, lag: dict[str, int] | None = None, cluster_options: dict | None = None,
             sidecar_services: bool = True) -> dict:
    cluster = Cluster(names, services, lag=lag or {}, **(cluster_options or {}))
    specs = [MigrationSpec(m.service, m.dest, m.index, gap=step_gap) for m in migrations]
    sim = cluster.run(((p.index, p.data, p.ts) for p in loaded.capture.to_vip), specs)
    r = sim.report
    result = base_result(loaded, "pure")
    result.update({
        "nodes": names, "services": describe_services(services),
        "silenced": sim.silenced, "judged": r.packets, "accepted_once": r.accepted_once,
        "lost": r.lost, "duplicated": r.duplicated,
        "per_node": {n: r.per_node.get(n, 0) for n in names},
        "reordered": len(sim.reordered), "migrations": sim.migrations,
        "mismatches": (r.mismatches + [{"packet": m.get("at"), "reason": f"refused migration: {m['reason']}"}
                                       for m in sim.migrations if m.get("outcome") == "refused"]
                       )[:MAX_MISMATCHES],
        "ok": sim.ok,
    })
    if sim.reordered:
        result["reorders"] = sim.reordered[:MAX_MISMATCHES]
    check_expectations(result, loaded.sidecar,
                       per_node=sidecar_services and not migrations
                       and loaded.sidecar is not None and len(names) == loaded.sidecar.nodes)
    return result
