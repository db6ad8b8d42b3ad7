"""The LOOM step's guard (``keep_if_cheaper``): the total cost never increases, whatever the solver returned.

The exact CPU solver never returns a worse matching, so the couplings' own tests cannot see this guard;
the CUDA auction (within its tolerance) can, so the guard is checked here with matchings made by hand.
"""

import torch

from loom_kernels.couplings.loom.steps import keep_if_cheaper


def _total(cost, col):
    return cost.gather(1, col[:, None]).sum(dtype=torch.float64).item()


def test_a_matching_that_raises_the_cost_is_refused():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17):
        cost = torch.rand(n, n, generator=g)
        worse = torch.roll(torch.arange(n), 1)
        cost.diagonal().sub_(2.0)  # the current pairs (the diagonal) are cheapest: any other matching costs more
        col, stats = keep_if_cheaper(cost, worse)
        assert torch.equal(col, torch.arange(n)), n
        assert stats["swaps"].item() == 0
        pre = cost.diagonal().sum(dtype=torch.float64).item() / n
        assert abs(stats["pre_cost"].item() - pre) < 1e-12 and abs(stats["post_cost"].item() - pre) < 1e-12


def test_a_cheaper_or_equal_matching_is_kept():
    g = torch.Generator().manual_seed(1)
    n = 9
    cost = torch.rand(n, n, generator=g)
    better = torch.randperm(n, generator=g)
    cost.diagonal().add_(3.0)  # the current pairs are dearest: the new matching is cheaper
    col, stats = keep_if_cheaper(cost, better)
    assert torch.equal(col, better)
    assert stats["swaps"].item() == int((better != torch.arange(n)).sum())
    assert abs(stats["post_cost"].item() - _total(cost, better) / n) < 1e-12
    assert stats["post_cost"].item() < stats["pre_cost"].item()
    # a tie keeps the solver's matching (post <= pre)
    tie = torch.ones(n, n)
    col, stats = keep_if_cheaper(tie, better)
    assert torch.equal(col, better) and stats["post_cost"].item() == stats["pre_cost"].item() == 1.0


def test_a_worse_matching_by_one_float_rounding_is_refused():
    """A near-tie (the auction's tolerance): a matching a hair dearer than the current pairs is not taken."""
    cost = torch.tensor([[1.0, 1.0 + 2**-20], [1.0, 1.0]], dtype=torch.float32)
    col, stats = keep_if_cheaper(cost, torch.tensor([1, 0]))
    assert torch.equal(col, torch.tensor([0, 1]))
    assert stats["post_cost"].item() == stats["pre_cost"].item() == 1.0
