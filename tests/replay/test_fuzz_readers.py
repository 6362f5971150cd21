"""Fuzzing the file readers (issue 10): any bytes give frames or one CaptureError / ConfigError,
never another exception. Bounded: a few hundred examples each, a few seconds in all.

- the pcap/pcapng reader (vipctl.pcapio) on random bytes and on real captures with
  flipped bytes, truncated, or with a header field rewritten; whatever it returns is then
  classified (clustercore.capture) without an exception;
- the capture sidecar (vipctl.replay.read_sidecar -> clustercore.capture.sidecar_from_dict)
  on random bytes and on any JSON value.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustercore.capture import Sidecar, classify, sidecar_from_dict
from clustercore.errors import CaptureError, ConfigError
from vipctl import replay as rp
from vipctl.pcapio import read_frames

from .conftest import ROOT

CAPTURES = os.path.join(ROOT, "captures")
SEEDS = {name: open(os.path.join(CAPTURES, name), "rb").read()[:64 * 1024]
         for name in sorted(os.listdir(CAPTURES)) if name.endswith((".pcap", ".pcapng"))}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PCAP_MAGIC = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
PCAPNG_START = struct.pack("<III", 0x0A0D0D0A, 28, 0x1A2B3C4D)


def _read(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.pcap")
        with open(path, "wb") as f:
            f.write(data)
        try:
            frames, fmt = read_frames(path)
        except CaptureError as e:
            assert path in str(e)
            return None
    assert fmt in ("pcap", "pcapng")
    classify(frames)  # never raises on packet bytes
    return frames


@FUZZ
@given(st.one_of(st.binary(max_size=2048),
                 st.binary(max_size=2048).map(lambda b: PCAP_MAGIC + b),
                 st.binary(max_size=2048).map(lambda b: PCAPNG_START + b)))
def test_the_capture_reader_is_total_on_any_bytes(data):
    _read(data)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_the_capture_reader_is_total_on_damaged_real_captures(seed, data):
    raw = bytearray(SEEDS[seed])
    how = data.draw(st.sampled_from(["flip", "truncate", "word"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:  # a length or count field rewritten to an extreme
        i = data.draw(st.integers(0, max(0, len(raw) - 4)))
        raw[i:i + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20])))
    _read(bytes(raw))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                    max_leaves=30)
SIDECAR_KEYS = ["nodes", "vip", "services", "migrations", "covers", "expect", "name", "owner", "ports",
                "service", "to", "index"]


@FUZZ
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(SIDECAR_KEYS), JSON, max_size=6)))
def test_the_sidecar_decoder_is_total_on_any_json(value):
    try:
        assert isinstance(sidecar_from_dict(value), Sidecar)
    except ConfigError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=512), JSON.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 5000).map(lambda n: b"[" * n)))
def test_the_sidecar_reader_is_total_on_any_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.pcap")
        with open(rp.sidecar_path(path), "wb") as f:
            f.write(raw)
        try:
            assert isinstance(rp.read_sidecar(path), Sidecar)
        except ConfigError as e:
            assert "c.json" in str(e)
