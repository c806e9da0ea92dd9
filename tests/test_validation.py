"""Hostile and broken updates (hypothesis): the server aggregates a valid set or rejects with a reason;
never an unhandled exception, never a non-finite or reshaped global state. Also each API case of the
reliability issue: wrong shapes, duplicate or foreign sketch indices, ranks above the state's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrank.aggregation import HOMOGENEOUS, METHODS, AggregationError, make_method
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors
from fedrank.validation import update_norm, validate_update
from helpers import trained_update

SHAPES = {"q": (12, 10), "down": (10, 16)}
R = 8
FAULTS = (
    "none",
    "nan",
    "inf",
    "wrong_shape",
    "rank_above",
    "rank_below",
    "dtype",
    "missing_layer",
    "extra_layer",
    "duplicate_indices",
    "foreign_indices",
    "frozen_changed",
    "wrong_client",
)


def make(name: str):
    return make_method(name, rank=R) if name == "fslora" else make_method(name)


def honest(sent: ClientAssignment, g: torch.Generator) -> ClientUpdate:
    return trained_update(sent, ClientSpec(sent.client_id, sent.rank, 10), g, scale=0.1)


def corrupt(u: ClientUpdate, sent: ClientAssignment, fault: str, g: torch.Generator) -> ClientUpdate:
    f = dict(u.factors)
    name = "q"
    q = f[name]
    if fault == "nan":
        B = q.B.clone()
        B.view(-1)[int(torch.randint(B.numel(), (1,), generator=g))] = float("nan")
        f[name] = LoraFactors(B, q.A)
    elif fault == "inf":
        A = q.A.clone()
        A.view(-1)[int(torch.randint(A.numel(), (1,), generator=g))] = float("-inf")
        f[name] = LoraFactors(q.B, A)
    elif fault == "wrong_shape":
        f[name] = LoraFactors(torch.zeros(q.B.shape[0] + 3, u.rank), torch.zeros(u.rank, q.A.shape[1]))
    elif fault in ("rank_above", "rank_below"):
        r = u.rank + 3 if fault == "rank_above" else max(1, u.rank - 1)
        if r == u.rank:
            return u
        f = {
            k: LoraFactors(torch.randn(v.B.shape[0], r, generator=g), torch.randn(r, v.A.shape[1], generator=g))
            for k, v in f.items()
        }
        idx = None if u.indices is None else torch.arange(r)
        return ClientUpdate(u.client_id, r, u.num_examples, f, idx, u.train_A, u.train_B)
    elif fault == "dtype":
        f = {k: LoraFactors(v.B.double(), v.A.double()) for k, v in f.items()}
    elif fault == "missing_layer":
        del f[name]
    elif fault == "extra_layer":
        f["evil"] = q
    elif fault in ("duplicate_indices", "foreign_indices"):
        if u.indices is None or u.rank < 2:
            idx = torch.zeros(u.rank, dtype=torch.long)  # indices where none were sent / duplicates
        elif fault == "duplicate_indices":
            idx = u.indices.clone()
            idx[1] = idx[0]
        else:
            idx = (u.indices + 1) % R
        return ClientUpdate(u.client_id, u.rank, u.num_examples, f, idx, u.train_A, u.train_B)
    elif fault == "frozen_changed":
        f[name] = LoraFactors(q.B + 1.0, q.A + 1.0)
    elif fault == "wrong_client":
        return ClientUpdate(u.client_id + 100, u.rank, u.num_examples, f, u.indices, u.train_A, u.train_B)
    return ClientUpdate(u.client_id, u.rank, u.num_examples, f, u.indices, u.train_A, u.train_B)


def assert_sound(method, state) -> None:
    gm = method.global_model(state)
    for k, (m, n) in SHAPES.items():
        if gm.factors:
            f = gm.factors[k]
            assert f.shape == (m, n) and torch.isfinite(f.B).all() and torch.isfinite(f.A).all()
        if gm.base_delta is not None:
            d = gm.base_delta[k]
            assert tuple(d.shape) == (m, n) and torch.isfinite(d).all()


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), fault=st.sampled_from(FAULTS), victim=st.integers(0, 2))
def test_server_aggregates_valid_updates_or_rejects_with_a_reason(
    name: str, seed: int, fault: str, victim: int
) -> None:
    method = make(name)
    g = torch.Generator().manual_seed(seed)
    ranks = [4, 4, 4] if name in HOMOGENEOUS else [2, 4, R]
    state = method.init_state(SHAPES, max(ranks))
    sent = [method.dispatch(state, ClientSpec(c, r, 10), 1) for c, r in enumerate(ranks)]
    ups = [honest(a, g) for a in sent]
    ups[victim] = corrupt(ups[victim], sent[victim], fault, g)
    accepted = []
    for u, a in zip(ups, sent):
        reason = validate_update(u, a)
        if reason is None:
            accepted.append(u)
        else:
            assert isinstance(reason, str) and reason
    frozen = not (sent[victim].train_A and sent[victim].train_B)
    must_reject = fault not in ("none", "frozen_changed") or (fault == "frozen_changed" and frozen)
    assert len(accepted) == (2 if must_reject else 3), (fault, [validate_update(u, a) for u, a in zip(ups, sent)])
    new = method.aggregate(state, accepted)
    assert_sound(method, new)
    # through the API, without validation: a named AggregationError or a sound state, nothing else
    try:
        direct = method.aggregate(state, ups)
    except AggregationError:
        return
    assert_sound(method, direct)


def test_validation_names_layer_and_reason() -> None:
    m = make("fslora")
    state = m.init_state(SHAPES, R)
    sent = m.dispatch(state, ClientSpec(0, 4, 10), 0)
    u = honest(sent, torch.Generator().manual_seed(0))
    assert validate_update(u, sent) is None
    dup = ClientUpdate(0, 4, 10, u.factors, torch.tensor([1, 1, 2, 3]))
    assert "duplicate sketch indices" in (validate_update(dup, sent) or "")
    other = ClientUpdate(0, 4, 10, u.factors, (sent.indices + 1) % R)
    assert "differ from the seeded draw" in (validate_update(other, sent) or "")
    nan = corrupt(u, sent, "nan", torch.Generator().manual_seed(1))
    assert validate_update(nan, sent) == "layer q: non-finite values"
    assert update_norm(u, sent) > 0
    assert "exceeds federation.max_update_norm" in (validate_update(u, sent, max_norm=1e-6) or "")
    assert validate_update(u, sent, max_norm=1e6) is None


@pytest.mark.parametrize("name", ["flexlora", "fedit", "lorafair", "hetlora"])
def test_api_refuses_a_reshaped_layer_naming_client_and_layer(name: str) -> None:
    m = make(name)
    state = m.init_state(SHAPES, 4)
    bad = {
        "q": LoraFactors(torch.ones(13, 4), torch.ones(4, 10)),
        "down": LoraFactors(torch.ones(10, 4), torch.ones(4, 16)),
    }
    with pytest.raises(AggregationError, match="client 7: layer q has ΔW shape"):
        m.aggregate(state, [ClientUpdate(7, 4, 1, bad)])


def test_fslora_api_refuses_duplicate_indices_and_ranks_above_the_state() -> None:
    m = make("fslora")
    state = m.init_state(SHAPES, R)
    f = {k: LoraFactors(torch.zeros(mm, 2), torch.zeros(2, n)) for k, (mm, n) in SHAPES.items()}
    with pytest.raises(AggregationError, match="must be distinct"):
        m.aggregate(state, [ClientUpdate(0, 2, 1, f, torch.tensor([3, 3]))])
    big = {k: LoraFactors(torch.zeros(mm, R + 1), torch.zeros(R + 1, n)) for k, (mm, n) in SHAPES.items()}
    with pytest.raises(AggregationError, match="outside"):
        m.aggregate(state, [ClientUpdate(0, R + 1, 1, big, torch.arange(R + 1))])
    for name in ("hetlora", "replication", "ffa", "fedsa"):
        hm = make(name)
        with pytest.raises(AggregationError, match="outside 1..8"):
            hm.aggregate(hm.init_state(SHAPES, R), [ClientUpdate(0, R + 1, 1, big)])
