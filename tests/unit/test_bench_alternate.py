"""vipctl.bench.alternate and paired_ratios: the rows are measured in rotating order, and
a row's ratio pairs each round with the same round's baseline."""

from vipctl.bench import alternate, paired_ratios


class FakeIperf:
    """Answers from a shared clock: each measurement is one tick; a slow spell (ticks
    4-7) halves whatever is measured then."""

    def __init__(self, name: str, speed: float, clock: list, seen: list) -> None:
        self.name, self.speed, self.clock, self.seen = name, speed, clock, seen

    def _tick(self, kind: str) -> float:
        t = self.clock[0]
        self.clock[0] += 1
        self.seen.append((kind, self.name))
        return self.speed * (0.5 if 4 <= t < 8 else 1.0)

    def udp_pps(self, seconds: float) -> float:
        return self._tick("pps")

    def tcp_mbps(self, seconds: float) -> float:
        return self._tick("tcp")


def test_rows_rotate_and_ratios_pair_rounds():
    clock, seen = [0], []
    rows = {"baseline": FakeIperf("baseline", 100.0, clock, seen), "mode": FakeIperf("mode", 90.0, clock, seen)}
    out = alternate(rows, 3, 1.0)
    # round k starts at row k: baseline first, then the mode first, then baseline again
    assert seen[:4] == [("pps", "baseline"), ("pps", "mode"), ("tcp", "baseline"), ("tcp", "mode")]
    assert seen[4:8] == [("pps", "mode"), ("pps", "baseline"), ("tcp", "mode"), ("tcp", "baseline")]
    assert len(out["mode"]["pps"]) == len(out["baseline"]["tcp"]) == 3
    r = paired_ratios(out["mode"], out["baseline"])
    # the slow spell fell on both rows of round 2: the paired ratio stays 0.9 every round
    assert r["pps"]["ratio_median"] == 0.9 and r["pps"]["ratio_range"] == [0.9, 0.9]
    assert r["tcp"]["ratio_median"] == 0.9


def test_a_round_without_a_figure_is_left_out_of_the_pairs():
    base = {"pps": [100.0, None, 100.0], "tcp": [10.0, 10.0, None]}
    row = {"pps": [50.0, 80.0, 70.0], "tcp": [None, 9.0, 8.0]}
    r = paired_ratios(row, base)
    assert r["pps"]["ratio_range"] == [0.5, 0.7] and r["pps"]["ratio_median"] == 0.6
    assert r["tcp"]["ratio_median"] == 0.9 and r["tcp"]["ratio_range"] == [0.9, 0.9]
    assert r["pps"]["median_ratio"] == round(70.0 / 100.0, 3)
