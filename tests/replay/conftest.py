"""Replay tests: captures through the pure in-memory cluster. No root, no kernel."""

import glob
import os

import pytest

from vipctl import replay as rp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CAPTURES = os.path.join(ROOT, "captures")
CAPTURE_FILES = sorted(glob.glob(os.path.join(CAPTURES, "*.pcap")) + glob.glob(os.path.join(CAPTURES, "*.pcapng")))


def capture(name: str) -> str:
    return next(p for p in CAPTURE_FILES if os.path.splitext(os.path.basename(p))[0] == name)


_loaded: dict[str, rp.Loaded] = {}


def loaded(path: str) -> rp.Loaded:
    """Captures are read once per test session (they do not change)."""
    if path not in _loaded:
        _loaded[path] = rp.load(path)
    return _loaded[path]


@pytest.fixture(params=CAPTURE_FILES, ids=lambda p: os.path.basename(p))
def each_capture(request):
    return request.param
