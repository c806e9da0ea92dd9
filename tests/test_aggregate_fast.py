"""The batched FlexLoRA routes (issue 12): every dispatched product equals the float64 best rank-r approximation,
on flat spectra (random factors), tied singular values and rank-deficient ΔW, for every route."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

from fedrank import lowrank
from fedrank.aggregation.flexlora import FlexLoRA
from fedrank.lowrank import (
    _dense_is_cheaper,
    _factored_gram_is_cheaper,
    _gram_is_cheaper,
    lora_scaling,
    stack_factors,
    stack_factors_batched,
    svd_of_product_batched,
    svd_of_sum,
    svd_of_sums_batched,
    truncate,
)
from fedrank.types import ClientSpec, ClientUpdate, LoraFactors

F64 = torch.float64


def random_batch(seed: int, L: int, m: int, n: int, ranks: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """L layers of random LoRA-like factors (a flat spectrum) stacked with random weights."""
    g = torch.Generator().manual_seed(seed)
    Bs = [[torch.randn(m, r, generator=g, dtype=dtype) * 0.01 for r in ranks] for _ in range(L)]
    As = [[(torch.rand(r, n, generator=g, dtype=dtype) * 2 - 1) / n**0.5 for r in ranks] for _ in range(L)]
    w = (torch.rand(len(ranks), generator=g, dtype=F64) + 0.5).tolist()
    return stack_factors_batched(Bs, As, w)


def best_rank(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


# (m, n, R, route): the predicate each case must satisfy, so that every route is exercised
TOP_CASES = [
    ((120, 90), [8, 16, 32, 16, 8, 32], "gram"),  # R = 112 >= min(m, n): Gram of ΔW's smaller side
    ((40, 300), [4, 8, 8, 16, 8], "factored"),  # wide, R > m: the Gram of ΔWᵀ from the factors, B(AAᵀ)Bᵀ
    ((400, 60), [8, 16, 32, 8], "factored"),  # tall, R > n: Aᵀ(BᵀB)A
    ((300, 200), [4, 8, 8, 16, 8], "core"),  # R = 44 << m, n: QR of the factors + the R×R core
]


def top_route(m: int, n: int, R: int) -> str:
    """Which top-k route :func:`svd_of_product_batched` takes."""
    if not _gram_is_cheaper(m, n, R):
        return "core"
    return "factored" if _factored_gram_is_cheaper(m, n, R) else "gram"


@pytest.mark.parametrize("shape,ranks,route", TOP_CASES)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-5)])
def test_top_route_dispatch_equals_float64_best_rank_r(
    shape: tuple[int, int], ranks: list[int], route: str, dtype: torch.dtype, tol: float
) -> None:
    m, n = shape
    R = sum(ranks)
    assert top_route(m, n, R) == route
    B, A = random_batch(1, 3, m, n, ranks, dtype)
    k = 8
    assert k + 16 < min(m, n, R), "the top-k route must run"
    U, S, Vh = svd_of_product_batched(B, A, rank=k)
    assert U.shape == (3, m, k) and S.shape == (3, k) and Vh.shape == (3, k, n) and U.dtype == dtype
    for i in range(3):
        dW = B[i].double() @ A[i].double()
        ref_S = torch.linalg.svdvals(dW)[:k]
        torch.testing.assert_close(S[i].double(), ref_S, rtol=tol, atol=0)
        for r in (1, 2, 4, k):
            Bt, At = truncate((U[i], S[i], Vh[i]), r, alpha=16.0)
            got = lora_scaling(16.0, r) * (Bt.double() @ At.double())
            assert rel(got, best_rank(dW, r)) < tol


@pytest.mark.parametrize("shape,R", [((120, 90), 112), ((300, 200), 44), ((40, 300), 44)])
def test_every_component_routes_match_dense_svd(shape: tuple[int, int], R: int) -> None:
    m, n = shape
    ranks = [R // 4] * 4
    B, A = random_batch(2, 2, m, n, ranks, F64)
    U, S, Vh = svd_of_product_batched(B, A)
    q = min(m, n, R)
    assert S.shape == (2, q)
    assert _dense_is_cheaper(m, n, R) == ((m, n) in [(120, 90), (40, 300)])
    for i in range(2):
        dW = B[i] @ A[i]
        torch.testing.assert_close((U[i] * S[i]) @ Vh[i], dW, atol=1e-10 * float(S[i, 0]), rtol=0)
        torch.testing.assert_close(S[i], torch.linalg.svdvals(dW)[:q], atol=1e-10 * float(S[i, 0]), rtol=0)


@pytest.mark.skipif(not lowrank._ONEDNN_MM, reason="this torch has no oneDNN matmul kernel")
@pytest.mark.parametrize("k", [96, 192])
def test_ut_transform_applies_q_as_ormqr_does(k: int) -> None:
    """Q·[X; 0] by the UT transform equals LAPACK's ``ormqr`` to float32 rounding, zero columns (τ = 0: an
    identity reflector) included, and Q·R gives back the factored matrix."""
    g = torch.Generator().manual_seed(4)
    L, m, R = 2, 700, 192
    M = torch.randn(L, m, R, generator=g)
    M[1, :, 5] = 0.0
    M[1, :, 100] = 0.0
    a, tau = torch.geqrf(M)
    assert int((tau[1] == 0).sum()) == 2 and bool((tau[0] != 0).all())
    X = torch.randn(L, R, k, generator=g, dtype=F64)
    Xp = torch.zeros(L, m, k)
    Xp[:, :R] = X.float()
    torch.testing.assert_close(lowrank._apply_q_ut(a, tau, X), torch.ormqr(a, tau, Xp), atol=2e-5, rtol=0)
    Q = lowrank._apply_q_ut(a, tau, torch.eye(R).expand(L, R, R))
    torch.testing.assert_close(Q.mT @ Q, torch.eye(R).expand(L, R, R), atol=2e-6, rtol=0)
    torch.testing.assert_close(Q @ a[:, :R].triu(), M, atol=2e-5, rtol=0)
    # rank 20 (most reflectors act on rounding noise) and an upper triangular input (every τ = 0: Q = I)
    low = torch.randn(m, 20, generator=g) @ torch.randn(20, R, generator=g)
    tri = torch.zeros(m, R)
    tri[:R] = torch.randn(R, R, generator=g).triu()
    a2, tau2 = torch.geqrf(torch.stack([low, tri]))
    assert bool((tau2[1] == 0).all())
    X2 = torch.randn(2, R, k, generator=g)
    Xp2 = torch.zeros(2, m, k)
    Xp2[:, :R] = X2
    got = lowrank._apply_q_ut(a2, tau2, X2)
    torch.testing.assert_close(got, torch.ormqr(a2, tau2, Xp2), atol=2e-5, rtol=0)
    assert torch.equal(got[1], Xp2[1]), "identity reflectors leave X as it is"


def test_core_svd_by_eigh_where_well_conditioned_else_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`lowrank._core_svd`: a batch of cores, each an exact SVD (orthonormal U and V, C = U·S·Vᵀ, S the
    singular values, descending). Well-conditioned cores, tied singular values included, go through
    ``eigh``; a rank-deficient one (clients with the same factors) never reaches it (its R diagonal shows
    it); ill-conditioned ones with an unremarkable R diagonal (Kahan-like, unit diagonal) are caught by
    their eigenvalues at the threshold (:data:`lowrank.CORE_EIGH_MIN_RATIO`) and a zero core (a layer nobody
    trained) by its zero eigenvalues. Only those take ``torch.linalg.svd``."""
    g = torch.Generator().manual_seed(9)
    m, n, R = 300, 260, 40
    B = torch.randn(6, m, R, generator=g)
    A = torch.rand(6, R, n, generator=g) * 2 - 1
    q0 = torch.linalg.qr(torch.randn(m, R, generator=g))[0]
    q1 = torch.linalg.qr(torch.randn(n, R, generator=g))[0]
    B[0, :, 20:] = B[0, :, :20]  # the same client twice
    A[0, 20:] = A[0, :20]
    B[2] = q0 * torch.tensor([3.0] * 10 + [1.0] * 30)  # tied singular values (10 of them, then 30)
    A[2] = q1.mT

    def kahan(c: float) -> torch.Tensor:  # unit diagonal, condition number (1 + c)^R or so
        return torch.eye(R) - c * torch.ones(R, R).triu(1)

    B[3], A[3] = q0 @ kahan(0.18), q1.mT  # λ_min/λ_max about 5e-7: under the threshold
    B[4], A[4] = q0 @ kahan(0.15), q1.mT  # about 6e-6: just over it
    B[5] = 0.0
    hb, ha, core = lowrank._qr_core(B, A)
    ratio = [float(s[-1] / s[0]) ** 2 for s in torch.linalg.svdvals(core[3:5])]
    assert ratio[0] < lowrank.CORE_EIGH_MIN_RATIO < ratio[1] < 1e-5
    eighs: list[int] = []
    svds: list[int] = []
    eigh, svd = torch.linalg.eigh, torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "eigh", lambda G: eighs.append(G.shape[0]) or eigh(G))
    monkeypatch.setattr(torch.linalg, "svd", lambda C: svds.append(C.shape[0]) or svd(C))
    U, S, Vh = lowrank._core_svd(core, hb, ha)
    assert eighs == [5] and svds == [3], "cores 1-5 reach eigh, 0 never does; 0, 3 and 5 take the SVD"
    eye = torch.eye(R, dtype=F64)
    assert bool(torch.isfinite(U).all()) and float(S[5].abs().max()) == 0.0
    for i in range(6):
        ref = torch.linalg.svdvals(core[i])
        assert bool((S[i][:-1] >= S[i][1:]).all())
        torch.testing.assert_close(S[i], ref, atol=1e-12 * float(ref[0]) + 1e-300, rtol=0)
        torch.testing.assert_close(U[i].mT @ U[i], eye, atol=1e-9, rtol=0)
        torch.testing.assert_close(Vh[i] @ Vh[i].mT, eye, atol=1e-12, rtol=0)
        torch.testing.assert_close((U[i] * S[i]) @ Vh[i], core[i], atol=1e-12 * float(ref[0]) + 1e-300, rtol=0)
    assert float(S[2, 0] - S[2, 9]) < 1e-6 * float(S[2, 0]), "core 2 has 10 tied values (to float32's QR)"
    # the public route with a zero factor: finite, orthonormal, S = 0 (``truncate`` then sends zeros)
    U0, S0, Vh0 = svd_of_product_batched(torch.zeros(1, 2000, 40), torch.randn(1, 40, 1500, generator=g))
    assert bool(torch.isfinite(U0).all() and torch.isfinite(Vh0).all()) and float(S0.abs().max()) == 0.0
    torch.testing.assert_close(U0[0].mT @ U0[0], torch.eye(40), atol=1e-5, rtol=0)


def test_every_component_takes_the_ut_transform_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tall float32 layer's every-component SVD rotates its large side by the UT transform and its small
    side by ``ormqr`` (:func:`lowrank._apply_q`), and matches the float64 SVD of ΔW."""
    calls: list[tuple[int, ...]] = []
    ut = lowrank._apply_q_ut

    def counted(a: torch.Tensor, tau: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(a.shape))
        return ut(a, tau, X)

    monkeypatch.setattr(lowrank, "_apply_q_ut", counted)
    m, n, ranks = 4096, 300, [32, 32, 64]
    B, A = random_batch(6, 1, m, n, ranks, torch.float32)
    assert not _dense_is_cheaper(m, n, sum(ranks))
    U, S, Vh = svd_of_product_batched(B, A)
    assert calls == ([(1, m, sum(ranks))] if lowrank._ONEDNN_MM else [])
    dW = B[0].double() @ A[0].double()
    ref = torch.linalg.svdvals(dW)
    torch.testing.assert_close(S[0].double(), ref[: S.shape[1]], atol=2e-6 * float(ref[0]), rtol=0)
    assert rel((U[0].double() * S[0].double()) @ Vh[0].double(), dW) < 2e-6
    eye = torch.eye(S.shape[1], dtype=F64)
    torch.testing.assert_close(U[0].double().mT @ U[0].double(), eye, atol=2e-6, rtol=0)


def tied_clients(m: int, n: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Five rank-8 clients whose sum has singular values with exact ties: 5 (×4), 4 (×4), 3 (×8), 2 (×8), 1 (×16)."""
    g = torch.Generator().manual_seed(5)
    U0, _ = torch.linalg.qr(torch.randn(m, 40, generator=g, dtype=F64))
    V0, _ = torch.linalg.qr(torch.randn(n, 40, generator=g, dtype=F64))
    s = torch.tensor([5.0] * 4 + [4.0] * 4 + [3.0] * 8 + [2.0] * 8 + [1.0] * 16, dtype=F64)
    perm = torch.randperm(40, generator=g)  # each client holds a mix of levels
    Bs = [(U0[:, perm[i : i + 8]] * s[perm[i : i + 8]]).to(dtype) for i in range(0, 40, 8)]
    As = [V0[:, perm[i : i + 8]].T.to(dtype) for i in range(0, 40, 8)]
    return Bs, As, s


TIE_SHAPES = [((150, 120), "core"), ((60, 400), "core"), ((400, 300), "core"), ((44, 44), "gram")]
TIE_SHAPES += [((44, 300), "factored"), ((300, 44), "factored")]


@pytest.mark.parametrize("shape,route", TIE_SHAPES)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-6)])
def test_ties_keep_the_eckart_young_optimum(shape: tuple[int, int], route: str, dtype: torch.dtype, tol: float) -> None:
    """Where a cut falls between tied values the best rank-r approximation is unique and must match; where it
    splits a tie, any choice is optimal: the error must equal the tail energy Σ_{i>r} σ_i²."""
    m, n = shape
    assert top_route(m, n, 40) == route
    Bs, As, s = tied_clients(m, n, dtype)
    dW = sum(B.double() @ A.double() for B, A in zip(Bs, As, strict=True))
    U, S, Vh = svd_of_sum(Bs, As, [1.0] * 5, rank=12)
    torch.testing.assert_close(S.double(), s[:12], atol=tol * 5, rtol=0)
    for r in (1, 2, 4, 6, 8, 12):
        approx = (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()
        if r in (4, 8):  # cut between tie levels: unique
            assert rel(approx, best_rank(dW, r)) < tol
        err = float(torch.linalg.matrix_norm(dW - approx) ** 2)
        tail = float((s[r:] ** 2).sum())
        assert abs(err - tail) <= tol * float((s**2).sum())
        assert int(torch.linalg.matrix_rank(approx, atol=1e-3)) == r


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "shape,route",
    [((150, 120), "core"), ((300, 200), "core"), ((36, 36), "gram"), ((40, 300), "factored"), ((300, 40), "factored")],
)
def test_rank_deficient_and_zero_delta(dtype: torch.dtype, shape: tuple[int, int], route: str) -> None:
    m, n = shape
    assert top_route(m, n, 36) == route
    g = torch.Generator().manual_seed(9)
    B1, A1 = torch.randn(m, 6, generator=g, dtype=dtype), torch.randn(6, n, generator=g, dtype=dtype)
    # six copies of one rank-6 client: R = 36, rank ΔW = 6 < the 8 components asked for
    U, S, Vh = svd_of_sum([B1] * 6, [A1] * 6, [1 / 6] * 6, rank=8)
    dW = B1.double() @ A1.double()
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    tol = 1e-10 if dtype == F64 else 2e-5
    assert rel((U.double() * S.double()) @ Vh.double(), dW) < tol
    assert float(S[6:].abs().max()) <= tol * float(S[0])
    for r in (2, 6, 8):
        B, A = truncate((U, S, Vh), r, alpha=8.0)
        assert rel(lora_scaling(8.0, r) * B.double() @ A.double(), best_rank(dW, r)) < tol
    # all weights zero: ΔW = 0, every triplet finite, S = 0
    U, S, Vh = svd_of_sum([B1] * 6, [A1] * 6, [0.0] * 6, rank=8)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all() and float(S.abs().max()) == 0.0


def test_list_api_groups_by_shape_and_keeps_order() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(50, 40), (30, 70), (50, 40), (30, 70), (50, 40)]
    Bs = [torch.randn(m, 36, generator=g, dtype=F64) for m, _ in shapes]
    As = [torch.randn(36, n, generator=g, dtype=F64) for _, n in shapes]
    got = svd_of_sums_batched(Bs, As, rank=5)
    assert len(got) == len(shapes)
    for (U, S, Vh), B, A in zip(got, Bs, As, strict=True):
        assert U.shape == (B.shape[0], 5) and Vh.shape == (5, A.shape[1])
        torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:5], rtol=1e-10, atol=0)
        assert rel((U * S) @ Vh, best_rank(B @ A, 5)) < 1e-10


def test_stack_factors_batched_is_stack_factors_per_layer() -> None:
    g = torch.Generator().manual_seed(4)
    ranks, w = [2, 5, 3], [0.25, 1.5, 0.75]
    Bs = [[torch.randn(7, r, generator=g) for r in ranks] for _ in range(4)]
    As = [[torch.randn(r, 9, generator=g) for r in ranks] for _ in range(4)]
    B, A = stack_factors_batched(Bs, As, w)
    assert B.shape == (4, 7, 10) and A.shape == (4, 10, 9)
    for i in range(4):
        Bi, Ai = stack_factors(Bs[i], As[i], w)
        assert torch.equal(B[i], Bi) and torch.equal(A[i], Ai)
        exact = sum(wk * Bk.double() @ Ak.double() for wk, Bk, Ak in zip(w, Bs[i], As[i], strict=True))
        torch.testing.assert_close(B[i].double() @ A[i].double(), exact, atol=1e-5, rtol=1e-5)


SHAPES = {"l0.q": (96, 80), "l1.q": (96, 80), "l0.down": (80, 200), "l1.down": (80, 200), "l0.k": (24, 80)}


def updates(ranks: list[int], dtype: torch.dtype) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(21)
    ups = []
    for c, r in enumerate(ranks):
        f = {
            k: LoraFactors(
                torch.randn(m, r, generator=g, dtype=dtype) * 0.01, torch.randn(r, n, generator=g, dtype=dtype)
            )
            for k, (m, n) in SHAPES.items()
        }
        ups.append(ClientUpdate(c, r, 10 + 7 * c, f))
    return ups


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-5)])
def test_flexlora_round_dispatches_best_rank_r_and_keeps_delta_exactly(dtype: torch.dtype, tol: float) -> None:
    ranks = [4, 8, 16, 8, 4, 16, 2]
    ups = updates(ranks, dtype)
    fx = FlexLoRA(alpha=16.0)
    state = fx.init_state(SHAPES, 16)
    new = fx.aggregate(state, ups)
    assert new.delta is not None and new.svd is not None
    p = torch.tensor([u.num_examples for u in ups], dtype=F64)
    p = p / p.sum()
    dW = {
        k: sum(
            float(pk) * lora_scaling(16.0, u.rank) * u.factors[k].B.double() @ u.factors[k].A.double()
            for pk, u in zip(p, ups, strict=True)
        )
        for k in SHAPES
    }
    for k in SHAPES:  # ΔW kept exactly, and only the components a client may need
        assert new.delta[k].rank == sum(ranks) and new.svd[k].rank == min(16, *SHAPES[k])
        assert rel(new.delta[k].B.double() @ new.delta[k].A.double(), dW[k]) < (1e-14 if dtype == F64 else 1e-6)
    for r in sorted(set(ranks)):
        a = fx.dispatch(new, ClientSpec(0, r, 1), 1)
        for k in SHAPES:
            f = a.factors[k]
            assert f.B.shape == (SHAPES[k][0], r) and f.A.shape == (r, SHAPES[k][1])
            assert rel(a.scaling * f.B.double() @ f.A.double(), best_rank(dW[k], r)) < tol
    gm = fx.global_model(new)
    assert gm.rank == sum(ranks)
    for k in SHAPES:
        assert rel(gm.scaling * gm.factors[k].B.double() @ gm.factors[k].A.double(), dW[k]) < 10 * tol
    # a rank beyond the kept components comes from ΔW itself
    wide = fx.global_model(new, 40)
    for k in SHAPES:
        f = wide.factors[k]
        assert rel(wide.scaling * f.B.double() @ f.A.double(), best_rank(dW[k], 40)) < tol
    # components=k keeps only the top k (no ΔW) and dispatches the same products
    top = FlexLoRA(alpha=16.0, components=16).aggregate(state, ups)
    assert top.delta is None
    b = FlexLoRA(alpha=16.0, components=16).dispatch(top, ClientSpec(0, 8, 1), 1)
    a = fx.dispatch(new, ClientSpec(0, 8, 1), 1)
    for k in SHAPES:
        torch.testing.assert_close(b.factors[k].B @ b.factors[k].A, a.factors[k].B @ a.factors[k].A)


def test_dispatch_gives_clients_of_one_rank_the_same_truncation_and_scaling() -> None:
    """Clients of one rank receive the same truncation, bit for bit, each in a dict of its own; while one
    holds it, another of its rank shares its tensors; once none does, the state keeps nothing (a weak memo)
    and the next client gets a new truncation, equal to the first. Another α gives the same product."""
    ups = updates([4, 8, 4, 8], torch.float32)
    fx = FlexLoRA(alpha=16.0)
    new = fx.aggregate(fx.init_state(SHAPES, 8), ups)
    a, b = fx.dispatch(new, ClientSpec(0, 4, 1), 1), fx.dispatch(new, ClientSpec(2, 4, 1), 1)
    assert a.factors is not b.factors and a.factors.keys() == b.factors.keys() == SHAPES.keys()
    assert all(a.factors[k] is b.factors[k] for k in SHAPES), "a rank's factors held by a client are shared"
    c = fx.dispatch(new, ClientSpec(1, 8, 1), 1)
    assert all(c.factors[k].rank == 8 for k in SHAPES)
    first = {k: (f.B.clone(), f.A.clone()) for k, f in a.factors.items()}
    a.factors.clear()  # a client's dict is its own
    assert b.factors.keys() == SHAPES.keys()
    del a, b, c
    gc.collect()
    assert len(new.dispatched) == 0, "no factor outlives the clients that hold it"
    held = fx.dispatch(new, ClientSpec(3, 4, 1), 1)
    for copied in (pickle.loads(pickle.dumps(new)), copy.deepcopy(new)):  # the memo is left out
        assert len(copied.dispatched) == 0 and len(new.dispatched) == len(SHAPES)
        assert torch.equal(copied.svd[next(iter(SHAPES))].S, new.svd[next(iter(SHAPES))].S)
    del held
    again = fx.dispatch(new, ClientSpec(3, 4, 1), 1)
    assert all(
        torch.equal(again.factors[k].B, first[k][0]) and torch.equal(again.factors[k].A, first[k][1]) for k in SHAPES
    )
    b = again
    other = FlexLoRA(alpha=32.0).dispatch(new, ClientSpec(0, 4, 1), 1)
    for k in SHAPES:  # the same product ΔW_4 under either scaling
        torch.testing.assert_close(
            other.scaling * other.factors[k].B @ other.factors[k].A, b.scaling * b.factors[k].B @ b.factors[k].A
        )


# The Krylov route of the top eigenvectors (lowrank._top_eigvecs): Grams of at least 3·KRYLOV_DIM·l rows.
KRYLOV_SHAPES = [((400, 360), [64, 64, 96, 96, 64], "gram"), ((900, 320), [32] * 10, "factored")]


@pytest.mark.parametrize("shape,ranks,route", KRYLOV_SHAPES)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-5)])
def test_krylov_route_dispatch_equals_float64_best_rank_r(
    shape: tuple[int, int], ranks: list[int], route: str, dtype: torch.dtype, tol: float
) -> None:
    m, n = shape
    assert top_route(m, n, sum(ranks)) == route
    k = 8
    assert 3 * lowrank.KRYLOV_DIM * (k + 16) <= min(m, n), "the Krylov route must run"
    B, A = random_batch(3, 2, m, n, ranks, dtype)
    U, S, Vh = svd_of_product_batched(B, A, rank=k)
    for i in range(2):
        dW = B[i].double() @ A[i].double()
        torch.testing.assert_close(S[i].double(), torch.linalg.svdvals(dW)[:k], rtol=tol, atol=0)
        for r in (1, 3, 4, k):
            Bt, At = truncate((U[i], S[i], Vh[i]), r, alpha=16.0)
            assert rel(lora_scaling(16.0, r) * (Bt.double() @ At.double()), best_rank(dW, r)) < tol


def test_krylov_eigvecs_span_the_top_eigenvectors_without_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 spectrum as flat as SmolLM2's rounds (σ_i = 1/(1 + i/50)): the Krylov vectors pass their checks
    (no eigh of the whole matrix) and span the top k eigenvectors to float32 precision."""
    g = torch.Generator().manual_seed(4)
    W, _ = torch.linalg.qr(torch.randn(3, 400, 400, generator=g, dtype=F64))
    lam = (1.0 / (1.0 + torch.arange(400, dtype=F64) / 50)) ** 2
    G = ((W * lam) @ W.mT).float()
    calls: list[int] = []
    eigh = torch.linalg.eigh

    def spy(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(M.shape[-1])
        return eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    V = lowrank._top_eigvecs(G, 24, 8)
    assert 400 not in calls
    _, W = eigh(G.double())
    for i in range(3):
        top = W[i][:, -8:]
        assert float(torch.linalg.matrix_norm(top - V[i].double() @ (V[i].double().mT @ top), ord=2)) < 1e-4


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_krylov_route_ties_beyond_a_block_and_rank_deficiency(dtype: torch.dtype) -> None:
    """A tie of multiplicity 12 > KRYLOV_BLOCK at the top, and ΔW of rank 6 < the Krylov dimension: the checks
    send both to eigh, and the dispatched products stay the best rank-r approximations."""
    m, n = 400, 380
    g = torch.Generator().manual_seed(6)
    U0, _ = torch.linalg.qr(torch.randn(m, 100, generator=g, dtype=F64))
    V0, _ = torch.linalg.qr(torch.randn(n, 100, generator=g, dtype=F64))
    s = torch.cat([torch.full((12,), 5.0, dtype=F64), torch.linspace(3.0, 0.1, 88, dtype=F64)])
    assert lowrank.KRYLOV_BLOCK < 12
    Bs = [(U0[:, i : i + 10] * s[i : i + 10]).to(dtype) for i in range(0, 100, 10)]
    As = [V0[:, i : i + 10].T.to(dtype) for i in range(0, 100, 10)]
    tol = 1e-10 if dtype == F64 else 2e-5
    U, S, Vh = svd_of_sum(Bs, As, [1.0] * 10, rank=16)
    dW = (U0 * s) @ V0.T
    torch.testing.assert_close(S.double(), s[:16], atol=tol * 5, rtol=0)
    for r in (12, 16):  # cuts below the tie: unique
        approx = (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()
        assert rel(approx, best_rank(dW, r)) < tol
    B1, A1 = torch.randn(m, 6, generator=g, dtype=dtype), torch.randn(6, n, generator=g, dtype=dtype)
    U, S, Vh = svd_of_sum([B1] * 60, [A1] * 60, [1 / 60] * 60, rank=8)  # R = 360 >= the Gram route's bound
    dW = B1.double() @ A1.double()
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert rel((U.double() * S.double()) @ Vh.double(), dW) < tol
    assert float(S[6:].abs().max()) <= tol * float(S[0])


@pytest.mark.parametrize("rank", [48, 20, 0])
def test_top_svd_wide_equals_the_svd(rank: int) -> None:
    """The Rayleigh–Ritz step's SVD of the wide l×n projection through QR + an l×l SVD: the same top triplets
    as ``torch.linalg.svd``, on full rank, rank-deficient and zero matrices, with a tie at the cut."""
    g = torch.Generator().manual_seed(3)
    L, l, n, k = 3, 48, 200, 32
    S = torch.linspace(2.0, 1.0, l, dtype=F64)
    S[28:36] = S[32].item()  # a tie across the cut at k = 32
    S[rank:] = 0.0
    U = torch.linalg.qr(torch.randn(L, l, l, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(L, n, l, generator=g, dtype=F64))[0]
    Z = (U * S) @ V.mT
    Uk, Sk, Vhk = lowrank._top_svd_wide(Z, k)
    assert Uk.shape == (L, l, k) and Sk.shape == (L, k) and Vhk.shape == (L, k, n)
    Sr = torch.linalg.svdvals(Z)[..., :k]
    torch.testing.assert_close(Sk, Sr, atol=1e-12, rtol=1e-12)
    for i in range(L):  # a tie at the cut makes the best rank-k product non-unique: its error is unique
        got = (Uk[i] * Sk[i]) @ Vhk[i]
        optimum = S[k:].square().sum().sqrt()
        torch.testing.assert_close(torch.linalg.matrix_norm(Z[i] - got), optimum, atol=1e-12, rtol=0)
    torch.testing.assert_close(Uk.mT @ Uk, torch.eye(k, dtype=F64).expand(L, k, k), atol=1e-12, rtol=0)
