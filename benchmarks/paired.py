"""Paired ratios: each round of a server compared with the baseline rounds beside it. A shared
machine drifts by tens of percent within a minute, so rounds are alternated and each is
compared with its neighbours rather than with the baseline's overall median."""

from __future__ import annotations

import statistics


def paired_ratios(in_order: list[tuple[str, float]], baseline: str) -> dict[str, list[float]]:
    """Per server, each of its rounds' value over the mean of the nearest `baseline` rounds
    before and after it (one of them for a round at either end), from (server, value) pairs in
    the order the rounds ran."""
    ratios: dict[str, list[float]] = {}
    for index, (name, value) in enumerate(in_order):
        if name == baseline:
            continue
        before = next((other_value for other, other_value in reversed(in_order[:index])
                       if other == baseline), None)
        after = next((other_value for other, other_value in in_order[index + 1:]
                      if other == baseline), None)
        beside = [other_value for other_value in (before, after) if other_value is not None]
        ratios.setdefault(name, []).append(value / statistics.mean(beside))
    return ratios
