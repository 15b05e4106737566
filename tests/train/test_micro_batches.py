"""Token-budget micro-batches (``sr1.train.batch.micro_batches``) against a brute force over
every split of the length-ordered rows, on batches collated from real token ids."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from sr1.rollout.types import Trajectory
from sr1.train.batch import collate, length_order, micro_batches, padded_tokens


def _batch(lengths: list[tuple[int, int]]):
    """A collated batch whose rows have the given (prompt, response) token counts."""
    trajs = [
        Trajectory(
            id=str(i),
            question="q",
            golden_answers=["a"],
            data_source="nq",
            prompt="p",
            prompt_ids=[5] * p,
            response_ids=[7] * r,
            loss_mask=[1] * r,
            logprobs=[-1.0] * r,
            group=i,
        )
        for i, (p, r) in enumerate(lengths)
    ]
    return collate(trajs, pad_id=0)


def _splits(n: int):
    """Every way to cut ``range(n)`` into consecutive non-empty runs, as boundary lists."""
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            yield [0, *cuts, n]


def _cost(batch, groups) -> int:
    return sum(padded_tokens(batch.select(g)) for g in groups)


def test_no_budget_gives_length_ordered_chunks_as_before():
    b = _batch([(10, 5), (12, 40), (9, 22), (11, 3), (10, 30)])
    idx = torch.tensor([4, 0, 2, 1, 3])
    got = micro_batches(b, idx, max_rows=2)
    want = length_order(b, idx).split(2)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


@pytest.mark.parametrize("seed", range(6))
def test_budget_split_is_the_fewest_groups_then_least_padding(seed):
    """Each group fits the budget and the row cap (a lone over-long row excepted), every row
    is in exactly one, and no split of the ordered rows has fewer groups, or as few and less
    padding (the cost counted by ``padded_tokens``, what the forward computes)."""
    rng = random.Random(seed)
    lengths = [(rng.randint(20, 40), rng.choice([3, 8, 60, 120, 300])) for _ in range(9)]
    b = _batch(lengths)
    idx = torch.arange(len(lengths))
    budget, rows = rng.choice([300, 700, 1500]), rng.choice([2, 4, 9])
    got = micro_batches(b, idx, max_rows=rows, max_tokens=budget)
    assert sorted(torch.cat(got).tolist()) == list(range(len(lengths)))
    for g in got:
        assert len(g) <= rows
        assert len(g) == 1 or padded_tokens(b.select(g)) <= budget
    order = length_order(b, idx)
    best = None
    for bounds in _splits(len(order)):
        groups = [order[a:z] for a, z in zip(bounds, bounds[1:], strict=False)]
        if any(
            len(g) > rows or (len(g) > 1 and padded_tokens(b.select(g)) > budget) for g in groups
        ):
            continue
        key = (len(groups), _cost(b, groups))
        best = key if best is None or key < best else best
    assert (len(got), _cost(b, got)) == best
    # the budget pays off against fixed chunks of the same row cap when lengths vary
    assert _cost(b, got) <= _cost(b, micro_batches(b, idx, max_rows=rows)) or len(got) < len(
        micro_batches(b, idx, max_rows=rows)
    )


def test_exact_group_count_for_ranks_that_must_match():
    b = _batch([(30, 300), (30, 290), (30, 20), (30, 10), (30, 8), (30, 5)])
    idx = torch.arange(6)
    fewest = micro_batches(b, idx, max_rows=6, max_tokens=1000)
    assert [len(g) for g in fewest] == [2, 4]  # the two long rows apart from the four short
    three = micro_batches(b, idx, max_rows=6, max_tokens=1000, n_groups=3)
    assert len(three) == 3 and sorted(torch.cat(three).tolist()) == list(range(6))
    # of the 3-group splits, the least padding: the long pair split or the short four split
    order = length_order(b, idx)
    costs = [
        _cost(b, [order[a:z] for a, z in zip(bd, bd[1:], strict=False)])
        for bd in _splits(6)
        if len(bd) == 4
        and all(
            (z - a) == 1 or padded_tokens(b.select(order[a:z])) <= 1000
            for a, z in zip(bd, bd[1:], strict=False)
        )
    ]
    assert _cost(b, three) == min(costs)
    with pytest.raises(ValueError, match="cannot split"):
        micro_batches(b, idx, max_rows=2, max_tokens=1000, n_groups=2)


def test_a_row_longer_than_the_budget_runs_alone():
    b = _batch([(30, 900), (30, 10), (30, 12)])
    got = micro_batches(b, torch.arange(3), max_rows=8, max_tokens=200)
    assert [g.tolist() for g in got] == [[0], [2, 1]]
