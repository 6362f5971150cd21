"""A migration's stop window: from the source's service stopping to the destination
serving, so that a quiet service's move (no packet held: freeze_ms 0.0) is never reported
as costing nothing.

Measured on the gateway's clock, with the agents' own durations (their step timing, clock
independent) taken off the reply times:
- stopped: the source's freeze reply arrived `frozen_to_reply` ms after its cutover froze;
  the service had stopped `hand_over` ms before that (handoff: the fd-store hand-over and
  the wait for half-open handshakes come first; `take_sockets`, its name before the fd
  store, is read too), or `stop` ms after it began stopping (process:
  `frozen_to_reply` counts from the start of the stop);
- serving: the destination's release reply (its gate opened, its instance adopted, within
  the step). One reply's trip is in the figure (well under a millisecond in the lab).
Pure: times in, milliseconds out; None when a reply is missing (nothing to measure).
"""

from __future__ import annotations

from typing import Mapping


def stop_window_ms(freeze_replied_at: float | None, freeze_timing_ms: Mapping[str, object] | None,
                   release_replied_at: float | None) -> float | None:
    if freeze_replied_at is None or release_replied_at is None:
        return None
    t = freeze_timing_ms or {}

    def part(key: str) -> float:
        v = t.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else 0.0

    # the source's freeze: stopped -> reply = frozen_to_reply + hand_over - stop
    # (each strategy reports only the keys that apply to it)
    stopped_to_reply = max(0.0, part("frozen_to_reply") + part("hand_over") + part("take_sockets")
                           - part("stop"))
    stopped_at = freeze_replied_at - stopped_to_reply / 1000.0
    return round(max(0.0, (release_replied_at - stopped_at) * 1000.0), 2)
