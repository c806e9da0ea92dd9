"""One LoRA scale across ranks in the index-sharing methods (hetlora, replication, ffa, fedsa).

A client of rank r on a rank-R state trains with the global scale s(R), so its effective update s·B·A
and the global model's agree: identical clients reproduce their effective ΔW exactly (also with rsLoRA).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.aggregation import make_method
from fedrank.aggregation.base import LoraState
from fedrank.aggregation.hetlora import product_norm
from fedrank.lowrank import lora_scaling
from fedrank.types import ClientSpec, ClientUpdate, LoraFactors
from helpers import perturb as perturbed

SHAPES = {"q": (12, 10), "down": (10, 16)}
INDEX_SHARING = ("hetlora", "replication", "ffa", "fedsa")


def effective(factors: dict[str, LoraFactors], scaling: float) -> dict[str, torch.Tensor]:
    return {k: scaling * f.B.double() @ f.A.double() for k, f in factors.items()}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", INDEX_SHARING)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), r=st.integers(1, 7), R=st.integers(8, 16), K=st.integers(1, 4))
def test_identical_clients_below_the_global_rank_keep_their_effective_update(
    name: str, rslora: bool, seed: int, r: int, R: int, K: int
) -> None:
    m = make_method(name, alpha=16.0, rslora=rslora, seed=seed)
    state = m.init_state(SHAPES, R)  # B = 0: indices >= r hold no update
    g = torch.Generator().manual_seed(seed)
    a = m.dispatch(state, ClientSpec(0, r, 5), 0)
    assert a.scaling == pytest.approx(lora_scaling(16.0, R, rslora))
    trained = perturbed(a, g)
    ups = [ClientUpdate(c, r, 3 + 2 * c, trained) for c in range(K)]
    new = m.aggregate(state, ups)
    gm = m.global_model(new)
    want = effective(trained, a.scaling)
    got = effective(gm.factors, gm.scaling)
    if name == "fedsa":  # the state's B is the per-index mean of the clients' own B, here all equal
        assert torch.equal(m.local_state(ups[0])["q"], trained["q"].B)
    for k in SHAPES:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ("replication", "ffa", "fedsa"))
def test_mixed_ranks_that_train_nothing_leave_the_global_update_unchanged(name: str) -> None:
    m = make_method(name, seed=3)
    g = torch.Generator().manual_seed(3)
    R = 8
    init = m.init_state(SHAPES, R)
    # a global state with every index in use (B != 0), as after some rounds
    state = LoraState({k: LoraFactors(torch.randn(f.B.shape, generator=g), f.A) for k, f in init.factors.items()})
    before = m.global_model(state)
    ups = []
    for cid, r in enumerate([2, 4, 8, 4]):
        local = {k: f.B[:, :r].clone() for k, f in state.factors.items()} if name == "fedsa" else None
        a = m.dispatch(state, ClientSpec(cid, r, 10 + cid), 1, local)
        ups.append(ClientUpdate(cid, r, 10 + cid, a.factors))
    after = m.global_model(m.aggregate(state, ups))
    b, c = effective(before.factors, before.scaling), effective(after.factors, after.scaling)
    for k in SHAPES:
        torch.testing.assert_close(c[k], b[k], atol=1e-6, rtol=1e-6)


def test_hetlora_dilution_is_exactly_zero_padding_at_the_consistent_scale() -> None:
    """HetLoRA's rule: pad each update with zeros to R and average with w_k ∝ p_k‖B_kA_k‖_F; a round
    that trains nothing therefore dilutes index i by the weight of the clients holding it, no more."""
    m = make_method("hetlora", seed=1)
    g = torch.Generator().manual_seed(1)
    R, ranks, n = 8, [2, 4, 8], [30, 10, 20]
    init = m.init_state(SHAPES, R)
    state = LoraState({k: LoraFactors(torch.randn(f.B.shape, generator=g), f.A) for k, f in init.factors.items()})
    ups = []
    for cid, r in enumerate(ranks):
        a = m.dispatch(state, ClientSpec(cid, r, n[cid]), 0)
        assert a.scaling == lora_scaling(16.0, R)
        ups.append(ClientUpdate(cid, r, n[cid], a.factors))
    new = m.aggregate(state, ups)
    p = torch.tensor(n, dtype=torch.float64) / sum(n)
    for k, f in state.factors.items():
        w = p * torch.tensor([product_norm(f.B[:, :r], f.A[:r]) for r in ranks], dtype=torch.float64)
        w = w / w.sum()
        held = torch.tensor([sum(float(w[j]) for j, rj in enumerate(ranks) if i < rj) for i in range(R)])
        held = held.double()
        torch.testing.assert_close(new.factors[k].A.double(), held.unsqueeze(1) * f.A.double())
        torch.testing.assert_close(new.factors[k].B.double(), f.B.double() * held.unsqueeze(0))
        gm = m.global_model(new)
        assert gm.scaling == lora_scaling(16.0, R)
