"""Read and write packet captures (pcap and pcapng) with dpkt: the only file I/O of the
replays. What the frames mean is clustercore.capture's business.

dpkt's own readers stop quietly at a short record; a replay must not judge half a
capture, so the records are walked here (with dpkt's header and block classes) and any
problem becomes one CaptureError naming the file and the byte offset where it starts:
an empty file, an unknown magic number, a truncated file header, record header or packet,
a record that claims more bytes than any capture holds, a pcapng block with a bad length.
"""

from __future__ import annotations

import os
import struct

import dpkt
from dpkt import pcap, pcapng

from clustercore.capture import Frame
from clustercore.errors import CaptureError

MAX_RECORD = 1 << 20  # no link type captures more than this per frame (pcap's limit is 256 KiB)
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D


def read_frames(path: str) -> tuple[list[Frame], str]:
    """All frames of a capture, and its format ('pcap' or 'pcapng')."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CaptureError(path, 0, "no such file") from None
    except IsADirectoryError:
        raise CaptureError(path, 0, "is a directory, not a capture") from None
    except OSError as e:
        raise CaptureError(path, 0, f"cannot be read: {e.strerror}") from None
    if not data:
        raise CaptureError(path, 0, "the file is empty (0 bytes): not a pcap or pcapng capture")
    if len(data) >= 4 and struct.unpack("<I", data[:4])[0] == PCAPNG_SHB:
        return _read_pcapng(path, data), "pcapng"
    return _read_pcap(path, data), "pcap"


def _read_pcap(path: str, data: bytes) -> list[Frame]:
    size = pcap.FileHdr.__hdr_len__
    if len(data) < 4:
        raise CaptureError(path, 0, f"too short for a capture ({len(data)} bytes)")
    magic_be = struct.unpack(">I", data[:4])[0]
    magics = {pcap.TCPDUMP_MAGIC, pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC, pcap.PMUDPCT_MAGIC_NANO}
    if magic_be not in magics:
        raise CaptureError(path, 0, f"unknown magic number 0x{magic_be:08x}: not a pcap or pcapng capture")
    if len(data) < size:
        raise CaptureError(path, len(data), f"truncated file header ({len(data)} of {size} bytes)")
    little = magic_be in (pcap.PMUDPCT_MAGIC, pcap.PMUDPCT_MAGIC_NANO)
    fh = (pcap.LEFileHdr if little else pcap.FileHdr)(data[:size])
    nano = magic_be in (pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC_NANO)
    rec_cls = pcap.LEPktHdr if little else pcap.PktHdr
    divisor = 1e9 if nano else 1e6
    hsize = rec_cls.__hdr_len__
    frames: list[Frame] = []
    off = size
    while off < len(data):
        if len(data) - off < hsize:
            raise CaptureError(path, off, f"truncated record header ({len(data) - off} of {hsize} bytes) "
                                          f"after {len(frames)} frames")
        hdr = rec_cls(data[off:off + hsize])
        if hdr.caplen > MAX_RECORD or (fh.snaplen and hdr.caplen > max(fh.snaplen, 65535)):
            raise CaptureError(path, off, f"corrupt record header: it claims {hdr.caplen} captured bytes "
                                          f"(snaplen {fh.snaplen}) after {len(frames)} frames")
        start = off + hsize
        if len(data) - start < hdr.caplen:
            raise CaptureError(path, off, f"truncated record: {len(data) - start} of {hdr.caplen} "
                                          f"bytes after {len(frames)} frames")
        frames.append(Frame(len(frames), hdr.tv_sec + hdr.tv_usec / divisor, fh.linktype,
                            data[start:start + hdr.caplen], max(hdr.len, hdr.caplen), off))
        off = start + hdr.caplen
    return frames


def _read_pcapng(path: str, data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    interfaces: list[tuple[int, float, int]] = []  # (linktype, divisor, ts offset) per IDB
    little = True
    off = 0
    while off < len(data):
        if len(data) - off < 12:
            raise CaptureError(path, off, f"truncated block header ({len(data) - off} bytes) "
                                          f"after {len(frames)} frames")
        btype = struct.unpack("<I", data[off:off + 4])[0]
        if btype == PCAPNG_SHB:  # a section header says the byte order of its section
            bom = struct.unpack("<I", data[off + 8:off + 12])[0]
            if bom == PCAPNG_BOM:
                little = True
            elif struct.unpack(">I", data[off + 8:off + 12])[0] == PCAPNG_BOM:
                little = False
            else:
                raise CaptureError(path, off + 8, "corrupt section header: bad byte-order magic")
            interfaces = []
        fmt = "<II" if little else ">II"
        btype, blen = struct.unpack(fmt, data[off:off + 8])
        if blen < 12 or blen % 4 or blen > MAX_RECORD + 64:
            raise CaptureError(path, off, f"corrupt block: length {blen} is not a plausible pcapng "
                                          f"block length (after {len(frames)} frames)")
        if len(data) - off < blen:
            raise CaptureError(path, off, f"truncated block: {len(data) - off} of {blen} bytes "
                                          f"after {len(frames)} frames")
        block = data[off:off + blen]
        if struct.unpack(fmt[0] + "I", block[-4:])[0] != blen:
            raise CaptureError(path, off + blen - 4, "corrupt block: its trailing length differs from its header")
        try:
            if btype == pcapng.PCAPNG_BT_IDB:
                idb = (pcapng.InterfaceDescriptionBlockLE if little else pcapng.InterfaceDescriptionBlock)(block)
                divisor, tsoff = 1e6, 0
                for opt in idb.opts:
                    if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL:
                        v = opt.data[0]
                        divisor = float((2 if v & 0x80 else 10) ** (v & 0x7F))
                    elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET:
                        tsoff = struct.unpack(fmt[0] + "q", opt.data[:8])[0]
                interfaces.append((idb.linktype, divisor, tsoff))
            elif btype == pcapng.PCAPNG_BT_EPB:
                epb = (pcapng.EnhancedPacketBlockLE if little else pcapng.EnhancedPacketBlock)(block)
                if epb.iface_id >= len(interfaces):
                    raise CaptureError(path, off, f"packet block names interface {epb.iface_id}, "
                                                  f"which no interface block described")
                linktype, divisor, tsoff = interfaces[epb.iface_id]
                ts = tsoff + ((epb.ts_high << 32) | epb.ts_low) / divisor
                payload = bytes(epb.pkt_data)[:epb.caplen]
                if len(payload) < epb.caplen:
                    raise CaptureError(path, off, f"truncated packet block: {len(payload)} of {epb.caplen} bytes")
                frames.append(Frame(len(frames), ts, linktype, payload, max(epb.pkt_len, epb.caplen), off))
            elif btype == 3:  # simple packet block: interface 0, no timestamp
                if not interfaces:
                    raise CaptureError(path, off, "packet block before any interface block")
                wire = struct.unpack(fmt[0] + "I", block[8:12])[0]
                payload = block[12:12 + min(wire, blen - 16)]
                frames.append(Frame(len(frames), 0.0, interfaces[0][0], payload, wire, off))
        except (dpkt.UnpackError, dpkt.NeedData, struct.error, IndexError) as e:
            raise CaptureError(path, off, f"corrupt block of type 0x{btype:x}: {e}") from None
        off += blen
    if not interfaces and not frames:
        raise CaptureError(path, off, "no interface description block: not a usable pcapng capture")
    return frames


def write_pcapng(path: str, frames: list[Frame], linktype: int) -> None:
    """Write frames as pcapng (tcpdump writes pcap only; the captures keep one of each)."""
    with open(path + ".tmp", "wb") as f:
        w = pcapng.Writer(f, linktype=linktype, snaplen=262144)
        for fr in frames:
            w.writepkt(fr.data, ts=fr.ts)
    os.replace(path + ".tmp", path)
