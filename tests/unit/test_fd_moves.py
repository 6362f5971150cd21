"""nodeshim.services.fd_moves: the dup2 steps that put a handed-over instance's sockets at
fds 3.. in place (a parallel move), checked on a simulated fd table."""

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeshim.services import fd_moves


def run(sources, first=3):
    table = {fd: f"S{i}" for i, fd in enumerate(sources)}
    moves, scratch = fd_moves(sources, first)
    for src, dst in moves:
        assert src in table, (src, moves)
        table[dst] = table[src]
    return table, moves, scratch


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_every_source_lands_on_its_slot_with_at_most_one_fd_past_the_range(data):
    n = data.draw(st.integers(1, 60))
    # sources drawn from around the target range, so most of them sit inside it, permuted
    sources = data.draw(st.lists(st.integers(3, 3 + 2 * n), min_size=n, max_size=n, unique=True))
    table, moves, scratch = run(sources)
    assert [table[3 + i] for i in range(n)] == [f"S{i}" for i in range(n)]
    highest = max([dst for _, dst in moves] + [3 + n - 1])
    assert highest <= max(sources + [3 + n])  # no copies past the sources and one scratch
    assert scratch is None or all(scratch != 3 + i for i in range(n))


def test_a_cycle_goes_through_the_scratch_and_a_source_in_place_stays():
    table, moves, scratch = run([4, 3, 5])  # 3 and 4 swap, 5 is in place
    assert [table[3], table[4], table[5]] == ["S0", "S1", "S2"]
    assert scratch == 6 and (5, 5) in moves


def test_ten_thousand_connections_need_no_fd_past_the_range():
    sources = list(range(10_002, 2, -1))  # the worst order: every slot taken by another
    table, moves, scratch = run(sources)
    assert all(table[3 + i] == f"S{i}" for i in range(len(sources)))
    assert max(dst for _, dst in moves) <= 3 + len(sources)


def test_a_restored_copy_s_udp_buffers_are_raised_only_when_it_serves_udp(tmp_path, monkeypatch):
    """raise_udp_buffers looks at every socket of the copy (pidfd copies): for a TCP-only
    service with 1,000 connections that was tens of ms inside the freeze, for nothing."""
    from clustercore.ownership import Service
    from clustercore.packet import TCP, UDP
    from nodeshim import services
    raised = []
    monkeypatch.setattr(services, "raise_udp_buffers", lambda pid: raised.append(pid) or 0)
    monkeypatch.setattr(services, "_copy_output", lambda fd, path, name: None)
    tcp_only = Service("web", "n1", ((TCP, 80),), "nginx", "process", "activation")
    both = Service("dns", "n1", ((TCP, 53), (UDP, 53)), "dnsmasq", "process", "activation")
    services.restored_instance(tcp_only, 4242, -1, str(tmp_path))
    assert raised == []
    services.restored_instance(both, 4343, -1, str(tmp_path))
    assert raised == [4343]
