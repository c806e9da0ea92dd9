"""Properties of the pure-torch linear algebra (hypothesis where it fits)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.lowrank import (
    LowRankSVD,
    _dense_is_cheaper,
    lora_scaling,
    pad_rank,
    stack_factors,
    svd_of_sum,
    svdvals_of_sum,
    truncate,
    truncate_rank,
)


def clients(seed: int, m: int, n: int, ranks: list[int], dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=g, dtype=dtype) for r in ranks]
    As = [torch.randn(r, n, generator=g, dtype=dtype) for r in ranks]
    w = torch.rand(len(ranks), generator=g, dtype=dtype).tolist()
    return Bs, As, w


def dense_sum(Bs, As, w):
    return sum(wk * (B.double() @ A.double()) for wk, B, A in zip(w, Bs, As, strict=True))


def check_svd(U, S, Vh, target, rtol):
    q = S.shape[0]
    ref = torch.linalg.svdvals(target)
    scale = float(ref[0]) if float(ref[0]) > 0 else 1.0
    assert U.shape == (target.shape[0], q) and Vh.shape == (q, target.shape[1])
    assert torch.all(S[:-1] >= S[1:] - 1e-6 * scale), "singular values must be descending"
    torch.testing.assert_close(S.double(), ref[:q], atol=rtol * scale, rtol=0)
    recon = (U.double() * S.double()) @ Vh.double()
    torch.testing.assert_close(recon, target, atol=rtol * scale, rtol=0)
    nz = S.double() > 1e-6 * scale  # orthonormality holds for the components that carry energy
    eye = torch.eye(int(nz.sum()), dtype=torch.float64)
    torch.testing.assert_close(U.double()[:, nz].T @ U.double()[:, nz], eye, atol=rtol * 10, rtol=0)
    torch.testing.assert_close(Vh.double()[nz] @ Vh.double()[nz].T, eye, atol=rtol * 10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(1, 80),
    n=st.integers(1, 80),
    ranks=st.lists(st.integers(1, 12), min_size=1, max_size=6),
)
def test_svd_of_sum_equals_dense_svd(seed: int, m: int, n: int, ranks: list[int]) -> None:
    Bs, As, w = clients(seed, m, n, ranks)
    U, S, Vh = svd_of_sum(Bs, As, w)
    assert S.shape[0] == min(sum(ranks), m, n)
    check_svd(U, S, Vh, dense_sum(Bs, As, w), rtol=1e-9)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_qr_path_matches_dense_svd_and_subspaces(dtype: torch.dtype, rtol: float) -> None:
    m, n, ranks = 300, 200, [4, 8, 2, 16]
    assert not _dense_is_cheaper(m, n, sum(ranks)), "this test must exercise the QR route"
    Bs, As, w = clients(1, m, n, ranks, dtype)
    U, S, Vh = svd_of_sum(Bs, As, w)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    target = dense_sum(Bs, As, w)
    check_svd(U, S, Vh, target, rtol)
    # Subspaces agree with the dense SVD up to sign: |<u_i, u_i_ref>| = 1 for separated values.
    Ur, Sr, Vhr = torch.linalg.svd(target, full_matrices=False)
    gaps = (Sr[:-1] - Sr[1:])[: S.shape[0] - 1] / Sr[0]
    sep = [i for i in range(S.shape[0] - 1) if gaps[i] > 1e-3 and (i == 0 or gaps[i - 1] > 1e-3)]
    assert sep, "random data should have separated singular values"
    cos_u = (U.double()[:, sep] * Ur[:, sep]).sum(0).abs()
    cos_v = (Vh.double()[sep] * Vhr[sep]).sum(1).abs()
    torch.testing.assert_close(cos_u, torch.ones_like(cos_u), atol=100 * rtol, rtol=0)
    torch.testing.assert_close(cos_v, torch.ones_like(cos_v), atol=100 * rtol, rtol=0)


@pytest.mark.parametrize("case", ["zero_weights", "zero_factors", "duplicates", "single", "some_zero_weight"])
def test_svd_of_sum_degenerate_inputs(case: str) -> None:
    m, n = 120, 90
    Bs, As, w = clients(3, m, n, [3, 5, 4])
    if case == "zero_weights":
        w = [0.0, 0.0, 0.0]
    elif case == "zero_factors":
        Bs = [torch.zeros_like(B) for B in Bs]
    elif case == "duplicates":
        Bs, As, w = [Bs[0]] * 3, [As[0]] * 3, [0.2, 0.3, 0.5]
    elif case == "single":
        Bs, As, w = Bs[:1], As[:1], [2.0]
    else:
        w = [0.0, 1.0, 0.5]
    U, S, Vh = svd_of_sum(Bs, As, w)
    target = dense_sum(Bs, As, w)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    torch.testing.assert_close((U * S) @ Vh, target, atol=1e-9, rtol=0)
    if case in ("zero_weights", "zero_factors"):
        assert float(S.abs().max()) == 0.0
    if case == "duplicates":
        assert int((1e-9 * S[0] < S).sum()) == 3, "three copies of one rank-3 client span rank 3"


@pytest.mark.parametrize(
    "m,n,ranks",
    [(300, 200, [4, 8, 2, 16]), (200, 300, [4, 8, 2, 16]), (40, 30, [12, 12, 12]), (20, 90, [4, 30])],
    ids=["qr-route", "qr-route-wide", "dense-route", "dense-wide"],
)
@pytest.mark.parametrize("case", ["random", "duplicates", "zero_weights"])
def test_svdvals_of_sum_are_svd_of_sums_values(m: int, n: int, ranks: list[int], case: str) -> None:
    """The values alone, by the same route as :func:`svd_of_sum` (QR + core, or ΔW where cheaper), equal its S
    and ΔW's singular values in float64, rank-deficient and zero ΔW included."""
    Bs, As, w = clients(5, m, n, ranks)
    if case == "duplicates":  # ΔW of the last client's rank however many copies
        Bs, As = [Bs[-1]] * len(ranks), [As[-1]] * len(ranks)
    if case == "zero_weights":
        w = [0.0] * len(ranks)
    assert _dense_is_cheaper(m, n, sum(B.shape[1] for B in Bs)) == (max(m, n) != 300), "each route is exercised"
    S = svdvals_of_sum(Bs, As, w)
    assert S.dtype == torch.float64 and S.shape == (min(m, n, sum(B.shape[1] for B in Bs)),)
    torch.testing.assert_close(S, svd_of_sum(Bs, As, w)[1], atol=1e-10 * max(float(S[0]), 1.0), rtol=0)
    ref = torch.linalg.svdvals(dense_sum(Bs, As, w))[: S.shape[0]]
    torch.testing.assert_close(S, ref, atol=1e-10 * max(float(ref[0]), 1.0), rtol=0)
    if case == "zero_weights":
        assert float(S.abs().max()) == 0.0
    if case == "duplicates":
        assert int((1e-9 * S[0] < S).sum()) == min(ranks[-1], m, n)


def test_svdvals_of_sum_in_float32_keeps_the_input_dtype() -> None:
    Bs, As, w = clients(8, 300, 200, [4, 8, 16], torch.float32)
    S = svdvals_of_sum(Bs, As, w)
    ref = torch.linalg.svdvals(dense_sum(Bs, As, w))[: S.shape[0]]
    assert S.dtype == torch.float32
    torch.testing.assert_close(S.double(), ref, atol=2e-6 * float(ref[0]), rtol=0)


def test_svd_of_sum_rejects_bad_input() -> None:
    Bs, As, w = clients(0, 10, 8, [2, 3])
    with pytest.raises(ValueError, match="at least one client"):
        svd_of_sum([], [], [])
    with pytest.raises(ValueError, match="differ in length"):
        svd_of_sum(Bs, As, [1.0])
    with pytest.raises(ValueError, match="not LoRA factors"):
        svd_of_sum([Bs[0], Bs[1]], [As[1], As[0]], w)
    with pytest.raises(ValueError, match="layer shape"):
        svd_of_sum([Bs[0], torch.zeros(11, 3)], As, w)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 10), alpha=st.floats(1, 64), rslora=st.booleans())
def test_truncate_is_eckart_young_optimal(seed: int, r: int, alpha: float, rslora: bool) -> None:
    Bs, As, w = clients(seed, 60, 50, [4, 6, 8])
    U, S, Vh = svd_of_sum(Bs, As, w)
    target = dense_sum(Bs, As, w)
    B, A = truncate((U, S, Vh), r, alpha, rslora)
    assert B.shape == (60, r) and A.shape == (r, 50)
    approx = lora_scaling(alpha, r, rslora) * (B @ A)
    err = torch.linalg.matrix_norm(target - approx) ** 2
    tail = (S[r:] ** 2).sum()
    torch.testing.assert_close(err, tail, atol=1e-8 * float(S[0]) ** 2, rtol=1e-8)
    # Any other rank-r matrix does no better (here: a random one and a perturbed optimum).
    g = torch.Generator().manual_seed(seed)
    other = (B + 1e-3 * torch.randn(B.shape, generator=g, dtype=B.dtype)) @ A
    assert torch.linalg.matrix_norm(target - lora_scaling(alpha, r, rslora) * other) ** 2 >= err - 1e-9


def test_truncate_pads_when_svd_has_fewer_components() -> None:
    svd = LowRankSVD(
        torch.eye(5, 2, dtype=torch.float64),
        torch.tensor([3.0, 1.0], dtype=torch.float64),
        torch.eye(2, 4, dtype=torch.float64),
    )
    B, A = truncate(svd, 4, alpha=8.0)
    assert B.shape == (5, 4) and A.shape == (4, 4)
    torch.testing.assert_close(lora_scaling(8.0, 4) * B @ A, svd.dense())
    assert float(B[:, 2:].abs().sum()) == 0.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), r=st.integers(1, 8), extra=st.integers(0, 8))
def test_pad_then_truncate_is_identity(seed: int, r: int, extra: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(7, r, generator=g), torch.randn(r, 5, generator=g)
    Bp, Ap = pad_rank(B, A, r + extra)
    assert Bp.shape == (7, r + extra) and Ap.shape == (r + extra, 5)
    assert torch.equal(Bp @ Ap, B @ A) or torch.allclose(Bp @ Ap, B @ A, atol=1e-6)
    Bt, At = truncate_rank(Bp, Ap, r)
    assert torch.equal(Bt, B) and torch.equal(At, A)
    with pytest.raises(ValueError):
        pad_rank(B, A, r - 1) if r > 1 else truncate_rank(B, A, r + 1)


def test_stack_factors_product_is_exact_sum() -> None:
    Bs, As, w = clients(5, 20, 30, [1, 4, 2])
    B, A = stack_factors(Bs, As, w)
    assert B.shape == (20, 7) and A.shape == (7, 30)
    torch.testing.assert_close(B @ A, dense_sum(Bs, As, w), atol=1e-12, rtol=0)


def test_lora_scaling_is_the_one_formula() -> None:
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, rslora=True) == 8.0
    assert math.isclose(lora_scaling(16, 32, rslora=True), 16 / math.sqrt(32))
    with pytest.raises(ValueError, match="rank"):
        lora_scaling(16, 0)
    with pytest.raises(ValueError, match="alpha"):
        lora_scaling(0, 4)


@pytest.mark.parametrize("shape,ranks", [((200, 150), [60, 60, 60]), ((300, 200), [4, 8, 2, 16]), ((40, 90), [8] * 9)])
def test_top_rank_components_match_dense_svd(shape: tuple[int, int], ranks: list[int]) -> None:
    """svd_of_sum(rank=k) returns the top k triplets on both routes (dense Gram+Rayleigh–Ritz, and QR)."""
    m, n = shape
    Bs, As, w = clients(11, m, n, ranks, torch.float32)
    k = 6
    U, S, Vh = svd_of_sum(Bs, As, w, rank=k)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    target = dense_sum(Bs, As, w)
    Ur, Sr, Vhr = torch.linalg.svd(target, full_matrices=False)
    torch.testing.assert_close(S.double(), Sr[:k], rtol=1e-5, atol=0)
    for r in (1, 3, k):
        best = (Ur[:, :r] * Sr[:r]) @ Vhr[:r]
        got = (U[:, :r].double() * S[:r].double()) @ Vh[:r].double()
        assert float(torch.linalg.matrix_norm(got - best) / torch.linalg.matrix_norm(best)) < 1e-5
    with pytest.raises(ValueError, match="rank must be positive"):
        svd_of_sum(Bs, As, w, rank=0)
