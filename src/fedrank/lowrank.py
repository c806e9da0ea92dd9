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
    "pad_rank",
    "stack_factors",
    "svd_of_sum",
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


def _dense_is_cheaper(m: int, n: int, R: int, rank: int | None = None) -> bool:
    """Flop model choosing between the dense route and the QR route.

    Dense: form ΔW (2mnR), then a full SVD (~c·mn·min(m,n)) or, when only the top ``rank`` components
    are wanted, the Gram matrix (2mn·min(m,n)) and its eigendecomposition (~4·min(m,n)³). QR route: two
    Householder QRs (~2(m+n)R²), the R×R core SVD ((1 + c)·R³) and the rotations back (2(m+n)R²).
    The SVD constant c (~6 with LAPACK's divide and conquer) was checked with ``fedrank bench aggregate``
    on 2 CPU cores.
    """
    if min(m, n) <= R:
        return True
    c = 6.0
    small = min(m, n)
    dense = 2.0 * m * n * R + (c * m * n * small if rank is None else 2.0 * m * n * small + 4.0 * small**3)
    qr = 4.0 * (m + n) * R * R + (1.0 + c) * R**3
    return dense <= qr


def svd_of_sum(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float] | Tensor, *, rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ΔW = Σ_k w_k·B_k·A_k without forming the m×n matrix.

    With B = [w_1B_1 … w_KB_K] (m×R) and A = [A_1; …; A_K] (R×n), ΔW = B·A. QR gives
    B = Q_b R_b and Aᵀ = Q_a R_a, so ΔW = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD of the small R×R core
    C = U_c S V_cᵀ rotates back to U = Q_b U_c, Vh = V_cᵀ Q_aᵀ. The QRs run in the input dtype and the
    core in float64. Where R >= min(m, n), or a flop model says the dense SVD is cheaper, the m×n
    matrix is small enough and is formed instead.

    ``rank``: only the top ``rank`` components are wanted (all FlexLoRA's dispatch needs is the top
    max(r_k)). On the dense route they then come from the Gram matrix's eigenvectors, refined by one
    Rayleigh–Ritz step in float64 (:func:`_top_svd_dense`), which is faster than a full SVD and, checked
    against float64, more accurate than a float32 one.

    Returns U (m, q), S (q,) descending, Vh (q, n) with q = min(R, m, n) (or ``rank`` if smaller), in the
    dtype of B_1.
    """
    _check_stack(Bs, As, weights)
    dtype = Bs[0].dtype
    w = torch.as_tensor(weights, dtype=dtype, device=Bs[0].device).reshape(-1)
    B = torch.cat([wk * Bk.to(dtype) for wk, Bk in zip(w, Bs, strict=True)], dim=1)
    A = torch.cat([Ak.to(dtype) for Ak in As], dim=0)
    m, R = B.shape
    n = A.shape[1]
    q = min(R, m, n) if rank is None else min(R, m, n, rank)
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if _dense_is_cheaper(m, n, R, rank):
        if rank is not None and rank < min(m, n):
            return _top_svd_dense(B @ A, q)
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        return U[:, :q], S[:q], Vh[:q]
    Qb, Rb = torch.linalg.qr(B)  # (m, R), (R, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (n, R), (R, R)
    core = Rb.double() @ Ra.double().T
    if rank is not None and q + 16 < R:
        Uc, S, Vch = _top_svd_dense(core, q, gram_dtype=dtype)
    else:
        Uc, S, Vch = torch.linalg.svd(core)
    U = Qb @ Uc[:, :q].to(dtype)
    Vh = Vch[:q].to(dtype) @ Qa.T
    return U, S[:q].to(dtype), Vh


def _top_svd_dense(
    M: Tensor, k: int, oversample: int = 16, gram_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of a dense M: eigenvectors of the smaller Gram matrix span the top subspace; one
    Rayleigh–Ritz step in float64 (QR of M·V, SVD of the l×n projection) recovers the triplets to
    float64-level accuracy for the kept components. ``gram_dtype`` (default M's) is the precision of the
    eigendecomposition that only has to find the subspace: float32 is enough for float32 data."""
    m, n = M.shape
    if m < n:
        U, S, Vh = _top_svd_dense(M.T, k, oversample, gram_dtype)
        return Vh.T, S, U.T
    dtype = M.dtype
    l = min(k + oversample, n)
    Mg = M if gram_dtype is None else M.to(gram_dtype)
    _, V = torch.linalg.eigh(Mg.T @ Mg)  # ascending eigenvalues
    Q, _ = torch.linalg.qr(M.double() @ V[:, -l:].double())
    Uz, S, Vh = torch.linalg.svd(Q.T @ M.double(), full_matrices=False)
    return (Q @ Uz[:, :k]).to(dtype), S[:k].to(dtype), Vh[:k].to(dtype)


def truncate(
    svd: LowRankSVD | tuple[Tensor, Tensor, Tensor], rank: int, alpha: float, rslora: bool = False
) -> tuple[Tensor, Tensor]:
    """Best rank-r LoRA factors (B, A) of an SVD, FlexLoRA's convention (Bai et al. 2024, §3.2).

    Eckart–Young: U_r diag(S_r) V_rᵀ is the closest rank-r matrix in Frobenius and spectral norm.
    The singular values are folded into B and the client's scaling is undone, so that
    ``lora_scaling(alpha, rank) * B @ A`` reproduces the truncated ΔW. If the SVD holds fewer than
    ``rank`` components the factors are zero-padded up to ``rank``.
    """
    U, S, Vh = (svd.U, svd.S, svd.Vh) if isinstance(svd, LowRankSVD) else svd
    if rank <= 0:
        raise ValueError(f"truncation rank must be positive, got {rank}")
    q = min(rank, S.shape[0])
    scale = lora_scaling(alpha, rank, rslora)
    B = U[:, :q] * (S[:q] / scale)
    A = Vh[:q]
    if q < rank:
        B, A = pad_rank(B, A, rank)
    return B.contiguous(), A.contiguous()


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
    w = torch.as_tensor(weights, dtype=Bs[0].dtype).reshape(-1)
    return (
        torch.cat([wk * Bk for wk, Bk in zip(w, Bs, strict=True)], dim=1),
        torch.cat(list(As), dim=0),
    )


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
