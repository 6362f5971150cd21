"""A client's view of a gateway failover: numbered UDP datagrams to the VIP's echo at a
fixed rate until a stop file appears; prints one JSON object with the longest time
between two consecutive answers (the gap the client saw), what was sent, answered once,
duplicated and never answered. Runs inside the lab's client namespace; bounded by
--max-s whatever happens."""

import argparse
import json
import os
import socket
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--max-s", type=float, default=300.0)
    a = p.parse_args()
    s = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((a.host, a.port))
    s.setblocking(False)
    answers: dict[int, int] = {}
    arrivals: list[float] = []
    sent = 0
    start = time.monotonic()
    next_send = start
    open(a.ready_file, "w").close()
    stop_at = None
    while True:
        now = time.monotonic()
        if stop_at is None and (os.path.exists(a.stop_file) or now - start > a.max_s):
            stop_at = now + 1.0  # late answers
        if stop_at is not None and now > stop_at:
            break
        if stop_at is None and now >= next_send:
            try:
                s.send(b"gap %d" % sent)
            except OSError:
                pass  # no route for a moment: the datagram is lost like on a wire
            sent += 1
            next_send += a.interval
        try:
            data = s.recv(2048)
            n = int(data.split(b" ")[1])
            answers[n] = answers.get(n, 0) + 1
            arrivals.append(time.monotonic())
        except (BlockingIOError, ConnectionRefusedError):
            time.sleep(0.002)
        except (IndexError, ValueError):
            pass
    gaps = [b - a_ for a_, b in zip(arrivals, arrivals[1:])]
    print(json.dumps({"sent": sent, "answered_once": sum(1 for v in answers.values() if v == 1),
                      "duplicated": sum(1 for v in answers.values() if v > 1),
                      "missing": sum(1 for i in range(sent) if i not in answers),
                      "longest_gap_ms": round(max(gaps) * 1000, 1) if gaps else None}))


if __name__ == "__main__":
    main()
