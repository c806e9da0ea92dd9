from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedrank.accounting import (
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    Accountant,
    RoundEvent,
    default_delta,
    noise_for_epsilon,
    round_event,
)

NR = dp_accounting.NeighboringRelation
POISSON = RoundEvent(1.1, "poisson", num_clients=1000, per_round=10, q=0.01)
FIXED = RoundEvent(1.1, "fixed", num_clients=100, per_round=10)


def test_events_are_the_documented_ones() -> None:
    assert round_event(1.1, "poisson", 0.01, 1000, 10) == dp_accounting.PoissonSampledDpEvent(
        0.01, dp_accounting.GaussianDpEvent(1.1)
    )
    # No q: the Poisson rate whose expected cohort is per_round.
    assert round_event(1.1, "poisson", None, 1000, 10) == dp_accounting.PoissonSampledDpEvent(
        0.01, dp_accounting.GaussianDpEvent(1.1)
    )
    # Fixed-size sampling: replace-one adjacency, one client moves the sum by 2C, so σ / 2.
    assert round_event(1.1, "fixed", None, 100, 10) == dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(0.55)
    )
    assert round_event(0.0, "fixed", None, 100, 10) == dp_accounting.NonPrivateDpEvent()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampling": "uniform"},
        {"sampling": "fixed", "q": 0.1},
        {"q": 0.0},
        {"q": 1.5},
        {"per_round": 0},
        {"per_round": 101},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.inf},
    ],
)
def test_bad_round_parameters_are_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"noise_multiplier": 1.0, "sampling": "poisson", "num_clients": 100, "per_round": 10}
    with pytest.raises(ValueError):
        RoundEvent(**{**args, **kwargs})  # type: ignore[arg-type]


def test_rdp_epsilon_is_dp_accountings() -> None:
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 1000)
    acct = Accountant("rdp", POISSON, 1e-5)
    acct.step(1000)
    assert acct.epsilon() == direct.get_epsilon(1e-5)
    assert acct.epsilon() == pytest.approx(1.71, abs=0.005)


def test_pld_epsilon_is_dp_accountings() -> None:
    direct = pld.PLDAccountant(value_discretization_interval=1e-4)
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 1000)
    acct = Accountant("pld", POISSON, 1e-5)
    assert acct.value_discretization_interval == PLD_VALUE_DISCRETIZATION_INTERVAL == 1e-4
    acct.step(1000)
    assert acct.epsilon() == direct.get_epsilon(1e-5)
    # PLD is tighter than RDP's conversion: 1.515 vs 1.712.
    assert acct.epsilon() == pytest.approx(1.515, abs=0.005)


def test_fixed_sampling_epsilon_is_dp_accountings_replace_one() -> None:
    direct = rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.55)), 50)
    acct = Accountant("rdp", FIXED, 1e-5, rounds=50)
    assert acct.epsilon() == direct.get_epsilon(1e-5)


def test_pld_refuses_fixed_sampling() -> None:
    # dp-accounting 0.6's PLD accountant has no SampledWithoutReplacementDpEvent, under either relation.
    event = round_event(1.1, "fixed", None, 100, 10)
    assert not pld.PLDAccountant(NR.REPLACE_ONE).supports(event)
    with pytest.raises(ValueError, match="pld") as info:
        Accountant("pld", FIXED, 1e-5)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="pld"):
        noise_for_epsilon(1.0, 1e-5, 10, "pld", "fixed", None, 100, 10)
    with pytest.raises(ValueError, match="unknown"):
        Accountant("moments", POISSON, 1e-5)


@pytest.mark.parametrize(("kind", "event"), [("rdp", POISSON), ("rdp", FIXED), ("pld", POISSON)])
def test_epsilon_grows_with_rounds(kind: str, event: RoundEvent) -> None:
    acct = Accountant(kind, event, 1e-5)
    assert acct.epsilon() == 0.0
    eps = [acct.epsilon_after(t) for t in (1, 10, 100)]
    assert 0 < eps[0] < eps[1] < eps[2]


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_shrinks_with_noise(sampling: str) -> None:
    q = 0.01 if sampling == "poisson" else None
    eps = [
        Accountant("rdp", RoundEvent(s, sampling, 100, 1, q), 1e-5, rounds=100).epsilon() for s in (0.7, 1.0, 2.0, 4.0)
    ]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == 4


@pytest.mark.parametrize(("kind", "sampling"), [("rdp", "poisson"), ("rdp", "fixed"), ("pld", "poisson")])
def test_no_noise_is_infinite_epsilon(kind: str, sampling: str) -> None:
    q = 0.1 if sampling == "poisson" else None
    acct = Accountant(kind, RoundEvent(0.0, sampling, 100, 10, q), 1e-5)
    assert acct.epsilon() == 0.0  # nothing released yet
    assert acct.epsilon_after(1) == math.inf
    acct.step()
    assert acct.epsilon() == math.inf


def test_dp_accounting_itself_says_inf_for_unnoised_poisson() -> None:
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.0))
    for direct in (rdp.RdpAccountant(), pld.PLDAccountant()):
        assert direct.compose(event).get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize(("kind", "event"), [("rdp", POISSON), ("rdp", FIXED), ("pld", POISSON)])
def test_state_round_trip_is_bit_identical(kind: str, event: RoundEvent) -> None:
    acct = Accountant(kind, event, default_delta(100))
    acct.step(3)
    acct.step(4)
    before = acct.epsilon()
    after_next = acct.epsilon_after(1)
    assert acct.rounds == 7 and acct.epsilon() == before  # epsilon_after left the state alone

    state = acct.state()
    assert all(type(v) in (int, float, str) for v in state.values())
    resumed = Accountant.from_state(json.loads(json.dumps(state)))
    assert resumed.state() == state
    assert resumed.epsilon() == before
    assert Accountant(kind, event, default_delta(100), rounds=7).epsilon() == before  # 3 + 4 == 7 at once
    resumed.step()
    assert resumed.epsilon() == after_next


def test_from_state_names_what_is_wrong() -> None:
    state = Accountant("rdp", POISSON, 1e-5, rounds=2).state()
    with pytest.raises(ValueError, match="missing \\['rounds'\\]"):
        Accountant.from_state({k: v for k, v in state.items() if k != "rounds"})
    with pytest.raises(ValueError, match="rounds must be an integer"):
        Accountant.from_state({**state, "rounds": 2.0})
    with pytest.raises(ValueError, match="unknown \\['sigma'\\]"):
        Accountant.from_state({**state, "sigma": 1.0})


@pytest.mark.parametrize(
    ("kind", "sampling", "q", "target", "rounds", "vdi"),
    [
        ("rdp", "poisson", 0.01, 2.0, 1000, 1e-4),
        ("rdp", "fixed", None, 8.0, 100, 1e-4),
        ("pld", "poisson", 0.05, 3.0, 100, 1e-3),  # a coarser grid keeps the search fast
    ],
)
def test_noise_for_epsilon_is_the_smallest_within_budget(
    kind: str, sampling: str, q: float | None, target: float, rounds: int, vdi: float
) -> None:
    delta = 1e-5
    sigma = noise_for_epsilon(target, delta, rounds, kind, sampling, q, 100, 10, value_discretization_interval=vdi)

    def eps(s: float) -> float:
        event = RoundEvent(s, sampling, 100, 10, q)
        return Accountant(kind, event, delta, rounds=rounds, value_discretization_interval=vdi).epsilon()

    assert eps(sigma) <= target
    assert eps(sigma * (1 - 2e-3)) > target


def test_default_delta() -> None:
    assert default_delta(100) == 1 / 100**1.1
    assert default_delta(100) < 1 / 100
    with pytest.raises(ValueError):
        default_delta(1)
