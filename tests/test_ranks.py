from __future__ import annotations

from collections import Counter

import pytest

from fedrank.ranks import ModelFootprint, assign_ranks, rank_for_budget, training_bytes

RANKS = [4, 8, 16, 32]


@pytest.mark.parametrize(
    "dist,expected",
    [
        ("uniform", [0.25, 0.25, 0.25, 0.25]),
        ("heavy_tail_weak", [0.8, 0.05, 0.05, 0.1]),  # the official FlexLoRA code's heavy_tail
        ("normal", [0.0575, 0.0575, 0.4425, 0.4425]),  # its normal: pdf at the type index
        ("heavy_tail_strong", [0.05, 0.05, 0.1, 0.8]),
        ("fixed", [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_rank_distributions_have_their_proportions(dist: str, expected: list[float]) -> None:
    ranks = assign_ranks(dist, RANKS, 20_000, seed=0)
    freq = Counter(ranks)
    for r, p in zip(RANKS, expected):
        assert abs(freq[r] / 20_000 - p) < 0.015, (r, freq[r])


def test_normal_puts_most_clients_in_the_middle_and_is_seeded() -> None:
    ranks = assign_ranks("normal", [2, 4, 8, 16, 32], 5000, seed=1)
    freq = Counter(ranks)
    assert freq[8] > freq[4] > freq[2] and freq[8] > freq[16] > freq[32]
    assert ranks == assign_ranks("normal", [2, 4, 8, 16, 32], 5000, seed=1)
    assert ranks != assign_ranks("normal", [2, 4, 8, 16, 32], 5000, seed=2)


def test_bad_inputs_are_errors_listing_choices() -> None:
    with pytest.raises(ValueError, match="choices: uniform, heavy_tail_weak, heavy_tail_strong, normal, fixed, budget"):
        assign_ranks("zipf", RANKS, 3, 0)
    with pytest.raises(ValueError, match="positive"):
        assign_ranks("uniform", [0, 4], 3, 0)


def test_budget_picks_the_largest_rank_that_fits() -> None:
    fp = ModelFootprint(base_params=1_000_000, lora_shapes=((64, 64),) * 10, num_layers=2, hidden=64, seq_len=32)
    need = {r: training_bytes(fp, r) for r in RANKS}
    assert need[4] < need[8] < need[16] < need[32]
    # the formula, term by term
    assert need[8] == 4_000_000 + 16 * 8 * 1280 + int(16.0 * 4 * 32 * 64 * 2) + 4 * 32 * 8 * 10
    assert rank_for_budget(need[16], RANKS, fp) == 16
    assert rank_for_budget(need[16] - 1, RANKS, fp) == 8
    assert rank_for_budget(10**12, RANKS, fp) == 32
    with pytest.raises(ValueError, match="fits no rank"):
        rank_for_budget(need[4] - 1, RANKS, fp)


def test_budget_ranks_follow_each_clients_budget() -> None:
    from fedrank.ranks import budget_ranks

    fp = ModelFootprint(base_params=1_000_000, lora_shapes=((64, 64),) * 10, num_layers=2, hidden=64, seq_len=32)
    mib = {r: training_bytes(fp, r) / 2**20 for r in RANKS}
    budgets = [mib[4] + 0.001, mib[16] + 0.001, 10_000.0]
    ranks = budget_ranks(budgets, RANKS, 3000, 0, fp)
    assert set(ranks) == {4, 16, 32} and all(abs(ranks.count(r) / 3000 - 1 / 3) < 0.04 for r in (4, 16, 32))
    assert ranks == budget_ranks(budgets, RANKS, 3000, 0, fp)
    with pytest.raises(ValueError, match="fits no rank"):
        budget_ranks([mib[4] / 2], RANKS, 3, 0, fp)
