"""The stop window (source stopped -> destination serving) from reply times and the agents'
own step timing: a quiet service's move costs its stop window even when no packet was held."""

from clustercore.stopwindow import stop_window_ms


def test_handoff_stopped_before_its_sockets_were_taken():
    # freeze reply at 10.000 s: frozen 4 ms before it, the sockets taken in the 1 ms before
    # that (the service had stopped then); release reply at 10.020 s
    timing = {"take_sockets": 1.0, "dump": 2.0, "encode": 0.5, "frozen_to_reply": 4.0}
    assert stop_window_ms(10.000, timing, 10.020) == 25.0


def test_handoff_counts_its_fd_store_hand_over():
    # the handoff's freeze names the time before its cutover froze `hand_over` (the program
    # storing its sockets and stopping): the service had stopped 30 ms before the freeze
    timing = {"hand_over": 30.0, "dump": 2.0, "encode": 0.5, "frozen_to_reply": 4.0}
    assert stop_window_ms(10.000, timing, 10.020) == 54.0


def test_process_strategy_counts_from_the_end_of_its_stop():
    timing = {"stop": 3.0, "drain": 1.0, "dump": 50.0, "frozen_to_reply": 60.0}
    assert stop_window_ms(5.000, timing, 5.100) == 157.0


def test_a_quiet_service_still_has_a_window():
    assert stop_window_ms(1.0, {}, 1.0125) == 12.5


def test_missing_replies_or_garbage_timing():
    assert stop_window_ms(None, {}, 2.0) is None and stop_window_ms(1.0, {}, None) is None
    assert stop_window_ms(1.0, {"frozen_to_reply": "x", "take_sockets": -5, "stop": True}, 1.01) == 10.0
    assert stop_window_ms(1.0, None, 0.5) == 0.0  # clocks never make it negative
