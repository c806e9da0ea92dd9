"""Exactness properties of every aggregation method (hypothesis where it fits)."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.aggregation import (
    HOMOGENEOUS,
    METHODS,
    AggregationError,
    FedIT,
    FlexLoRA,
    FlexLoRAState,
    FSLoRA,
    HetLoRAPruning,
    UnknownMethodError,
    make_method,
)
from fedrank.aggregation.base import normalized_weights
from fedrank.aggregation.hetlora import product_norm
from fedrank.lowrank import lora_scaling
from fedrank.types import ClientSpec, ClientUpdate, LoraFactors
from helpers import dispatch_and_train as trained

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.down_proj": (10, 16)}
ALL = sorted(METHODS)
INDEX_SHARING = ("hetlora", "replication", "ffa", "fedsa")


def rand_factors(g: torch.Generator, rank: int, dtype=torch.float32) -> dict[str, LoraFactors]:
    return {
        k: LoraFactors(torch.randn(m, rank, generator=g, dtype=dtype), torch.randn(rank, n, generator=g, dtype=dtype))
        for k, (m, n) in SHAPES.items()
    }


def test_registry_names_are_exact() -> None:
    assert set(METHODS) == {
        "fedit",
        "flexlora",
        "hetlora",
        "replication",
        "flora",
        "ffa",
        "fedsa",
        "fslora",
        "lorafair",
        "fedplora",
        "fedex",
        "rolora",
        "raflora",
    }
    for name, cls in METHODS.items():
        assert cls.name == name
        doc = sys.modules[cls.__module__].__doc__ or ""
        assert re.search(r"20\d\d", doc), f"{name}: the module docstring must cite its paper"
        assert "←" in doc or "=" in doc, f"{name}: the module docstring must state its equation"


def test_unknown_method_and_option_are_errors_listing_choices() -> None:
    with pytest.raises(UnknownMethodError, match="known methods: .*fedit.*flexlora.*fslora"):
        make_method("fedavg")
    with pytest.raises(AggregationError, match="unknown option.*'server_lr'"):
        make_method("flexlora", server_lr=1.0)
    assert make_method("fslora", rank=8, server_lr=0.5) == FSLoRA(rank=8, server_lr=0.5)
    with pytest.raises(ValueError, match="normalize"):
        make_method("fslora", normalize="mean")


@pytest.mark.parametrize("name", ALL)
def test_dispatch_ranks_equal_client_ranks(name: str) -> None:
    method = make_method(name, rank=16) if name == "fslora" else make_method(name)
    ranks = [8] * 3 if name in HOMOGENEOUS else [2, 4, 8]
    state = method.init_state(SHAPES, max(ranks))
    for cid, r in enumerate(ranks):
        a = method.dispatch(state, ClientSpec(cid, r, 10), 0)
        assert a.rank == r and a.client_id == cid
        for layer, f in a.factors.items():
            assert f.rank == r and f.shape == SHAPES[layer]
        if name == "fslora":
            expected = lora_scaling(16, 16) * 16 / r
        elif name in INDEX_SHARING or name in ("fedplora", "rolora", "fedex"):  # one scale across ranks: the global
            expected = lora_scaling(16, max(ranks))
        else:
            expected = lora_scaling(16, r)
        assert a.scaling == pytest.approx(expected)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_aggregates_and_counts_communication(name: str) -> None:
    method = make_method(name, rank=8) if name == "fslora" else make_method(name)
    ranks = [4] * 3 if name in HOMOGENEOUS else [2, 4, 8]
    state = method.init_state(SHAPES, max(ranks))
    g = torch.Generator().manual_seed(0)
    for rnd in range(2):
        locals_ = {}
        ups = []
        for cid, r in enumerate(ranks):
            u = trained(method, state, ClientSpec(cid, r, 5 + cid), g, rnd, locals_.get(cid))
            ups.append(u)
            locals_[cid] = method.local_state(u)
        state = method.aggregate(state, ups)
        gm = method.global_model(state)
        for f in gm.factors.values():
            assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    per_rank = {u.rank: method.upload_params(u) for u in ups}
    size = {r: sum(r * (m + n) for m, n in SHAPES.values()) for r in ranks}
    if name == "ffa":
        assert per_rank == {r: sum(r * m for m, _ in SHAPES.values()) for r in ranks}
    elif name in ("fedsa", "rolora"):  # rolora: its last round (step 1) trained A only
        assert per_rank == {r: sum(r * n for _, n in SHAPES.values()) for r in ranks}
    else:
        assert per_rank == size


@pytest.mark.parametrize("name", ALL)
def test_identical_clients_at_one_rank_reproduce_their_update(name: str) -> None:
    """K clients that trained the same factors: the aggregate equals that one client's result."""
    r = 4
    method = make_method(name, rank=r) if name == "fslora" else make_method(name)
    state = method.init_state(SHAPES, r)
    g = torch.Generator().manual_seed(1)
    one = trained(method, state, ClientSpec(0, r, 7), g)
    ups = [ClientUpdate(c, r, n, one.factors, one.indices) for c, n in enumerate([3, 7, 11])]
    new = method.aggregate(state, ups)
    gm = method.global_model(new, r) if name != "flora" else method.global_model(new)
    if name == "flora":
        want = {k: lora_scaling(16, r) * f.B @ f.A for k, f in one.factors.items()}
        for k in SHAPES:
            torch.testing.assert_close(new.merged[k].double(), want[k].double(), atol=1e-5, rtol=1e-6)
        return
    for k, f in one.factors.items():
        got = gm.factors[k]
        if name in ("flexlora", "raflora"):  # same ΔW, possibly other factors: compare products
            torch.testing.assert_close(
                gm.scaling * got.B @ got.A, lora_scaling(16, r) * f.B @ f.A, atol=1e-5, rtol=1e-5
            )
        elif name == "fedsa":  # only A is global; B stays with the client
            torch.testing.assert_close(got.A, f.A, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(method.local_state(ups[0])[k], f.B)
        else:
            torch.testing.assert_close(got.B, f.B, atol=1e-6, rtol=1e-6)  # float32 rounding of Σ p_k = 1
            torch.testing.assert_close(got.A, f.A, atol=1e-6, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), r=st.integers(1, 6))
def test_fslora_full_sketch_equals_fedavg(seed: int, k: int, r: int) -> None:
    fs, fedit = FSLoRA(rank=r), FedIT()
    state = fs.init_state(SHAPES, r)
    g = torch.Generator().manual_seed(seed)
    ups = [trained(fs, state, ClientSpec(c, r + c, 1 + c), g) for c in range(k)]  # r_k >= r: full sketch
    for u in ups:
        assert torch.equal(u.indices, torch.arange(r))
    got = fs.aggregate(state, ups)
    plain = [ClientUpdate(u.client_id, r, u.num_examples, u.factors) for u in ups]
    want = fedit.aggregate(fedit.init_state(SHAPES, r), plain)
    for name in SHAPES:
        torch.testing.assert_close(got.factors[name].B, want.factors[name].B, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.factors[name].A, want.factors[name].A, atol=1e-6, rtol=1e-6)
    assert fs.dispatch(state, ClientSpec(0, r, 1), 0).scaling == pytest.approx(lora_scaling(16, r))


def test_fslora_sketch_mean_tends_to_identity() -> None:
    fs = FSLoRA(rank=16, seed=3)
    n = 4000
    total = torch.zeros(16, dtype=torch.float64)
    for i in range(n):
        k = (2, 4, 8)[i % 3]
        idx = fs.sketch_indices(ClientSpec(i % 50, k, 1), i // 50)
        assert idx.numel() == k and len(set(idx.tolist())) == k
        total[idx] += fs.sketch_scale(k)
    mean = total / n
    # Each diagonal entry of S has mean 1 and std sqrt(r/k - 1) <= sqrt(7): 4σ/sqrt(n) ≈ 0.17.
    assert float((mean - 1).abs().max()) < 0.17
    assert abs(float(mean.mean()) - 1.0) < 1e-12  # trace(S) = r exactly, every draw


def test_fslora_updates_only_held_indices_and_unbiased_rule() -> None:
    fs = FSLoRA(rank=8, server_lr=0.5)
    state = fs.init_state(SHAPES, 8)
    g = torch.Generator().manual_seed(2)
    ups = [trained(fs, state, ClientSpec(c, 2, 1 + c), g) for c in range(2)]
    new = fs.aggregate(state, ups)
    p = normalized_weights(ups)
    held = set(ups[0].indices.tolist()) | set(ups[1].indices.tolist())
    for name, f in state.factors.items():
        want_A = f.A.clone()
        for u, pk in zip(ups, p, strict=True):
            want_A[u.indices] += 0.5 * float(pk) * (u.factors[name].A - f.A[u.indices])
        torch.testing.assert_close(new.factors[name].A, want_A)
        for i in set(range(8)) - held:
            assert torch.equal(new.factors[name].A[i], f.A[i]) and torch.equal(new.factors[name].B[:, i], f.B[:, i])
    holders = FSLoRA(rank=8, normalize="holders").aggregate(state, ups)
    only = ups[0].indices[~torch.isin(ups[0].indices, ups[1].indices)]
    for name in SHAPES:  # an index held by one client takes that client's value under "holders"
        pos = [ups[0].indices.tolist().index(i) for i in only.tolist()]
        torch.testing.assert_close(holders.factors[name].A[only], ups[0].factors[name].A[pos])
    assert fs.upload_params(ups[0]) == sum(2 * (m + n) for m, n in SHAPES.values())


def test_zero_padding_and_replication_differ_exactly_as_defined() -> None:
    g = torch.Generator().manual_seed(4)
    hl, rep = make_method("hetlora"), make_method("replication")
    state = rep.init_state(SHAPES, 4)
    low = ClientUpdate(0, 2, 30, rand_factors(g, 2))
    high = ClientUpdate(1, 4, 10, rand_factors(g, 4))
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    r_new = rep.aggregate(state, [low, high])
    h_new = hl.aggregate(state, [low, high])
    for name in SHAPES:
        lo, hi = low.factors[name], high.factors[name]
        # replication: shared indices are the p-mean, index 2..3 are the high-rank client's own values
        torch.testing.assert_close(r_new.factors[name].A[:2], 0.75 * lo.A + 0.25 * hi.A[:2])
        torch.testing.assert_close(r_new.factors[name].A[2:], hi.A[2:])
        torch.testing.assert_close(r_new.factors[name].B[:, 2:], hi.B[:, 2:])
        # hetlora: zero padding with w ∝ p·‖BA‖_F, so index 2..3 is diluted by w_high
        w = p * torch.tensor([product_norm(lo.B, lo.A), product_norm(hi.B, hi.A)], dtype=torch.float64)
        w = w / w.sum()
        torch.testing.assert_close(h_new.factors[name].A[:2], w[0] * lo.A + w[1] * hi.A[:2])
        torch.testing.assert_close(h_new.factors[name].A[2:], w[1] * hi.A[2:])
        torch.testing.assert_close(h_new.factors[name].B[:, 2:], w[1] * hi.B[:, 2:])
        torch.testing.assert_close(product_norm(lo.B, lo.A), float(torch.linalg.matrix_norm(lo.B @ lo.A)))


def test_replication_keeps_indices_nobody_held() -> None:
    rep = make_method("replication")
    state = rep.init_state(SHAPES, 8)
    g = torch.Generator().manual_seed(5)
    new = rep.aggregate(state, [ClientUpdate(0, 2, 1, rand_factors(g, 2))])
    for name, f in state.factors.items():
        assert torch.equal(new.factors[name].A[2:], f.A[2:])


def test_flora_merges_exact_weighted_sum_and_restarts_fresh() -> None:
    fl = make_method("flora")
    state = fl.init_state(SHAPES, 8)
    g = torch.Generator().manual_seed(6)
    ups = [ClientUpdate(c, r, n, rand_factors(g, r)) for c, (r, n) in enumerate([(2, 5), (8, 15), (4, 30)])]
    new = fl.aggregate(state, ups)
    p = [5 / 50, 15 / 50, 30 / 50]
    for name in SHAPES:
        want = sum(pk * lora_scaling(16, u.rank) * u.factors[name].B @ u.factors[name].A for pk, u in zip(p, ups))
        torch.testing.assert_close(new.merged[name].double(), want.double(), atol=1e-4, rtol=1e-5)
    a = fl.dispatch(new, ClientSpec(9, 4, 1), 1)
    assert a.base_delta is new.merged
    assert all(float(f.B.abs().sum()) == 0 for f in a.factors.values())  # fresh LoRA: B = 0
    # counted as sent: the fresh rank-4 LoRA and the dense merged delta (not the paper's stacked factors)
    assert a.download_params == sum(4 * (m + n) + m * n for m, n in SHAPES.values())
    first = fl.dispatch(state, ClientSpec(9, 4, 1), 0)  # round 0: the zero delta is not sent
    assert first.base_delta is None and first.download_params == sum(4 * (m + n) for m, n in SHAPES.values())
    # a second round accumulates; stacked_params keeps the size of both rounds' stacked factors
    stacked = sum(14 * (m + n) for m, n in SHAPES.values())
    newer = fl.aggregate(new, ups)
    assert newer.stacked_params == 2 * stacked
    torch.testing.assert_close(newer.merged[name], 2 * new.merged[name])


def test_flexlora_dispatch_is_best_rank_r_of_weighted_sum() -> None:
    fx = FlexLoRA(alpha=8.0)
    init = fx.init_state(SHAPES, 8)  # a float64 global state, for float64 updates
    state = FlexLoRAState({k: LoraFactors(f.B.double(), f.A.double()) for k, f in init.init.items()})
    g = torch.Generator().manual_seed(7)
    ups = [
        ClientUpdate(c, r, n, rand_factors(g, r, torch.float64)) for c, (r, n) in enumerate([(2, 5), (8, 15), (4, 30)])
    ]
    new = fx.aggregate(state, ups)
    for r in (1, 2, 4, 8):
        a = fx.dispatch(new, ClientSpec(0, r, 1), 1)
        for name in SHAPES:
            dW = sum(
                u.num_examples / 50 * lora_scaling(8.0, u.rank) * u.factors[name].B @ u.factors[name].A for u in ups
            )
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            best = (U[:, :r] * S[:r]) @ Vh[:r]
            f = a.factors[name]
            torch.testing.assert_close(a.scaling * f.B @ f.A, best, atol=1e-9, rtol=1e-9)
        assert a.download_params == sum(r * (m + n) for m, n in SHAPES.values())
    # ΔW kept exactly: the global model is the weighted sum itself
    gm = fx.global_model(new)
    for name, f in gm.factors.items():
        dW = sum(u.num_examples / 50 * lora_scaling(8.0, u.rank) * u.factors[name].B @ u.factors[name].A for u in ups)
        torch.testing.assert_close(gm.scaling * f.B @ f.A, dW, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(HOMOGENEOUS))
def test_homogeneous_methods_reject_mixed_ranks(name: str) -> None:
    method = make_method(name)
    state = method.init_state(SHAPES, 4)
    with pytest.raises(AggregationError, match="global rank 4, got ranks \\[2\\]"):
        method.dispatch(state, ClientSpec(0, 2, 1), 0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(AggregationError, match="got ranks \\[8\\]"):
        method.aggregate(state, [ClientUpdate(0, 4, 1, rand_factors(g, 4)), ClientUpdate(1, 8, 1, rand_factors(g, 8))])


def test_lorafair_correction_is_the_regularised_least_squares_optimum() -> None:
    lam = 0.1
    lf = make_method("lorafair", lam=lam)
    state = lf.init_state(SHAPES, 3)
    g = torch.Generator().manual_seed(8)
    ups = [ClientUpdate(c, 3, n, rand_factors(g, 3, torch.float64)) for c, n in enumerate([1, 2, 3])]
    new = lf.aggregate(state, ups)
    p = [1 / 6, 2 / 6, 3 / 6]
    for name in SHAPES:
        A_bar = sum(pk * u.factors[name].A for pk, u in zip(p, ups))
        B_bar = sum(pk * u.factors[name].B for pk, u in zip(p, ups))
        ideal = sum(pk * u.factors[name].B @ u.factors[name].A for pk, u in zip(p, ups))
        assert torch.allclose(new.factors[name].A, A_bar)
        dB = new.factors[name].B - B_bar
        # stationarity of ‖ideal − (B̄+ΔB)Ā‖² + λ‖ΔB‖²: (ideal − (B̄+ΔB)Ā)Āᵀ = λΔB
        grad = (ideal - (B_bar + dB) @ A_bar) @ A_bar.T - lam * dB
        assert float(grad.abs().max()) < 1e-9
        naive = torch.linalg.matrix_norm(ideal - B_bar @ A_bar)
        assert torch.linalg.matrix_norm(ideal - new.factors[name].B @ A_bar) < naive


def test_ffa_keeps_a_frozen_and_rejects_changed_a() -> None:
    ffa = make_method("ffa")
    state = ffa.init_state(SHAPES, 4)
    g = torch.Generator().manual_seed(9)
    ups = [trained(ffa, state, ClientSpec(c, r, 1), g) for c, r in enumerate([2, 4])]
    new = ffa.aggregate(state, ups)
    for name, f in state.factors.items():
        assert torch.equal(new.factors[name].A, f.A)
        torch.testing.assert_close(new.factors[name].B[:, 2:], ups[1].factors[name].B[:, 2:])
    bad = ClientUpdate(0, 2, 1, {k: LoraFactors(f.B, f.A + 1) for k, f in ups[0].factors.items()})
    with pytest.raises(AggregationError, match="frozen A"):
        ffa.aggregate(state, [bad])


def test_fedsa_persists_client_b_and_shares_only_a() -> None:
    fs = make_method("fedsa")
    state = fs.init_state(SHAPES, 4)
    g = torch.Generator().manual_seed(10)
    u = trained(fs, state, ClientSpec(0, 4, 1), g)
    local = fs.local_state(u)
    new = fs.aggregate(state, [u])
    a = fs.dispatch(new, ClientSpec(0, 4, 1), 1, local)
    for name, f in a.factors.items():
        assert torch.equal(f.B, u.factors[name].B) and torch.equal(f.A, u.factors[name].A)
    assert a.download_params == sum(4 * n for _, n in SHAPES.values())
    with pytest.raises(AggregationError, match="persisted B"):
        fs.dispatch(new, ClientSpec(0, 2, 1), 1, local)


def test_hetlora_self_pruning() -> None:
    pr = HetLoRAPruning(reg=0.5, gamma=0.5, threshold=0.05)
    g = torch.Generator().manual_seed(11)
    B, A = torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)
    assert pr.keep(4) == 2
    torch.testing.assert_close(
        pr.penalty(B, A), 0.5 * torch.linalg.matrix_norm(B[:, 2:]) * torch.linalg.matrix_norm(A[2:])
    )
    assert pr.pruned_rank([LoraFactors(B, A)]) == 4
    B2 = B.clone()
    B2[:, 2:] *= 1e-3
    assert pr.pruned_rank([LoraFactors(B2, A)]) == 2
    assert pr.pruned_rank([LoraFactors(B2, A), LoraFactors(B, A)]) == 4  # every layer must agree
    with pytest.raises(ValueError, match="gamma"):
        HetLoRAPruning(gamma=1.0)


def test_weights_default_to_data_share_and_reject_bad_values() -> None:
    g = torch.Generator().manual_seed(12)
    ups = [ClientUpdate(c, 2, n, rand_factors(g, 2)) for c, n in enumerate([1, 3])]
    torch.testing.assert_close(normalized_weights(ups), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(normalized_weights(ups, [2, 2]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(AggregationError, match="empty round"):
        normalized_weights([])
    with pytest.raises(AggregationError, match=">= 0"):
        normalized_weights(ups, [-1, 2])
    with pytest.raises(AggregationError, match="sum to 0"):
        normalized_weights([ClientUpdate(0, 2, 0, ups[0].factors)])
    with pytest.raises(AggregationError, match="missing"):
        FedIT().aggregate(
            FedIT().init_state(SHAPES, 2), [ClientUpdate(0, 2, 1, {"x": ups[0].factors["layers.0.q_proj"]})]
        )


def test_flexlora_components_keeps_the_top_k_and_dispatches_identically() -> None:
    g = torch.Generator().manual_seed(13)
    ups = [
        ClientUpdate(c, r, n, rand_factors(g, r, torch.float64)) for c, (r, n) in enumerate([(2, 5), (8, 15), (4, 30)])
    ]
    full, top = FlexLoRA(), FlexLoRA(components=4)
    s_full = full.aggregate(full.init_state(SHAPES, 8), ups)
    s_top = top.aggregate(top.init_state(SHAPES, 8), ups)
    assert all(s.rank == 4 for s in s_top.svd.values())
    for r in (1, 2, 4):
        a, b = full.dispatch(s_full, ClientSpec(0, r, 1), 1), top.dispatch(s_top, ClientSpec(0, r, 1), 1)
        for name in SHAPES:
            torch.testing.assert_close(
                a.factors[name].B @ a.factors[name].A, b.factors[name].B @ b.factors[name].A, atol=1e-9, rtol=1e-9
            )
    with pytest.raises(AggregationError, match="keeps 4 components; client 0 has rank 8"):
        top.dispatch(s_top, ClientSpec(0, 8, 1), 1)
    with pytest.raises(ValueError, match="components must be positive"):
        FlexLoRA(components=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_layers_names_the_layer_with_a_non_finite_factor(bad: float) -> None:
    from fedrank.aggregation.base import AggregationError, check_layers
    from fedrank.types import ClientUpdate, LoraFactors

    g = torch.Generator().manual_seed(0)
    f = {f"l{i}": LoraFactors(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for i in range(4)}
    check_layers(f, [ClientUpdate(0, 2, 1, f)])
    # finite factors whose sum overflows to inf: settled layer by layer, and accepted
    huge = {
        k: LoraFactors(torch.full_like(v.B, 3e38), torch.full_like(v.A, 3e38)) for k, v in f.items()
    }  # sums overflow
    check_layers(huge, [ClientUpdate(0, 2, 1, huge)])
    A = f["l2"].A.clone()
    A[1, 3] = bad
    broken = {**f, "l2": LoraFactors(f["l2"].B, A)}
    with pytest.raises(AggregationError, match="client 0: layer l2 has non-finite factors"):
        check_layers(f, [ClientUpdate(0, 2, 1, broken)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["A", "B"])
def test_flexlora_names_the_client_and_layer_with_a_non_finite_factor(bad: float, where: str) -> None:
    """FlexLoRA checks finiteness on its stacked copy (one sum per layer while it is in cache) and only then,
    on failure, client by client: the same AggregationError as ``check_layers``, naming client and layer."""
    from fedrank.aggregation.base import AggregationError

    method = FlexLoRA()
    shapes = {"l0": (6, 5), "l1": (6, 5), "l2": (4, 7)}
    state = method.init_state(shapes, 4)
    g = torch.Generator().manual_seed(0)
    ups = [
        ClientUpdate(
            c,
            r,
            10,
            {
                k: LoraFactors(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g))
                for k, (m, n) in shapes.items()
            },
        )
        for c, r in enumerate([2, 4, 3])
    ]
    method.aggregate(state, ups)
    f = ups[1].factors["l1"]
    B, A = f.B.clone(), f.A.clone()
    (A if where == "A" else B)[1, 0] = bad
    broken = ClientUpdate(1, 4, 10, {**ups[1].factors, "l1": LoraFactors(B, A)})
    with pytest.raises(AggregationError, match="client 1: layer l1 has non-finite factors"):
        method.aggregate(state, [ups[0], broken, ups[2]])
    # a client of weight 0 is checked too
    with pytest.raises(AggregationError, match="client 1: layer l1 has non-finite factors"):
        method.aggregate(state, [ups[0], broken, ups[2]], weights=[1.0, 0.0, 1.0])
    # finite factors whose stacked sums overflow (A's 1e37s; ΔW itself stays moderate): settled client by
    # client, and accepted
    huge = [
        ClientUpdate(
            u.client_id,
            u.rank,
            10,
            {k: LoraFactors(v.B * 1e-36, torch.full_like(v.A, 1e37)) for k, v in u.factors.items()},
        )
        for u in ups
    ]
    new = method.aggregate(state, huge)
    assert new.delta is not None and new.svd is not None
    assert all(torch.isfinite(s.U).all() and torch.isfinite(s.S).all() for s in new.svd.values())
