"""Pure-torch linear algebra for heterogeneous-rank LoRA.

Everything here takes and returns tensors: no model, no file, no framework. The LoRA scaling
(α/r, or α/√r for rsLoRA) lives in exactly one function, :func:`lora_scaling`; every other piece of
the package calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "LowRankSVD",
    "energy_spectrum",
    "init_lora_factors",
    "lora_scaling",
    "pad_orthonormal",
    "pad_rank",
    "stack_factors",
    "stack_factors_batched",
    "svd_of_product_batched",
    "svd_of_sum",
    "svd_of_sums_batched",
    "svdvals_of_sum",
    "truncate",
    "truncate_rank",
]


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The multiplier of ``B @ A`` in a LoRA layer: α/r (Hu et al.) or α/√r (rsLoRA, Kalajdzievski 2023)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LowRankSVD:
    """A thin SVD ``U diag(S) Vh`` kept factored: memory O((m + n)·q), never m×n."""

    __slots__ = ("S", "U", "Vh")

    def __init__(self, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        if U.ndim != 2 or S.ndim != 1 or Vh.ndim != 2:
            raise ValueError("LowRankSVD needs U (m, q), S (q,), Vh (q, n)")
        if U.shape[1] != S.shape[0] or Vh.shape[0] != S.shape[0]:
            raise ValueError(f"inconsistent SVD shapes U{tuple(U.shape)} S{tuple(S.shape)} Vh{tuple(Vh.shape)}")
        self.U, self.S, self.Vh = U, S, Vh

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def dense(self) -> Tensor:
        """The m×n matrix; for tests and small layers only."""
        return (self.U * self.S) @ self.Vh


def _check_stack(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor) -> None:
    if len(Bs) == 0:
        raise ValueError("svd_of_sum needs at least one client (got empty Bs)")
    if len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError(f"Bs, As and weights differ in length: {len(Bs)}, {len(As)}, {len(weights)}")
    m, n = Bs[0].shape[0], As[0].shape[1]
    for k, (B, A) in enumerate(zip(Bs, As, strict=True)):
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"client {k}: B{tuple(B.shape)} and A{tuple(A.shape)} are not LoRA factors (m,r),(r,n)")
        if B.shape[0] != m or A.shape[1] != n:
            raise ValueError(f"client {k}: layer shape {(B.shape[0], A.shape[1])} differs from client 0's {(m, n)}")


def svd_of_sum(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor, *, rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ΔW = Σ_k w_k·B_k·A_k without forming the m×n matrix where it is large.

    With B = [w_1B_1 … w_KB_K] (m×R) and A = [A_1; …; A_K] (R×n), ΔW = B·A; the routes are those of
    :func:`svd_of_sums_batched` for one layer. ``rank``: only the top ``rank`` components are wanted (all
    FlexLoRA's dispatch needs is the top max(r_k)).

    Returns U (m, q), S (q,) descending, Vh (q, n) with q = min(R, m, n) (or ``rank`` if smaller), in the
    dtype of B_1.
    """
    _check_stack(Bs, As, weights)
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    B, A = _weighted_stack(Bs, As, weights)
    return svd_of_sums_batched([B], [A], rank=rank)[0]


def svdvals_of_sum(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """The singular values of ΔW = Σ_k w_k·B_k·A_k, descending: :func:`svd_of_sum`'s S, q = min(R, m, n) of
    them, without the singular vectors (e.g. for ΔW's energy spectrum). The same routes less their vectors:
    ``torch.linalg.svdvals`` of the R×R core R_b R_aᵀ (float64) after the two QRs, or of ΔW where forming it
    is cheaper (:func:`_dense_is_cheaper`); no rotation back, which is most of the QR route's cost."""
    _check_stack(Bs, As, weights)
    B, A = _weighted_stack(Bs, As, weights)
    m, R, n = B.shape[0], B.shape[1], A.shape[1]
    q = min(m, n, R)
    if _dense_is_cheaper(m, n, R):
        S: Tensor = torch.linalg.svdvals(B @ A)[:q]
        return S
    S = torch.linalg.svdvals(_qr_core(B, A)[2])
    return S.to(B.dtype)


def _weighted_stack(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor
) -> tuple[Tensor, Tensor]:
    """[w_1B_1 … w_KB_K] (m×R) and [A_1; …; A_K] (R×n) in B_1's dtype: ΔW = B·A."""
    dtype = Bs[0].dtype
    w = torch.as_tensor(weights, dtype=dtype, device=Bs[0].device).reshape(-1)
    B = torch.cat([wk * Bk.to(dtype) for wk, Bk in zip(w, Bs, strict=True)], dim=1)
    A = torch.cat([Ak.to(dtype) for Ak in As], dim=0)
    return B, A


def svd_of_sums_batched(
    Bs: Sequence[Tensor], As: Sequence[Tensor], *, rank: int | None = None, oversample: int = 16
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Thin SVDs of many products ΔW_i = B_i·A_i, B_i (m, R), A_i (R, n): e.g. each layer's
    :func:`stack_factors`. Layers of one (m, R, n) shape share one batched factorisation.

    Per shape the cheapest exact route is taken (:func:`_dense_is_cheaper`, :func:`_gram_is_cheaper`):

    * every component (``rank`` None or close to min(m, n, R)): either the SVD of ΔW formed by one matmul,
      or the QR route, B = Q_b R_b, Aᵀ = Q_a R_a, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ with the R×R core's SVD in
      float64 (for float32 factors, from its Gram's ``eigh`` where that is exact, :func:`_core_svd`)
      rotated back;
    * the top ``rank`` only: the eigenvectors of the Gram matrix of the smaller side, of ΔW itself (when R
      is not small against m and n) or of the R×R core (when it is), span the top subspace; one
      Rayleigh–Ritz step in float64 on ``rank + oversample`` of them recovers the triplets. Where it costs
      fewer flops (a tall or wide layer with R close to its small side) ΔW is never formed: its Gram is
      Aᵀ(BᵀB)A and the projection (QᵀB)A (:func:`_factored_gram_is_cheaper`). The Gram squares
      the condition number but only the top components are kept, whose relative error stays at the input
      precision over the gaps at the cut, and the float64 step separates close singular values.
      Rank-deficient ΔW and tied singular values need no special case: the Rayleigh–Ritz step works on an
      orthonormal basis whatever the Gram's null space.

    Returns, in input order, (U (m, q), S (q,) descending, Vh (q, n)) with q = min(R, m, n) or ``rank``
    if smaller, in the dtype of B_i.
    """
    if len(Bs) != len(As):
        raise ValueError(f"Bs and As differ in length: {len(Bs)}, {len(As)}")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    groups: dict[tuple[int, int, int, torch.dtype, torch.device], list[int]] = {}
    for i, (B, A) in enumerate(zip(Bs, As, strict=True)):
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"layer {i}: B{tuple(B.shape)} and A{tuple(A.shape)} are not factors (m,R),(R,n)")
        key = (int(B.shape[0]), int(B.shape[1]), int(A.shape[1]), B.dtype, B.device)
        groups.setdefault(key, []).append(i)
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(Bs)
    for (_, _, _, dtype, _), idx in groups.items():
        if len(idx) == 1:  # a view, not a copy
            Bb, Ab = Bs[idx[0]].unsqueeze(0), As[idx[0]].to(dtype).unsqueeze(0)
        else:
            Bb = torch.stack([Bs[i] for i in idx])
            Ab = torch.stack([As[i].to(dtype) for i in idx])
        U, S, Vh = svd_of_product_batched(Bb, Ab, rank=rank, oversample=oversample)
        for j, i in enumerate(idx):
            out[i] = (U[j], S[j], Vh[j])
    return [o for o in out if o is not None]


def _dense_is_cheaper(m: int, n: int, R: int, rank: int | None = None) -> bool:
    """Flop model choosing, for every component, between the dense SVD and the QR route.

    Dense: form ΔW (2mnR), then a full SVD (~c·mn·min(m,n)). QR route: two Householder QRs (~2(m+n)R²),
    the R×R core SVD ((1 + c)·R³) and the rotations back (2(m+n)R²). The SVD constant c (~6 with LAPACK's
    divide and conquer) was checked with ``fedrank bench aggregate`` on 2 CPU cores. (``rank``: kept for
    callers of the old signature; the top-``rank`` routes are chosen by :func:`_gram_is_cheaper`.)
    """
    if min(m, n) <= R:
        return True
    c = 6.0
    small = min(m, n)
    dense = 2.0 * m * n * R + (c * m * n * small if rank is None else 2.0 * m * n * small + 4.0 * small**3)
    qr = 4.0 * (m + n) * R * R + (1.0 + c) * R**3
    return dense <= qr


def _gram_is_cheaper(m: int, n: int, R: int) -> bool:
    """Flop model for the top components: eigh of ΔW's smaller Gram versus QR of both factors + the core's.

    In matmul-equivalent flops (2 CPU cores, MKL; ``fedrank bench aggregate``): a Householder QR with its Q
    costs ~1.8·(4mR² - 4/3·R³), a symmetric eigendecomposition of size s ~11·s³. Gram route: ΔW (2mnR),
    its Gram (2mn·s), eigh (s = min(m, n)); core route: the two QRs, the core and its Gram (3R³), eigh (R).
    """
    s = min(m, n)
    if s <= R:
        return True
    gram = 2.0 * m * n * R + 2.0 * m * n * s + 11.0 * s**3
    qr = 1.8 * (4.0 * (m + n) * R * R - 8.0 / 3.0 * R**3) + 3.0 * R**3 + 11.0 * R**3
    return gram <= qr


def _factored_gram_is_cheaper(m: int, n: int, R: int) -> bool:
    """For the Gram route: the Gram of ΔW's smaller side from the factors, Aᵀ(BᵀB)A (m >= n), without
    forming ΔW, versus ΔW = B·A and its Gram. Matmul flops: 2·big·R² + 2·s·R² + 2·s²·R against
    2mnR + 2mn·s (s = min(m, n), big = max(m, n)); on SmolLM2's 1536×576 layers with R ≈ 540: 1.6 against
    2.0 GFLOP, on square ones the direct product wins."""
    s, big = min(m, n), max(m, n)
    return 2.0 * big * R * R + 2.0 * s * R * R + 2.0 * s * s * R < 2.0 * m * n * R + 2.0 * m * n * s


def svd_of_product_batched(
    B: Tensor, A: Tensor, *, rank: int | None = None, oversample: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`svd_of_sums_batched` of one batch of products B·A, B (L, m, R), A (L, R, n) (e.g. from
    :func:`stack_factors_batched`): U (L, m, q), S (L, q), Vh (L, q, n)."""
    if B.ndim != 3 or A.ndim != 3 or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"B{tuple(B.shape)} and A{tuple(A.shape)} are not batches of factors (L,m,R),(L,R,n)")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    m, R, n = B.shape[1], B.shape[2], A.shape[2]
    full = min(m, n, R)
    q = full if rank is None else min(full, rank)
    if q + oversample >= full:  # (nearly) every component: an SVD, of ΔW or of the core
        if _dense_is_cheaper(m, n, R):
            U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
            return U[..., :q], S[..., :q], Vh[..., :q, :]
        hb, ha, core = _qr_core(B, A)
        Uc, S, Vch = _core_svd(core, hb, ha) if B.dtype == torch.float32 else torch.linalg.svd(core)
        return _apply_q(hb, Uc[..., :q]), S[..., :q].to(B.dtype), _apply_q(ha, Vch[..., :q, :].mT).mT
    if _gram_is_cheaper(m, n, R):
        if _factored_gram_is_cheaper(m, n, R):
            return _top_svd_factored(B, A, q, oversample)
        return _top_svd_factored(B, A, q, oversample, form_delta=True)
    hb, ha, core = _qr_core(B, A)
    Uc, S, Vch = _top_svd_gram(core, q, oversample, gram_dtype=B.dtype)
    return _apply_q(hb, Uc), S.to(B.dtype), _apply_q(ha, Vch.mT).mT


Householder = tuple[Tensor, Tensor]
"""``torch.geqrf``'s output: the reflectors below the diagonal (R on and above it) and their scalars τ."""


def _qr_core(B: Tensor, A: Tensor) -> tuple[Householder, Householder, Tensor]:
    """B = Q_b R_b, Aᵀ = Q_a R_a as Householder reflectors (input dtype, R < m, n) and the core R_b R_aᵀ in
    float64: B·A = Q_b·core·Q_aᵀ. Q is never formed: :func:`_apply_q` applies it to the few columns needed,
    which costs less than ``householder_product`` + a matmul (every component of a 4096×596 pair: 37 ms
    against 27 + 16 ms on 2 CPU cores)."""
    hb = torch.geqrf(B)
    ha = torch.geqrf(A.mT)
    R = B.shape[-1]
    Rb, Ra = hb[0][..., :R, :].triu(), ha[0][..., :R, :].triu()
    return hb, ha, Rb.double() @ Ra.double().mT


CORE_EIGH_MIN_RATIO = 1e-6
"""The smallest λ_min/λ_max of a core's Gram CᵀC (a condition number of C of 10³) for which
:func:`_core_svd` takes its eigendecomposition instead of C's SVD."""


def _core_svd(core: Tensor, hb: Householder, ha: Householder) -> tuple[Tensor, Tensor, Tensor]:
    """SVD (U, S, Vh) of float64 R×R cores C (L, R, R) for results in float32, by the eigendecomposition of
    CᵀC = V·Λ·Vᵀ: S = √Λ, U = C·V/S. ``eigh`` costs about 0.6 of ``torch.linalg.svd`` here (a 596×596 core:
    27 against 42 ms on 2 CPU cores).

    The Gram squares C's condition number: a vector of an eigenvalue λ_i is off by about ε·λ_max/λ_i, so
    U = C·V/S is orthonormal to about c·ε·λ_max/λ_min, c growing slowly with R (float64: ε = 1.1e-16;
    C = U·S·Vᵀ holds to ε whatever the condition), and within a cluster of close or tied values the
    vectors span the cluster's subspace (:func:`torch.linalg.eigh`), each u_i paired with its own v_i. A
    core with λ_min/λ_max >= :data:`CORE_EIGH_MIN_RATIO` is therefore exact to about 1e-9 (an independent
    review measured 1.9e-7 at a ratio of 1e-8 with R = 596 and half the values at the bottom), below
    float32's rounding of the result; any other (a rank-deficient or zero ΔW, e.g. clients with the same
    factors, or a layer nobody trained) takes C's SVD. So does a core whose triangular factors R_b, R_a
    already show a condition number over 10³ on their diagonals (a lower bound for each; only a hint for C,
    so that its ``eigh`` is not spent in vain: the eigenvalues decide)."""
    L = core.shape[0]
    U, S, Vh = core.new_empty(core.shape), core.new_empty(core.shape[:-1]), core.new_empty(core.shape)
    done = torch.zeros(L, dtype=torch.bool, device=core.device)
    db, da = (h[0].diagonal(dim1=-2, dim2=-1).abs().double() for h in (hb, ha))
    hint = (db.amin(-1) * da.amin(-1)) ** 2 >= CORE_EIGH_MIN_RATIO * (db.amax(-1) * da.amax(-1)) ** 2
    if bool(hint.any()):
        C = core[hint]
        lam, V = torch.linalg.eigh(C.mT @ C)
        lam, V = lam.flip(-1), V.flip(-1)  # descending
        good = (lam[:, -1] > 0) & (lam[:, -1] >= CORE_EIGH_MIN_RATIO * lam[:, 0])  # not a zero core
        idx = hint.nonzero().squeeze(1)[good]
        S[idx] = lam[good].sqrt()
        U[idx] = C[good] @ V[good] / S[idx].unsqueeze(-2)
        Vh[idx] = V[good].mT
        done[idx] = True
    if not bool(done.all()):
        U[~done], S[~done], Vh[~done] = torch.linalg.svd(core[~done])
    return U, S, Vh


def _apply_q(h: Householder, X: Tensor) -> Tensor:
    """Q·X for the m×R orthonormal Q of ``h`` and X (R, k) (any float dtype), in the reflectors' dtype.

    Large float32 batches on the CPU with k >= R/2 (most of Q's columns) go through :func:`_apply_q_ut`
    (oneDNN's matmuls, a layer at a time); anything else is ``torch.ormqr`` on X padded with zeros to m rows."""
    a, tau = h
    m, R, k = a.shape[-2], a.shape[-1], X.shape[-1]
    cpu32 = _ONEDNN_MM and a.dtype == torch.float32 and a.device.type == "cpu" and a.ndim == 3
    if cpu32 and 2 * k >= R and m * R * k >= 2**23:
        return _apply_q_ut(a, tau, X)
    Xp = a.new_zeros(*a.shape[:-1], k)
    Xp[..., :R, :] = X
    return torch.ormqr(a, tau, Xp)


def _apply_q_ut(a: Tensor, tau: Tensor, X: Tensor) -> Tensor:
    """:func:`_apply_q` for a batch of float32 reflectors a (L, m, R), τ (L, R) and X (L, R, k), by the UT
    transform (Joffrain, Low, Quintana-Ortí, van de Geijn and Van Zee, "Accumulating Householder
    transformations, revisited", ACM TOMS 32(2), 2006): H_1⋯H_R = I - V·T·Vᵀ, V the unit lower trapezoidal
    reflectors, T⁻¹ = diag(1/τ) + the strict upper triangle of VᵀV. So Q·[X; 0] = [X; 0] - V·Y with
    T⁻¹·Y = V_1ᵀ·X, V_1 the top R×R block of V.

    Everything is in float32, as LAPACK's ``larft`` and ``larfb`` make and apply T: the two products with the
    tall V, its Gram and V·Y, through oneDNN's kernel (:func:`_mm`), and the R×R triangular solve. ``geqrf``
    leaves the reflectors column-major, so Vᵀ is read from them row by row (a contiguous R×m copy) and V·Y
    reads one transposed copy of it. ``torch.ormqr`` applies the same reflectors with MKL's sgemm, half
    oneDNN's speed on the AMD CPU this is measured on (4096×596, every column: 20 against 35-40 ms on 2
    cores). Its cost hardly falls with k, ormqr's does: hence :func:`_apply_q`'s k >= R/2. A τ of 0
    (LAPACK's reflector for a column already zero below its diagonal) is the identity: its v is taken as 0,
    which drops it from V·T·Vᵀ."""
    L, m, R = a.shape
    out = torch.empty(L, m, X.shape[-1], dtype=a.dtype, device=a.device)
    for i in range(L):
        live = tau[i] != 0
        VT = a[i].mT.triu(1)  # Vᵀ (R, m), row-major
        VT.diagonal().fill_(1.0)
        if not bool(live.all()):
            VT.mul_(live.unsqueeze(1))
        Tinv = _mm(VT, VT).triu_(1)  # the strict upper triangle of VᵀV ...
        Tinv.diagonal().copy_(torch.where(live, 1.0 / tau[i], 1.0))  # ... + diag(1/τ)
        Xi = X[i].to(a.dtype)
        Y = torch.linalg.solve_triangular(Tinv, _mm(VT[:, :R], Xi.mT), upper=True)  # T⁻¹·Y = V_1ᵀX
        torch.neg(_mm(VT.mT.contiguous(), Y.mT), out=out[i])
        out[i, :R] += Xi
    return out


KRYLOV_BLOCK = 8
"""Block size of :func:`_top_eigvecs`'s Krylov space. Small blocks give the highest polynomial degree for a
given dimension (on SmolLM2's 576×576 Grams, flat spectrum, dimension 160: blocks of 8 reach the float32
floor, blocks of 48 an error of 2e-3); a tie of more than a block's multiplicity is detected and sent to
``eigh``."""
KRYLOV_DIM = 4
"""The Krylov space spans ``KRYLOV_DIM``·l vectors for the top l eigenvectors; it is used where that is at most
a third of the matrix size (``eigh`` is cheaper below)."""


KRYLOV_CHUNK = 4
"""Matrices per Krylov pass (see :func:`_top_eigvecs`)."""
REORTHOGONALIZE = 2
"""Classical Gram–Schmidt passes per Krylov block (two keep float32 bases orthonormal to rounding)."""


def _onednn_mm_available() -> bool:
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return mkldnn and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_MM = _onednn_mm_available()


def _mm(X: Tensor, W: Tensor) -> Tensor:
    """X @ Wᵀ for 2-D float32 CPU tensors by oneDNN's kernel (callers check :data:`_ONEDNN_MM`)."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(X, W, None, "none", [], "")
    return out


def _bmm(X: Tensor, Y: Tensor) -> Tensor:
    """X @ Y for batches of matrices (L, m, k), (L, k, n). Float32 on the CPU goes through oneDNN's kernel
    (``torch.ops.mkldnn._linear_pointwise``, as in :mod:`fedrank.models.onednn`): on the 2-core Zen 5 this
    project is measured on, MKL's sgemm reaches ~200 GFLOP/s on the Gram products and oneDNN ~450. The same
    product in float32; only the order of the additions differs. Any other case: ``torch.matmul``."""
    if not (_ONEDNN_MM and X.dtype == torch.float32 and Y.dtype == torch.float32 and X.device.type == "cpu"):
        return X @ Y
    if X.ndim != 3 or Y.ndim != 3 or X.shape[0] != Y.shape[0] or X.shape[1] * X.shape[2] * Y.shape[2] < 2**23:
        return X @ Y  # small products: one batched call costs less than a Python loop
    out = X.new_empty(X.shape[0], X.shape[1], Y.shape[2])
    for i in range(X.shape[0]):
        out[i] = _mm(X[i], Y[i].mT)
    return out


def _top_eigvecs(G: Tensor, l: int, k: int) -> Tensor:
    """Orthonormal vectors (L, n, l) spanning (to the input precision) the top-l eigenvectors of a batch of
    symmetric positive semi-definite G (L, n, n), of which the top k must be converged.

    Where n is large against l, a block Krylov space of ``KRYLOV_DIM``·l vectors from a fixed random start
    (seeded: the result is deterministic) and its Rayleigh–Ritz step replace ``torch.linalg.eigh``, whose
    tridiagonal reduction alone costs more (576×576 on 2 CPU cores: 4 ms against 10 ms). Each matrix's
    result is checked and recomputed by ``eigh`` unless (a) the Ritz vectors are orthonormal, (b) each of the
    top k has a residual ||G·v - θ·v|| within 100 ulp of the largest Ritz value, so each is an eigenvector
    to the input precision, and (c) no KRYLOV_BLOCK Ritz values are tied (to 1000 ulp): a tie of more than a
    block's multiplicity can hide copies from a block Krylov space. The callers' float64 Rayleigh–Ritz step
    then recovers the triplets from these vectors.
    """
    n = G.shape[-1]
    b = KRYLOV_BLOCK
    steps = -(-KRYLOV_DIM * l // b)
    if 3 * steps * b > n or G.shape[0] == 0:
        V: Tensor = torch.linalg.eigh(G)[1][..., -l:]  # ascending eigenvalues
        return V
    # In chunks of a few matrices: a chunk's G stays in cache across the Krylov steps, whose skinny products
    # are bound by reading G (576×576 float32, 8-row blocks: 60 layers at once 196 ms, 4 at a time 58 ms).
    return torch.cat(
        [_krylov_top_eigvecs(G[i : i + KRYLOV_CHUNK], l, k, steps) for i in range(0, G.shape[0], KRYLOV_CHUNK)]
    )


def _krylov_top_eigvecs(G: Tensor, l: int, k: int, steps: int) -> Tensor:
    """:func:`_top_eigvecs` by a block Krylov space of ``steps`` blocks, for one chunk of matrices."""
    b, n = KRYLOV_BLOCK, G.shape[-1]
    L, dtype = G.shape[0], G.dtype
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(0)
    X = torch.linalg.qr(torch.randn(L, n, b, generator=gen, dtype=dtype).to(G.device))[0].mT
    K = G.new_empty(L, steps * b, n)  # the basis as rows
    GK = G.new_empty(L, steps * b, n)  # K·G, = (G·Kᵀ)ᵀ as G is symmetric
    K[:, :b] = X
    for j in range(1, steps + 1):
        Y = GK[:, (j - 1) * b : j * b]
        torch.matmul(X, G, out=Y)
        if j == steps:
            break
        Kj = K[:, : j * b]
        for _ in range(REORTHOGONALIZE):  # classical Gram-Schmidt
            Y = Y - (Y @ Kj.mT) @ Kj
        X = torch.linalg.qr(Y.mT)[0].mT
        K[:, j * b : (j + 1) * b] = X
    theta, Z = torch.linalg.eigh(GK @ K.mT)
    theta, Z = theta[..., -l:], Z[..., -l:]
    V = _bmm(K.mT, Z)  # (L, n, l)
    top = theta[..., -1:].abs().clamp_min(torch.finfo(dtype).tiny)
    res = torch.linalg.vector_norm(_bmm(GK.mT, Z[..., -k:]) - V[..., -k:] * theta[..., None, -k:], dim=-2)
    orth = (V.mT @ V - torch.eye(l, dtype=dtype, device=G.device)).abs().amax(dim=(-2, -1))
    tied = torch.zeros(L, dtype=torch.bool, device=G.device)
    if l >= b:
        tied = (theta[..., b - 1 :] - theta[..., : l - b + 1] <= 1000 * eps * top).any(-1)
    bad = ~((orth <= 100 * eps * math.sqrt(n)) & (res <= 100 * eps * top).all(-1) & ~tied)
    if bool(bad.any()):
        idx = bad.nonzero().reshape(-1)
        V[idx] = torch.linalg.eigh(G[idx])[1][..., -l:]
    return V


def _top_svd_gram(
    M: Tensor, k: int, oversample: int = 16, gram_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of a batch of matrices M (L, m, n): the eigenvectors of the smaller Gram matrix span the
    top subspace; one Rayleigh–Ritz step in float64 (QR of M·V, SVD of the l×n projection) recovers the
    kept triplets to float64-level accuracy. ``gram_dtype`` (default M's) is the precision of the Gram and
    its eigendecomposition, which only have to find the subspace: float32 is enough for float32 data."""
    m, n = M.shape[-2], M.shape[-1]
    if m < n:
        U, S, Vh = _top_svd_gram(M.mT, k, oversample, gram_dtype)
        return Vh.mT, S, U.mT
    dtype = M.dtype
    l = min(k + oversample, n)
    Mg = M if gram_dtype is None else M.to(gram_dtype)
    Vl = _top_eigvecs(_bmm(Mg.mT, Mg), l, k)
    Q, _ = torch.linalg.qr((Mg @ Vl).double())
    # Qᵀ·M in float64, one matrix at a time: a float64 copy of the whole batch would double its memory.
    Z = torch.stack([Q[i].mT @ M[i].double() for i in range(M.shape[0])])
    Uz, S, Vh = _top_svd_wide(Z, k)
    return (Q @ Uz).to(dtype), S.to(dtype), Vh.to(dtype)


def _top_svd_factored(
    B: Tensor, A: Tensor, k: int, oversample: int = 16, *, form_delta: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_top_svd_gram` of ΔW = B·A, B (L, m, R), A (L, R, n), from the factors: the Gram of the smaller
    side is Aᵀ(BᵀB)A (or, ``form_delta``, ΔWᵀΔW with ΔW = B·A formed in the input dtype, cheaper where R is
    close to m and n), ΔW·V = B(A·V) and the Rayleigh–Ritz projection QᵀΔW = (QᵀB)A, in float64 from the
    factors, so that the triplets carry no rounding of ΔW to the input precision."""
    m, n = B.shape[-2], A.shape[-1]
    if m < n:
        U, S, Vh = _top_svd_factored(A.mT, B.mT, k, oversample, form_delta=form_delta)
        return Vh.mT, S, U.mT
    dtype = B.dtype
    l = min(k + oversample, n)

    def top(Bc: Tensor, Ac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if form_delta:
            Mt = _bmm(Ac.mT, Bc.mT)  # ΔWᵀ, rows in the order oneDNN reads fastest
            G = _bmm(Mt, Mt.mT)
        else:
            G = _bmm(_bmm(Ac.mT, _bmm(Bc.mT, Bc)), Ac)  # Aᵀ(BᵀB)A
        Vl = _top_eigvecs(G, l, k)
        Q, _ = torch.linalg.qr((Bc @ (Ac @ Vl)).double())
        # (QᵀB)·A in float64, one layer at a time: float64 copies of the whole batch would double its memory.
        Z = torch.stack([(Q[i].mT @ Bc[i].double()) @ Ac[i].double() for i in range(Bc.shape[0])])
        Uz, S, Vh = _top_svd_wide(Z, k)
        return (Q @ Uz).to(dtype), S.to(dtype), Vh.to(dtype)

    # A few layers at a time: the intermediates (a few MB) stay in cache and in memory the allocator reuses,
    # where the whole batch's (SmolLM2's 60 gate/up layers: 225 MB for the Grams, 70 MB for the float64
    # bases) would be fresh pages, whose first-touch faults cost more than the products' reads.
    c = KRYLOV_CHUNK
    parts = [top(B[i : i + c], A[i : i + c]) for i in range(0, B.shape[0], c)]
    U, S, Vh = (torch.cat(p) for p in zip(*parts, strict=True))
    return U, S, Vh


def _top_svd_wide(Z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top k SVD triplets of a batch of wide matrices Z (L, l, n), l <= n (the Rayleigh–Ritz
    projections): Zᵀ = Q·R, then the SVD of the l×l Rᵀ, Z = (U_r S V_rᵀ)·Qᵀ. LAPACK's SVD of the wide Z
    itself costs about twice as much (64×576 in float64, 2 CPU cores: 1.5 against 0.8 ms)."""
    Q, R = torch.linalg.qr(Z.mT)
    Ur, S, Vrh = torch.linalg.svd(R.mT)
    return Ur[..., :k], S[..., :k], Vrh[..., :k, :] @ Q.mT


def truncate(
    svd: LowRankSVD | tuple[Tensor, Tensor, Tensor], rank: int, alpha: float, rslora: bool = False
) -> tuple[Tensor, Tensor]:
    """Best rank-r LoRA factors (B, A) of an SVD, FlexLoRA's convention (Bai et al. 2024, §3.2).

    Eckart–Young: U_r diag(S_r) V_rᵀ is the closest rank-r matrix in Frobenius and spectral norm.
    The singular values are folded into B and the client's scaling is undone, so that
    ``lora_scaling(alpha, rank) * B @ A`` reproduces the truncated ΔW. If the SVD holds fewer than
    ``rank`` components (a round of few clients: ΔW has rank Σ r_k of that round), B gets zero columns and
    A's extra rows an orthonormal complement of V_q (:func:`pad_orthonormal`), what a dense SVD's V would give
    for the zero singular values: the product is unchanged, and the extra indices still learn (zero rows of
    A would leave B's extra columns, and A's rows themselves, with zero gradient for the whole round).
    """
    U, S, Vh = (svd.U, svd.S, svd.Vh) if isinstance(svd, LowRankSVD) else svd
    if rank <= 0:
        raise ValueError(f"truncation rank must be positive, got {rank}")
    q = min(rank, S.shape[0])
    scale = lora_scaling(alpha, rank, rslora)
    B = U[:, :q] * (S[:q] / scale)
    A = Vh[:q]
    if q < rank:
        B, A = pad_orthonormal(B, A, rank)
    return B.contiguous(), A.contiguous()


def pad_orthonormal(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors (m, q), (q, n) with orthonormal rows of A padded to ``rank``: B's new columns are zero, A's new
    rows complete its rows to an orthonormal set (from a complete QR of Aᵀ, deterministic), so B·A is
    unchanged and every index has a nonzero gradient. Beyond n rows (rank > n) no further orthonormal row
    exists and the rest stay zero."""
    q, n = A.shape
    Bp, Ap = pad_rank(B, A, rank)
    extra = min(rank, n) - q
    if extra > 0:
        Q, _ = torch.linalg.qr(A.double().T, mode="complete")  # columns q.. span the complement of A's rows
        Ap[q : q + extra] = Q[:, q : q + extra].T.to(A.dtype)
    return Bp, Ap


def pad_rank(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad factors (m, r), (r, n) to ``rank`` >= r: trailing columns of B and rows of A are 0."""
    r = B.shape[1]
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}; use truncate_rank")
    Bp = B.new_zeros(B.shape[0], rank)
    Ap = A.new_zeros(rank, A.shape[1])
    Bp[:, :r] = B
    Ap[:r] = A
    return Bp, Ap


def truncate_rank(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Keep the first ``rank`` rank indices (columns of B, rows of A): HetLoRA's dispatch."""
    if rank > B.shape[1]:
        raise ValueError(f"cannot truncate rank {B.shape[1]} up to {rank}; use pad_rank")
    return B[:, :rank].clone(), A[:rank].clone()


def stack_factors(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor
) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: [w_1B_1 … w_KB_K] and [A_1; …; A_K], whose product is Σ w_k B_k A_k exactly."""
    _check_stack(Bs, As, weights)
    B, A = stack_factors_batched([Bs], [As], weights)
    return B[0], A[0]


def stack_factors_batched(
    Bs: Sequence[Sequence[Tensor]],
    As: Sequence[Sequence[Tensor]],
    weights: Sequence[float] | Tensor,
    *,
    total: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`stack_factors` of L layers of one shape (``Bs[l][k]``: layer l, client k) into one batch,
    B (L, m, R) and A (L, R, n), in one copy: each client's weight multiplies its columns of B once.

    ``total``: a 0-dim float64 tensor to which the sum of every stacked element is added, each layer while it
    is in cache. A NaN or inf anywhere makes it non-finite, so a finite total proves the stack finite (a
    non-finite one may also be a finite overflow: the caller settles it on the inputs)."""
    if not Bs or len(Bs) != len(As):
        raise ValueError(f"need one list of factors per layer for B and A, got {len(Bs)} and {len(As)}")
    dtype, device = Bs[0][0].dtype, Bs[0][0].device
    ranks = [int(B.shape[1]) for B in Bs[0]]
    w = torch.as_tensor(weights, dtype=dtype).reshape(-1)
    if w.numel() != len(ranks):
        raise ValueError(f"{w.numel()} weights for {len(ranks)} clients")
    m, n, R = int(Bs[0][0].shape[0]), int(As[0][0].shape[1]), sum(ranks)
    Bb = torch.empty(len(Bs), m, R, dtype=dtype, device=device)
    Ab = torch.empty(len(As), R, n, dtype=dtype, device=device)
    wcols = torch.repeat_interleave(w, torch.tensor(ranks)).to(device)
    for i, (Bl, Al) in enumerate(zip(Bs, As, strict=True)):
        torch.cat([B.to(dtype) for B in Bl], dim=1, out=Bb[i])
        Bb[i].mul_(wcols)  # while the layer is in cache: one pass over the batch less (gate/up: -12%)
        torch.cat([A.to(dtype) for A in Al], dim=0, out=Ab[i])
        if total is not None:
            total += Bb[i].sum().double() + Ab[i].sum().double()
    return Bb, Ab


def init_lora_factors(m: int, n: int, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """LoRA's initialisation, as peft does it: B = 0, A ~ kaiming_uniform(a=√5) = U(±1/√n)."""
    bound = 1.0 / math.sqrt(n)
    A = (torch.rand(rank, n, generator=generator) * 2.0 - 1.0) * bound
    return torch.zeros(m, rank), A


def energy_spectrum(S: Tensor, tops: Sequence[int]) -> tuple[list[float], float] | None:
    """Singular values ``S`` of a ΔW: the share of its energy Σσ² in the top ``k`` directions for each k
    of ``tops``, and its effective rank exp(H(p)), p = σ/Σσ (Roy & Vetterli, 2007). None when ΔW = 0."""
    s = S.double().clamp_min(0).sort(descending=True).values
    energy = s.square()
    total = float(energy.sum())
    if total <= 0:
        return None
    shares = [float(energy[:k].sum()) / total for k in tops]
    p = s / s.sum()
    p = p[p > 0]
    return shares, float(torch.exp(-(p * p.log()).sum()))
