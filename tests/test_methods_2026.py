"""Fed-PLoRA, FedEx-LoRA, RoLoRA and raFLoRA (issue 11): each method's defining property with mixed ranks,
"no training" as a fixed point, communication accounting, and the fold through the tiny model."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.aggregation import (
    AggregationError,
    FedExLoRA,
    FedExState,
    FedPLoRA,
    FlexLoRA,
    LoraState,
    RaFLoRA,
    RoLoRA,
    RoLoRAState,
    make_method,
)
from fedrank.aggregation.base import derive_generator, normalized_weights
from fedrank.aggregation.fold import dense_base
from fedrank.lowrank import lora_scaling
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors
from helpers import trained_update as trained

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.down_proj": (10, 16)}
NEW = ["fedplora", "fedex", "rolora", "raflora"]
ranks_st = st.lists(st.integers(1, 6), min_size=1, max_size=4)


def rand_factors(g: torch.Generator, rank: int, dtype=torch.float64) -> dict[str, LoraFactors]:
    return {
        k: LoraFactors(torch.randn(m, rank, generator=g, dtype=dtype), torch.randn(rank, n, generator=g, dtype=dtype))
        for k, (m, n) in SHAPES.items()
    }


def dense(a: ClientAssignment) -> dict[str, torch.Tensor]:
    """What an assignment adds to W0: base_delta + scaling·B_frozen A_frozen (the client's fold) + scaling·B A
    (per layer, float64)."""
    out = {}
    base = dense_base(a)
    for k, (m, n) in SHAPES.items():
        d = torch.zeros(m, n, dtype=torch.float64)
        if k in a.factors:
            d = d + a.scaling * (a.factors[k].B.double() @ a.factors[k].A.double())
        if base is not None:
            d = d + base[k].double()
        out[k] = d
    return out


def global_dense(method, state) -> dict[str, torch.Tensor]:
    return dense(method.global_model(state))


def unchanged(a: ClientAssignment, spec: ClientSpec) -> ClientUpdate:
    return ClientUpdate(spec.client_id, a.rank, spec.num_examples, a.factors, a.indices, a.train_A, a.train_B)


def close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-9) -> None:
    for k in SHAPES:
        torch.testing.assert_close(got[k], want[k], atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- Fed-PLoRA


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st, extra=st.integers(0, 2), rnd=st.integers(0, 50))
def test_fedplora_client_starts_from_the_exact_global_model(seed: int, ranks: list[int], extra: int, rnd: int) -> None:
    """Folded unselected modules + selected modules at s_R = the global ΔW, for every client and rank."""
    R = max(ranks) + extra
    fp = FedPLoRA(seed=seed)
    g = torch.Generator().manual_seed(seed)
    state = LoraState(rand_factors(g, R))
    want = global_dense(fp, state)
    for cid, r in enumerate(ranks):
        a = fp.dispatch(state, ClientSpec(cid, r, 1), rnd)
        assert a.rank == r and a.indices is not None and a.indices.numel() == r
        assert a.scaling == lora_scaling(16.0, R)  # the global scaling, whatever the client's rank
        assert a.base_delta is None and (a.frozen is None) == (r == R)  # the R − r unselected modules, folded
        close(dense(a), want)
        # the selection is the seeded draw of (seed, round, client): a resumed run selects the same modules
        perm = torch.randperm(R, generator=derive_generator(seed, rnd, cid))[:r].sort().values
        assert torch.equal(a.indices, perm)
        for k, f in a.factors.items():
            glob = state.factors[k]
            assert torch.equal(f.B, glob.B[:, a.indices]) and torch.equal(f.A, glob.A[a.indices])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st, extra=st.integers(0, 2))
def test_fedplora_averages_each_module_over_the_clients_that_trained_it(
    seed: int, ranks: list[int], extra: int
) -> None:
    R = max(ranks) + extra
    fp = FedPLoRA(seed=seed)
    g = torch.Generator().manual_seed(seed)
    state = LoraState(rand_factors(g, R))
    specs = [ClientSpec(c, r, 1 + (seed + c) % 7) for c, r in enumerate(ranks)]
    ups = [trained(fp.dispatch(state, s, 3), s, g) for s in specs]
    new = fp.aggregate(state, ups)
    p = normalized_weights(ups)
    for k, prev in state.factors.items():
        for j in range(R):
            holders = [(float(pk), u, u.indices.tolist().index(j)) for pk, u in zip(p, ups) if j in u.indices.tolist()]
            if not holders:  # a module nobody trained keeps its value, bit for bit
                assert torch.equal(new.factors[k].B[:, j], prev.B[:, j]) and torch.equal(new.factors[k].A[j], prev.A[j])
                continue
            total = sum(w for w, _, _ in holders)
            want_B = sum(w * u.factors[k].B[:, pos] for w, u, pos in holders) / total
            want_A = sum(w * u.factors[k].A[pos] for w, u, pos in holders) / total
            torch.testing.assert_close(new.factors[k].B[:, j], want_B)
            torch.testing.assert_close(new.factors[k].A[j], want_A)


def test_fedplora_selection_covers_every_module_and_bad_indices_are_rejected() -> None:
    fp = FedPLoRA(seed=3)
    counts = torch.zeros(8)
    for rnd in range(400):
        counts[fp.select(ClientSpec(rnd % 7, 2, 1), rnd, 8)] += 1
    assert float(counts.min()) > 0.6 * 100 and float(counts.max()) < 1.4 * 100  # 400·2/8 = 100 each
    assert torch.equal(fp.select(ClientSpec(0, 20, 1), 0, 8), torch.arange(8))  # r > R: every module
    state = fp.init_state(SHAPES, 4)
    u = trained(fp.dispatch(state, ClientSpec(0, 2, 1), 0), ClientSpec(0, 2, 1), torch.Generator().manual_seed(0))
    for bad in (None, torch.tensor([1, 1]), torch.tensor([0, 4])):
        with pytest.raises(AggregationError, match="distinct module indices"):
            fp.aggregate(state, [ClientUpdate(0, 2, 1, u.factors, bad)])


# ----------------------------------------------------------------------------- FedEx-LoRA


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st, extra=st.integers(0, 2), rslora=st.booleans())
def test_fedex_global_model_is_the_exact_average_of_the_client_models(
    seed: int, ranks: list[int], extra: int, rslora: bool
) -> None:
    """W_res' + s_R B̄'Ā' = Σ_k p_k ΔW_k, each client at its own rank and the global scale s_R, after it started
    exactly from the global model (residual and unheld indices folded into its base)."""
    R = max(ranks) + extra
    fx = FedExLoRA(alpha=8.0, rslora=rslora)
    g = torch.Generator().manual_seed(seed)
    residual = {k: torch.randn(m, n, generator=g, dtype=torch.float64) for k, (m, n) in SHAPES.items()}
    state = FedExState(rand_factors(g, R), residual)
    before = global_dense(fx, state)
    ups, client_models = [], []
    for cid, r in enumerate(ranks):
        spec = ClientSpec(cid, r, 1 + (seed + cid) % 5)
        a = fx.dispatch(state, spec, 0)
        assert a.rank == r and a.scaling == lora_scaling(8.0, R, rslora)  # the global scale s_R
        close(dense(a), before)  # exact start
        u = trained(a, spec, g)
        ups.append(u)
        client_models.append(dense(replace(a, factors=u.factors)))
    new = fx.aggregate(state, ups)
    p = normalized_weights(ups)
    want = {k: sum(float(pk) * cm[k] for pk, cm in zip(p, client_models)) for k in SHAPES}
    close(global_dense(fx, new), want)
    assert new.rank == R


def test_fedex_first_round_equals_the_weighted_sum_of_client_products() -> None:
    """From the init (B = 0, no residual): the global update is Σ_k p_k s·B_k A_k, the issue's statement, with
    every client at the global scale s = s_R (fedrank's one scale across ranks)."""
    fx = FedExLoRA()
    state = fx.init_state(SHAPES, 8)
    g = torch.Generator().manual_seed(1)
    clients = [(2, 5), (8, 15), (4, 30)]
    ups = [ClientUpdate(c, r, n, rand_factors(g, r, torch.float32)) for c, (r, n) in enumerate(clients)]
    new = fx.aggregate(state, ups)
    p = [5 / 50, 15 / 50, 30 / 50]
    want = {
        k: sum(pk * lora_scaling(16, 8) * (u.factors[k].B.double() @ u.factors[k].A.double()) for pk, u in zip(p, ups))
        for k in SHAPES
    }
    close(global_dense(fx, new), want, tol=1e-4)


# ----------------------------------------------------------------------------- RoLoRA


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st, extra=st.integers(0, 2), phase=st.integers(0, 3))
def test_rolora_aggregate_is_exact_in_the_round_one_factor_is_frozen(
    seed: int, ranks: list[int], extra: int, phase: int
) -> None:
    R = max(ranks) + extra
    ro = RoLoRA()
    g = torch.Generator().manual_seed(seed)
    state = RoLoRAState(rand_factors(g, R), step=phase)
    s = lora_scaling(16.0, R)
    before = global_dense(ro, state)
    ups = []
    for cid, r in enumerate(ranks):
        spec = ClientSpec(cid, r, 1 + (seed + cid) % 5)
        a = ro.dispatch(state, spec, 0)
        assert (a.train_B, a.train_A) == (phase % 2 == 0, phase % 2 == 1)  # B in even aggregations, A in odd
        assert a.scaling == s
        close(dense(a), before)  # exact start: unheld indices folded
        ups.append(trained(a, spec, g))
    new = ro.aggregate(state, ups)
    assert new.step == phase + 1
    p = normalized_weights(ups)
    frozen = "A" if phase % 2 == 0 else "B"
    for k, prev in state.factors.items():
        if frozen == "A":
            assert torch.equal(new.factors[k].A, prev.A)
        else:
            assert torch.equal(new.factors[k].B, prev.B)
        # index by index, s·B[:, i]A[i] is the exact weighted average over the clients that held index i
        for i in range(R):
            holders = [(float(pk), u) for pk, u in zip(p, ups) if i < u.rank]
            got = s * torch.outer(new.factors[k].B[:, i], new.factors[k].A[i])
            if not holders:
                torch.testing.assert_close(got, s * torch.outer(prev.B[:, i], prev.A[i]))
                continue
            total = sum(w for w, _ in holders)
            want = sum(w * s * torch.outer(u.factors[k].B[:, i], u.factors[k].A[i]) for w, u in holders) / total
            torch.testing.assert_close(got, want)
    if len(set(ranks)) == 1 and extra == 0:  # one rank: the new global ΔW is Σ_k p_k ΔW_k exactly
        want = {k: sum(float(pk) * s * u.factors[k].B @ u.factors[k].A for pk, u in zip(p, ups)) for k in SHAPES}
        close(global_dense(ro, new), want)


def test_rolora_rejects_a_changed_frozen_factor_and_counts_one_factor_up() -> None:
    ro = RoLoRA()
    state = ro.init_state(SHAPES, 4)
    spec = ClientSpec(0, 2, 1)
    a = ro.dispatch(state, spec, 0)
    bad = ClientUpdate(0, 2, 1, {k: LoraFactors(f.B, f.A + 1) for k, f in a.factors.items()}, None, True, True)
    with pytest.raises(AggregationError, match="changed A .* frozen in aggregation 0"):
        ro.aggregate(state, [bad])
    u = trained(a, spec, torch.Generator().manual_seed(0))
    assert ro.upload_params(u) == sum(2 * m for m, _ in SHAPES.values())
    state = ro.aggregate(state, [u])
    a = ro.dispatch(state, spec, 1)
    assert a.train_A and not a.train_B
    u = trained(a, spec, torch.Generator().manual_seed(1))
    assert ro.upload_params(u) == sum(2 * n for _, n in SHAPES.values())


# ----------------------------------------------------------------------------- raFLoRA


def partitioned_sum(method: RaFLoRA, ups: list[ClientUpdate], p: torch.Tensor) -> dict[str, torch.Tensor]:
    """ΔW written partition by partition: [r_(m-1), r_(m)) averaged over the clients with r_k >= r_(m)."""
    out = {}
    for k, (m, n) in SHAPES.items():
        total = torch.zeros(m, n, dtype=torch.float64)
        lo = 0
        for hi in sorted({u.rank for u in ups}):
            covering = [(float(pk), u) for pk, u in zip(p, ups) if u.rank >= hi]
            weight = sum(w for w, _ in covering)
            for w, u in covering:
                f = u.factors[k]
                total += w / weight * method.scaling(u.rank) * f.B[:, lo:hi].double() @ f.A[lo:hi].double()
            lo = hi
        out[k] = total
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st)
def test_raflora_partition_averages_over_exactly_the_covering_clients(seed: int, ranks: list[int]) -> None:
    ra = RaFLoRA()
    g = torch.Generator().manual_seed(seed)
    ups = [ClientUpdate(c, r, 1 + (seed + c) % 5, rand_factors(g, r)) for c, r in enumerate(ranks)]
    new = ra.aggregate(ra.init_state(SHAPES, max(ranks)), ups)
    want = partitioned_sum(ra, ups, normalized_weights(ups))
    assert new.svd is not None
    close({k: new.svd[k].dense() for k in SHAPES}, want)
    if len(set(ranks)) == 1:  # one partition: FlexLoRA's ΔW
        flex = FlexLoRA().aggregate(FlexLoRA().init_state(SHAPES, max(ranks)), ups)
        close({k: new.svd[k].dense() for k in SHAPES}, global_dense(FlexLoRA(), flex))  # FlexLoRA keeps ΔW exactly


def test_raflora_keeps_what_flexlora_collapses() -> None:
    """Unchanged clients of ranks 2, 4, 8 on a rank-8 ΔW: raFLoRA returns ΔW; FlexLoRA multiplies component i
    by the weight of the clients holding it, P_i = Σ_{k: r_k > i} p_k (the rank collapse)."""
    g = torch.Generator().manual_seed(2)
    seed_state = FlexLoRA().aggregate(FlexLoRA().init_state(SHAPES, 8), [ClientUpdate(9, 8, 1, rand_factors(g, 8))])
    specs = [ClientSpec(0, 2, 10), ClientSpec(1, 4, 30), ClientSpec(2, 8, 60)]
    P = torch.tensor([1.0, 1.0, 0.9, 0.9, 0.6, 0.6, 0.6, 0.6], dtype=torch.float64)
    for method in (RaFLoRA(), FlexLoRA()):
        ups = [unchanged(method.dispatch(seed_state, s, 1), s) for s in specs]
        new = method.aggregate(seed_state, ups)
        assert new.svd is not None and seed_state.svd is not None
        for k in SHAPES:
            U, S, Vh = seed_state.svd[k].U, seed_state.svd[k].S, seed_state.svd[k].Vh
            want = (U * S) @ Vh if method.name == "raflora" else (U * (S * P)) @ Vh
            torch.testing.assert_close(new.svd[k].dense(), want, atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------- all four


def build(name: str, R: int):
    return RaFLoRA(components=R) if name == "raflora" else make_method(name)


@pytest.mark.parametrize("name", NEW)
def test_no_training_is_a_fixed_point(name: str) -> None:
    """After two trained rounds with mixed ranks, dispatching and aggregating unchanged factors leaves the global
    ΔW unchanged. raFLoRA (SVD allocation) keeps its top R components here (``components=R``) and the round has
    a client of rank R: a ΔW of higher rank than the round's largest client rank cannot survive SVD allocation."""
    R, ranks = 8, [2, 4, 8, 3]
    method = build(name, R)
    state = method.init_state(SHAPES, R)
    g = torch.Generator().manual_seed(3)
    for rnd in range(2):
        specs = [ClientSpec(c, r, 2 + c) for c, r in enumerate(ranks)]
        state = method.aggregate(state, [trained(method.dispatch(state, s, rnd), s, g) for s in specs])
    before = global_dense(method, state)
    assert max(float(d.abs().max()) for d in before.values()) > 0.1  # training did change it
    specs = [ClientSpec(c, r, 2 + c) for c, r in enumerate(ranks)]
    new = method.aggregate(state, [unchanged(method.dispatch(state, s, 2), s) for s in specs])
    close(global_dense(method, new), before, tol=2e-5)


@pytest.mark.parametrize("name", NEW)
def test_communication_matches_the_formula(name: str) -> None:
    """Parameters down and up per client, after two rounds of three clients (ranks 2, 4, 8; R = 8)."""
    R, ranks = 8, [2, 4, 8]
    method = make_method(name)
    state = method.init_state(SHAPES, R)
    g = torch.Generator().manual_seed(4)
    ms = [m for m, _ in SHAPES.values()]
    ns = [n for _, n in SHAPES.values()]
    for rnd in range(3):
        specs = [ClientSpec(c, r, 1) for c, r in enumerate(ranks)]
        assigned = [method.dispatch(state, s, rnd) for s in specs]
        ups = [trained(a, s, g) for a, s in zip(assigned, specs)]
        for a, u, r in zip(assigned, ups, ranks):
            full = sum(R * (m + n) for m, n in SHAPES.values())
            own = sum(r * (m + n) for m, n in SHAPES.values())
            if name == "fedplora":  # all R modules down (to fold), the r selected up
                assert (a.download_params, method.upload_params(u)) == (full, own)
            elif name == "fedex":  # R indices + the dense residual, once there is one (not in round 0)
                dense_res = sum(m * n for m, n in SHAPES.values()) if rnd > 0 else 0
                assert (a.download_params, method.upload_params(u)) == (full + dense_res, own)
            elif name == "rolora":  # R indices down, the trained factor up: B (r·m) in even rounds, A (r·n) in odd
                up = r * sum(ms) if rnd % 2 == 0 else r * sum(ns)
                assert (a.download_params, method.upload_params(u)) == (full, up)
            else:  # raflora: FlexLoRA's r·(m + n) both ways
                assert (a.download_params, method.upload_params(u)) == (own, own)
        state = method.aggregate(state, ups)
    if name == "fedex":
        assert state.stacked_params == 3 * 4 * full


# ----------------------------------------------------------------------------- through the tiny model


@pytest.fixture(scope="module")
def host():
    from fedrank.models import LoraHost, tiny_llama

    return LoraHost(tiny_llama(seed=0).model)  # its own model: peft wraps it in place


def _folding_state(host: Any, name: str, R: int, seed: int) -> tuple[Any, Any]:
    """A folding method and a random global state of rank R (FedEx with a residual) for ``host``'s layers."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        k: LoraFactors(torch.randn(m, R, generator=g) * 0.05, torch.randn(R, n, generator=g) * 0.05)
        for k, (m, n) in host.shapes.items()
    }
    if name == "fedex":
        residual = {k: torch.randn(m, n, generator=g) * 0.02 for k, (m, n) in host.shapes.items()}
        return make_method(name), FedExState(factors, residual)
    return make_method(name), RoLoRAState(factors) if name == "rolora" else LoraState(factors)


@pytest.mark.parametrize("name", ["fedplora", "fedex", "rolora"])
def test_folded_client_model_has_the_global_models_logits(host, name: str) -> None:
    """The fold goes through the real model: a rank-3 client's starting logits equal the global model's."""
    R = 8
    method, state = _folding_state(host, name, R, seed=5)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        host.load(method.global_model(state))
        want = host.module(input_ids=ids).logits.clone()
        a = method.dispatch(state, ClientSpec(0, 3, 1), 1)
        assert a.rank == 3 and a.frozen is not None and all(f.rank == R - 3 for f in a.frozen.values())
        host.load(a)
        got = host.module(input_ids=ids).logits.clone()
        host.load(ClientAssignment(-1, 1, 0.0, {}, 0))
        base = host.module(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the global model is not the base model


@pytest.mark.parametrize("name", ["fedplora", "fedex", "rolora"])
def test_folded_client_models_merged_weights_are_the_global_models(host, name: str) -> None:
    """The client folds the frozen modules it was sent (not a dense fold from the server): merged into the
    weights, a rank-3 client's model is the global model's, layer by layer."""
    R = 8
    method, state = _folding_state(host, name, R, seed=6)
    a = method.dispatch(state, ClientSpec(0, 3, 1), 1)
    assert a.frozen is not None and (a.base_delta is not None) == (name == "fedex")

    def weights(x: ClientAssignment | None = None) -> dict[str, torch.Tensor]:
        mods = dict(host.base.named_modules())  # peft wraps the base model in place
        with host.merged(x or ClientAssignment(-1, 1, 0.0, {}, 0)):
            return {k: getattr(mods[k], "base_layer", mods[k]).weight.detach().clone() for k in host.shapes}

    got, want, base = weights(a), weights(method.global_model(state)), weights()
    for k in host.shapes:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(got[k], base[k], atol=1e-4)  # the fold did change the weights


def test_fedex_caps_a_client_rank_above_the_global_rank() -> None:
    fx = FedExLoRA()
    state = fx.init_state(SHAPES, 4)
    a = fx.dispatch(state, ClientSpec(0, 8, 1), 0)
    assert a.rank == 4 and a.scaling == lora_scaling(16, 4)
    assert all(f.rank == 4 for f in a.factors.values())
