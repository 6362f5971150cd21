"""nodeshim.queue.mac_of: the epoch tag a queued packet carries in its source MAC."""

from hypothesis import given
from hypothesis import strategies as st

from nodeshim.queue import mac_of


def test_the_gateways_tag_reads_as_it_is_written():
    assert mac_of(bytes([0x02, 0x76, 0x63, 0x00, 0x00, 0x02, 0x00, 0x00])) == "02:76:63:00:00:02"
    assert mac_of(b"") is None and mac_of(None) is None


@given(st.binary(min_size=1, max_size=8))
def test_the_same_text_as_a_byte_by_byte_format(hw):
    assert mac_of(hw) == ":".join(f"{b:02x}" for b in hw[:6])
