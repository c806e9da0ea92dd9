"""Secure aggregation's arithmetic (:mod:`fedrank.secure`): for every method that qualifies, its own rule on
the one update read from the weighted mean of the clients' contributions equals its rule on the individual
updates; every other method says why it is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedrank.aggregation import METHODS, make_method
from fedrank.aggregation.base import MethodOptions
from fedrank.secure import (
    add_client_noise,
    contribution,
    contribution_numel,
    fixed_denominators,
    mean_update,
    min_contributors,
    secure_mean_of,
)
from fedrank.types import ClientSpec
from helpers import trained_update

SHAPES = {"q": (12, 10), "v": (7, 9)}
QUALIFY = sorted(name for name, cls in METHODS.items() if secure_mean_of(cls()) is not None)


def test_the_qualifying_methods_are_the_weighted_means_of_rank_indexed_factors() -> None:
    assert QUALIFY == ["fedit", "fedplora", "ffa", "fslora", "replication", "rolora"]
    for name in sorted(set(METHODS) - set(QUALIFY)):
        reason = METHODS[name].secure_refused
        assert reason and reason != MethodOptions.secure_refused, name  # each says its own reason
    assert secure_mean_of(make_method("fslora", rank=8, normalize="holders")) == "holders"
    assert secure_mean_of(make_method("fslora", rank=8)) == "weights"


def flat(state: Any) -> torch.Tensor:
    return torch.cat([torch.cat([f.B.flatten(), f.A.flatten()]) for _, f in sorted(state.factors.items())])


def weighted_mean(parts: list[list[torch.Tensor]], w: list[float]) -> list[torch.Tensor]:
    total = sum(w)
    return [sum(wk * p[i] for wk, p in zip(w, parts, strict=True)) / total for i in range(len(parts[0]))]


@pytest.mark.parametrize("name", QUALIFY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rule_on_the_secure_mean_equals_the_rule_on_the_updates(name: str, seed: int) -> None:
    R = 8
    method = make_method(name, rank=R) if name == "fslora" else make_method(name)
    state = method.init_state(SHAPES, R)
    g = torch.Generator().manual_seed(seed)
    ranks = [R, R, R] if name == "fedit" else [2, 4, 8]
    weights = [3.0, 1.0, 5.0 + seed]
    for t in range(2):  # RoLoRA trains B, then A
        specs = [ClientSpec(k, r, int(w)) for k, (r, w) in enumerate(zip(ranks, weights, strict=True))]
        sent = [method.dispatch(state, s, t) for s in specs]
        updates = [trained_update(a, s, g, scale=0.1) for a, s in zip(sent, specs, strict=True)]
        parts = [contribution(u, a, R) for u, a in zip(updates, sent, strict=True)]
        a0 = sent[0]
        assert {tuple(p.shape) for p in parts[0]} == {tuple(p.shape) for p in parts[2]}  # same shapes for all
        assert sum(p.numel() for p in parts[0]) == contribution_numel(SHAPES, R, a0.train_A, a0.train_B)
        one = mean_update(method, state, weighted_mean(parts, weights), a0.train_A, a0.train_B, len(updates))
        want = method.aggregate(state, updates, weights)
        got = method.aggregate(state, [one], [1.0])
        assert torch.allclose(flat(got), flat(want), atol=1e-6), name
        state = want


def test_an_unheld_index_keeps_its_value_and_a_held_one_moves_by_its_holders_mean() -> None:
    method = make_method("replication")
    state = method.init_state(SHAPES, 8)
    g = torch.Generator().manual_seed(0)
    specs = [ClientSpec(0, 2, 1), ClientSpec(1, 4, 3)]
    sent = [method.dispatch(state, s, 0) for s in specs]
    updates = [trained_update(a, s, g) for a, s in zip(sent, specs, strict=True)]
    mean = weighted_mean([contribution(u, a, 8) for u, a in zip(updates, sent, strict=True)], [1.0, 3.0])
    assert mean[-1].tolist() == [1.0, 1.0, 0.75, 0.75, 0, 0, 0, 0]  # h̄_i: the holders' share of the weight
    one = mean_update(method, state, mean, True, True, 2)
    q, q0 = one.factors["q"], state.factors["q"]
    assert torch.equal(q.B[:, 4:], q0.B[:, 4:]) and torch.equal(q.A[4:], q0.A[4:])
    assert torch.allclose(q.A[2:4], updates[1].factors["q"].A[2:4], atol=1e-6)  # only client 1 held 2..3


def test_a_mean_of_the_wrong_shapes_is_refused() -> None:
    method = make_method("fedit")
    state = method.init_state(SHAPES, 4)
    with pytest.raises(ValueError, match="expected 5"):
        mean_update(method, state, [torch.zeros(4)], True, True, 2)
    bad = [torch.zeros(12, 4), torch.zeros(4, 10), torch.zeros(7, 3), torch.zeros(4, 9), torch.zeros(4)]
    with pytest.raises(ValueError, match="layer v"):
        mean_update(method, state, bad, True, True, 2)
    with pytest.raises(ValueError, match="no secure aggregation"):
        mean_update(make_method("hetlora"), state, bad, True, True, 2)


# ------------------------------------------------------------------ distributed DP
@pytest.mark.parametrize(
    ("n", "shares", "threshold", "t"), [(3, 1.0, 0.5, 2), (5, 1.0, 0.5, 2), (4, 1.0, 0.75, 3), (10, 0.5, 0.6, 3)]
)
def test_the_fewest_contributors_follow_flwrs_arithmetic(n: int, shares: float, threshold: float, t: int) -> None:
    """flwr 1.42: num_shares = round(shares·n), made odd below n, n when <= 2; threshold = max(2, round(·))."""
    assert min_contributors(n, shares, threshold) == t


def test_client_noise_has_the_stated_std_and_spares_the_holder_flags() -> None:
    parts = [torch.zeros(300, 200), torch.zeros(8)]
    parts[1][:3] = 1.0
    noisy = add_client_noise(parts, 0.25, torch.Generator().manual_seed(0))
    assert float(noisy[0].std()) == pytest.approx(0.25, rel=0.02) and abs(float(noisy[0].mean())) < 0.005
    assert torch.equal(noisy[1], parts[1])


def test_fixed_denominators_count_every_dispatched_client() -> None:
    """Two of three dispatched clients in the sum: the changes are re-read over K = 3 and the holder shares
    come from the dispatch, so a failed client counts with no change, as in the central mechanism."""
    method = make_method("replication")
    state = method.init_state(SHAPES, 8)
    dispatched = [method.dispatch(state, ClientSpec(k, r, 1), 0) for k, r in enumerate([2, 4, 8])]
    mean = [torch.full((12, 8), 3.0), torch.full((8,), 0.5)]
    out = fixed_denominators(mean, 2, dispatched)
    assert torch.equal(out[0], torch.full((12, 8), 2.0))
    assert out[1].tolist() == pytest.approx([1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3])
