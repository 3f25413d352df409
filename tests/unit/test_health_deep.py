"""--deep's schedule (a constant number of rounds) and its judge (a node is named only when
every pair it is in is slow)."""

from __future__ import annotations

import pytest

from ddpfleet.health.deep import Pair, judge, ring_rounds
from ddpfleet.health.judge import FAIL, PASS


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 31, 32])
def test_every_node_meets_two_partners_in_at_most_three_rounds(n: int) -> None:
    names = [f"node{i}" for i in range(n)]
    rounds = ring_rounds(names)
    assert len(rounds) <= 3 and (n % 2 or len(rounds) <= 2)
    for r in rounds:  # disjoint pairs: a node is in one pair a round
        members = [x for pair in r for x in pair]
        assert len(members) == len(set(members))
    pairs = [pair for r in rounds for pair in r]
    for name in names:
        partners = {b if a == name else a for a, b in pairs if name in (a, b)}
        assert len(partners) == min(2, n - 1)


def test_a_single_node_has_no_pair() -> None:
    assert ring_rounds(["node0"]) == []


def ring(speeds: dict[tuple[str, str], float]) -> list[Pair]:
    return [Pair(a, b, bw) for (a, b), bw in speeds.items()]


def verdicts(rows) -> dict[str, str]:
    return {c.node: c.verdict for c in rows}


def test_a_slow_node_is_named_and_no_other() -> None:
    pairs = ring({("n0", "n1"): 2.0, ("n1", "n2"): 0.01, ("n2", "n3"): 0.01, ("n3", "n0"): 2.1})
    assert verdicts(judge(pairs, {})) == {"n0": PASS, "n1": PASS, "n2": FAIL, "n3": PASS}


def test_a_slow_node_of_three_is_named() -> None:
    pairs = ring({("n0", "n1"): 2.0, ("n1", "n2"): 0.01, ("n2", "n0"): 0.01})
    assert verdicts(judge(pairs, {})) == {"n0": PASS, "n1": PASS, "n2": FAIL}


def test_healthy_noise_names_nobody() -> None:
    pairs = ring({("n0", "n1"): 2.0, ("n1", "n2"): 1.5, ("n2", "n0"): 2.4})
    assert set(verdicts(judge(pairs, {})).values()) == {PASS}


def test_the_inventory_floor_wins_over_the_median() -> None:
    pairs = ring({("n0", "n1"): 2.0, ("n1", "n2"): 2.0, ("n2", "n0"): 2.0})
    rows = judge(pairs, {"busbw_gbps": 5})
    assert set(verdicts(rows).values()) == {FAIL}
    assert "floor 5 GB/s" in rows[0].value


def test_two_nodes_below_the_floor_both_fail_none_by_median() -> None:
    assert set(verdicts(judge(ring({("a", "b"): 0.1}), {})).values()) == {PASS}
    assert set(verdicts(judge(ring({("a", "b"): 0.1}), {"busbw_gbps": 1})).values()) == {FAIL}


def test_a_failed_pair_gives_its_reason() -> None:
    pairs = [Pair("a", "b", None, "a: all_reduce failed: Connection refused"),
             Pair("b", "c", 2.0), Pair("c", "a", None, "a: all_reduce failed: Connection refused")]  # fmt: skip
    rows = {c.node: c for c in judge(pairs, {})}
    assert rows["a"].verdict == FAIL and "Connection refused" in rows["a"].fix
    assert rows["b"].verdict == PASS and rows["c"].verdict == PASS
