"""Communication is counted as sent (issue 25): a dispatched assignment's ``download_params`` is the number of
tensor elements its Flower record carries, for the methods whose clients fold part of the global model into
their base (Fed-PLoRA, RoLoRA, FedEx-LoRA: the frozen modules travel as factors, not as a dense m×n fold) and
for FLoRA (its dense merged delta). The client's fold of those modules is the global model exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedrank.aggregation import FedExState, LoraState, RoLoRAState, make_method
from fedrank.aggregation.fold import dense_base
from fedrank.types import ClientAssignment, ClientSpec, LoraFactors
from helpers import trained_update

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.down_proj": (10, 16)}
FOLDING = ["fedplora", "rolora", "fedex"]
R, RANKS = 8, [2, 4, 8]


def rounds(name: str, n: int = 3) -> list[tuple[int, list[ClientAssignment]]]:
    """Every round's assignments, over ``n`` rounds of three clients (ranks 2, 4, 8) with random updates."""
    method = make_method(name)
    state = method.init_state(SHAPES, R)
    g = torch.Generator().manual_seed(11)
    out = []
    for rnd in range(n):
        specs = [ClientSpec(c, r, 1 + c) for c, r in enumerate(RANKS)]
        assigned = [method.dispatch(state, s, rnd) for s in specs]
        out.append((rnd, assigned))
        state = method.aggregate(state, [trained_update(a, s, g) for a, s in zip(assigned, specs, strict=True)])
    return out


@pytest.mark.parametrize("name", [*FOLDING, "flora"])
def test_download_params_is_what_the_flower_record_carries(name: str) -> None:
    """download_params = the elements of every array in the assignment's ArrayRecord but the (integer)
    module indices, in every round: round 0 (nothing dense to send yet) and after aggregations."""
    pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")
    from fedrank.flower.records import encode_assignment

    for rnd, assigned in rounds(name):
        for a in assigned:
            rec = encode_assignment(a, rnd, "")["assignment"]
            sent = sum(int(arr.numpy().size) for key, arr in rec.items() if key != "::indices")
            assert a.download_params == sent, (name, rnd, a.client_id)


@pytest.mark.parametrize("name", [*FOLDING, "flora"])
def test_download_formula(name: str) -> None:
    """Per client: Fed-PLoRA and RoLoRA R·(m + n); FedEx-LoRA R·(m + n), plus m·n once it has a residual;
    FLoRA its fresh r·(m + n), plus m·n once it has a merged delta."""
    full = sum(R * (m + n) for m, n in SHAPES.values())
    mn = sum(m * n for m, n in SHAPES.values())
    for rnd, assigned in rounds(name):
        for a, r in zip(assigned, RANKS, strict=True):
            own = sum(r * (m + n) for m, n in SHAPES.values())
            want = {"fedplora": full, "rolora": full, "fedex": full + (mn if rnd else 0)}.get(name)
            assert a.download_params == (own + (mn if rnd else 0) if want is None else want)
            assert (a.base_delta is not None) == (name in ("fedex", "flora") and rnd > 0)  # nothing zero is sent


def rand_state(name: str, g: torch.Generator) -> Any:
    factors = {
        k: LoraFactors(torch.randn(m, R, generator=g, dtype=torch.float64), torch.randn(R, n, generator=g).double())
        for k, (m, n) in SHAPES.items()
    }
    if name == "fedex":
        return FedExState(factors, {k: torch.randn(m, n, generator=g).double() for k, (m, n) in SHAPES.items()})
    return RoLoRAState(factors) if name == "rolora" else LoraState(factors)


@pytest.mark.parametrize("name", FOLDING)
def test_the_clients_fold_equals_the_dense_fold_it_replaces(name: str) -> None:
    """dense_base(a) = D + s·Σ_{i∉S} B_i A_i, the dense delta the server used to send (fold_complement), and
    with the trained indices on top it is the global model: nothing is truncated."""
    g = torch.Generator().manual_seed(3)
    method = make_method(name)
    state = rand_state(name, g)
    gm = method.global_model(state)
    for r in (1, 3, R):
        a = method.dispatch(state, ClientSpec(0, r, 1), 2)
        held = a.indices if a.indices is not None else torch.arange(r)
        rest = [i for i in range(R) if i not in held.tolist()]
        base = dense_base(a)
        if not rest and name != "fedex":
            assert a.frozen is None and base is None
            continue
        for k, f in state.factors.items():
            want = sum((a.scaling * torch.outer(f.B[:, i], f.A[i]) for i in rest), torch.zeros(SHAPES[k]).double())
            if name == "fedex":
                want = want + state.residual[k]
            assert base is not None
            torch.testing.assert_close(base[k], want, atol=1e-12, rtol=1e-12)
            glob = gm.scaling * f.B @ f.A + (gm.base_delta[k] if gm.base_delta is not None else 0)
            torch.testing.assert_close(base[k] + a.scaling * a.factors[k].B @ a.factors[k].A, glob)


def test_dense_base_is_the_base_delta_itself_without_frozen_modules() -> None:
    """The model host skips rewriting weights when it sees the delta it applied (identity): a global model,
    which has no frozen part, hands back its base delta object."""
    g = torch.Generator().manual_seed(4)
    fx = make_method("fedex")
    state = rand_state("fedex", g)
    gm = fx.global_model(state)
    assert gm.frozen is None and dense_base(gm) is gm.base_delta is state.residual
    assert dense_base(make_method("fedplora").global_model(rand_state("fedplora", g))) is None


@pytest.mark.parametrize("name", [*FOLDING, "flora"])
def test_flower_records_round_trip_frozen_modules_and_base_delta(name: str) -> None:
    pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")
    from fedrank.flower.records import decode_assignment, encode_assignment

    rnd, assigned = rounds(name, 2)[-1]
    for a in assigned:
        b, got_round, cfg = decode_assignment(encode_assignment(a, rnd, "x = 1"))
        assert (got_round, cfg) == (rnd, "x = 1")
        assert (b.download_params, b.rank, b.scaling) == (a.download_params, a.rank, a.scaling)
        for got, want in ((b.factors, a.factors), (b.frozen or {}, a.frozen or {})):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k].B, want[k].B) and torch.equal(got[k].A, want[k].A) for k in want)
        assert (b.base_delta or {}).keys() == (a.base_delta or {}).keys()
        assert all(torch.equal(b.base_delta[k], d) for k, d in (a.base_delta or {}).items())  # type: ignore[index]
        assert (b.frozen is None) == (a.frozen is None) and (b.base_delta is None) == (a.base_delta is None)
        if a.frozen is not None:
            assert name in FOLDING and a.rank < R


def test_a_record_with_frozen_modules_that_fit_no_factors_is_refused() -> None:
    pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")
    from dataclasses import replace

    from fedrank.flower.records import decode_assignment, encode_assignment

    _, assigned = rounds("fedplora", 1)[0]
    a = assigned[0]
    assert a.frozen is not None
    bad = {k: LoraFactors(torch.zeros(3, f.rank), torch.zeros(f.rank, 5)) for k, f in a.frozen.items()}
    with pytest.raises(ValueError, match="frozen modules are for a"):
        decode_assignment(encode_assignment(replace(a, frozen=bad), 0, ""))


@pytest.mark.parametrize("name", FOLDING)
def test_fold_scale_clients_start_from_the_global_model(name: str) -> None:
    """``method.scale = "fold"`` (a client at its own s(r_k), √(s(R)/s(r_k)) folded into its factors): the
    frozen modules are applied at the assignment's scaling too, so they must be folded like the factors."""
    from fedrank.aggregation.scale import FoldedScale

    g = torch.Generator().manual_seed(6)
    inner = make_method(name)
    state = rand_state(name, g)
    gm = inner.global_model(state)
    a = FoldedScale(inner).dispatch(state, ClientSpec(0, 3, 1), 1)
    assert a.scaling == inner.scaling(3) and a.frozen is not None
    base = dense_base(a)
    assert base is not None
    for k, f in state.factors.items():
        glob = gm.scaling * f.B @ f.A + (gm.base_delta[k] if gm.base_delta is not None else 0)
        torch.testing.assert_close(base[k] + a.scaling * a.factors[k].B @ a.factors[k].A, glob)
