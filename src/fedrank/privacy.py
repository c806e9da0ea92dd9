"""Client-level differential privacy, DP-FedAvg style (McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018), in the central model: the server clips and adds the noise.

For the factor-averaging methods (fedit, ffa, fedsa, hetlora, fslora, replication, rolora, fedplora), each
round (FSLoRA's noise differs in step 2: :data:`EVERY_INDEX`):

1. **Clip.** Client k's contribution is what it uploads, as a change: Δ_k = its trained factors minus the
   factors it was sent, over every layer and every factor it trains and uploads (FedIT: B and A; FFA-LoRA:
   B, its A is frozen; FSLoRA: the columns of B and rows of A of its k_i sketch indices; RoLoRA: the factor
   it trains this round; Fed-PLoRA: its selected modules; FedSA-LoRA: its ΔA_k and its whole B_k, which the
   state's B averages, :meth:`~fedrank.aggregation.base.MethodOptions.dp_reference`). Zero-padding to the
   global rank R does not change a norm, so ‖Δ_k‖ is also the norm of its padded contribution. The client's
   update becomes sent + γ_k Δ_k with γ_k = min(1, C / ‖Δ_k‖); an update already within C is left exactly as
   it is (no rounding), so C = ∞ and σ = 0 reproduce a run without privacy bit for bit.
2. **Noise on the sum.** Every method here aggregates, per global rank index i, a sum over the clients that
   hold i, then divides it by a count the server knows (FedIT, FSLoRA, HetLoRA: the round's K clients;
   FFA-LoRA, FedSA-LoRA: the holders of i). The Gaussian mechanism adds N(0, σ²C²) to every coordinate of
   that sum: the noise of index i is carried by the first client holding it (added to its clipped update),
   so the method's own rule, left unchanged, sums it once and divides it like the rest. Indices no client
   holds get no contribution and no noise. Sensitivity of the sum: one client's clipped delta, norm <= C
   (add/remove; 2C when one client's data is replaced), whatever its rank.
3. **Weights are uniform** (``federation.weighting = "uniform"``, checked): an example-count weight would let
   one client's data move the aggregate by more than the clip. The counts the rule divides by (K, or the
   holders of an index) are public under fixed-size sampling with replace-one adjacency (a client's data
   changes, not whether it takes part, nor its rank). Under Poisson sampling the number of participants is
   random: each change is scaled by K/(qN) (:func:`rescale`), so that a rule dividing by the realised K
   divides by the expected qN instead (McMahan et al.'s fixed-denominator estimator); for the
   :data:`INDEX_REVEALING` methods with clients holding different indices the per-index counts would still
   show, and Poisson sampling is refused.

For FlexLoRA, FLoRA and raFLoRA (:data:`PRODUCT_SPACE`) the contribution is the client's whole update
ΔW_k = s(r_k)·B_k A_k: its Frobenius norm over all layers comes from the factors (‖BA‖²_F = tr((BᵀB)(AAᵀ)),
no m×n matrix), B_k is scaled by γ_k, and the noise is dense, N(0, σ²C²) on every entry of Σ_k ΔW_k
(:func:`dense_noise`, added by the method before its mean), which makes FlexLoRA's ΔW full rank (FLoRA's
state is dense already). raFLoRA averages each rank partition over its own clients, so its contribution is
ΔW_k's partition pieces, clipped jointly (the norm of their concatenation) and each partition's sum noised
(:mod:`fedrank.aggregation.raflora`).

FedEx-LoRA and LoRA-FAIR (:data:`JOINT`) build their state from the factor means *and* the mean of the
clients' products: with every client starting from the global factors (B⁰, A⁰), Σ_k p_k B_k A_k − B̄Ā =
mean(ΔB_k ΔA_k) − mean(ΔB_k)·mean(ΔA_k), so all they need of the clients is the sums of ΔB_k, ΔA_k and
P_k = s·ΔB_k ΔA_k (s the scale the client trained at). Client k's contribution is the concatenation
(ΔB_k, ΔA_k, P_k), clipped jointly to norm C by one factor γ on both factor changes (the product then scales
by γ², :func:`clip_joint`), so a clipped contribution is still a client's update; the factor sums get the
per-index noise above and Σ_k P_k dense noise N(0, σ²C²) on every entry (:func:`product_sum`, passed to the
method as ``products``). The residual (FedEx-LoRA) and the correction (LoRA-FAIR) are computed from those
released sums alone: post-processing.

The accountant (:mod:`fedrank.accounting`, Google's dp-accounting) composes one sampled Gaussian mechanism
per aggregated round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

__all__ = [
    "EVERY_INDEX",
    "INDEX_REVEALING",
    "JOINT",
    "PRODUCT_SPACE",
    "Clipped",
    "add_noise_to_sum",
    "clip_joint",
    "clip_product",
    "clip_update",
    "delta_norm",
    "dense_noise",
    "index_noise",
    "privatize",
    "product_norm",
    "product_sum",
    "rescale",
    "scaled_noise",
    "sensitivity",
]

INDEX_REVEALING = ("ffa", "fedsa", "hetlora", "replication", "rolora", "fedplora", "raflora")
"""Methods whose released state shows which rank indices the round's clients held, unless every client holds
every index: their ε is then accounted without the sampling's amplification (raFLoRA: its noise's scale and
its partition divisors follow the count of the round's clients covering each partition)."""

PRODUCT_SPACE = ("flexlora", "flora", "raflora")
"""Methods that aggregate each client's whole update ΔW_k = s(r_k)·B_k A_k rather than its factors: clipped
in that space (:func:`clip_product`), with dense noise on the sum (:func:`dense_noise`)."""

EVERY_INDEX = ("fslora", "fedex")
"""Methods whose rule adds Σ_k (padded change)/K to the global factors, so that an index no client held would
stay unchanged and show part of the sample: their noise goes on every index of the global rank, held or not
(:func:`index_noise`, added by the method to its sum), and ε keeps the sampling's amplification."""

JOINT = ("fedex", "lorafair")
"""Methods whose state is post-processing of the factor means and the mean of the clients' products
s·ΔB_k ΔA_k: clipped jointly (:func:`clip_joint`), noised on both sums (:func:`product_sum`)."""


@dataclass(frozen=True)
class Clipped:
    """A client's update after clipping: the update itself, the norm of its delta before, and its factor γ."""

    update: ClientUpdate
    norm: float
    factor: float


def _uploaded(u: ClientUpdate) -> tuple[bool, bool]:
    """Which factors the client trained and uploads: (B, A)."""
    return u.train_B, u.train_A


def delta_norm(u: ClientUpdate, sent: ClientAssignment) -> float:
    """‖Δ_k‖: the Frobenius norm, over every layer, of the uploaded factors minus those sent."""
    use_b, use_a = _uploaded(u)
    total = torch.zeros((), dtype=torch.float64)
    for name, f in u.factors.items():
        s = sent.factors[name]
        if use_b:
            total += (f.B.double() - s.B.double()).square().sum()
        if use_a:
            total += (f.A.double() - s.A.double()).square().sum()
    return float(total.sqrt())


def clip_update(u: ClientUpdate, sent: ClientAssignment, clip: float) -> Clipped:
    """``u`` with its delta scaled to norm <= ``clip`` (unchanged, bit for bit, when it already is)."""
    norm = delta_norm(u, sent)
    if norm <= clip:
        return Clipped(u, norm, 1.0)
    gamma = clip / norm
    return Clipped(_scaled(u, sent, gamma), norm, gamma)


def _scaled(u: ClientUpdate, sent: ClientAssignment, factor: float) -> ClientUpdate:
    """``u`` with the change of each factor it trained, from what it was sent, times ``factor``."""
    factors = {}
    for name, f in u.factors.items():
        s = sent.factors[name]
        B = s.B + factor * (f.B - s.B) if u.train_B else f.B
        A = s.A + factor * (f.A - s.A) if u.train_A else f.A
        factors[name] = LoraFactors(B, A)
    return replace(u, factors=factors)


def rescale(updates: Sequence[ClientUpdate], sents: Sequence[ClientAssignment], factor: float) -> list[ClientUpdate]:
    """Each update's change from what it was sent times ``factor`` (the trained factors only): under Poisson
    sampling K/(qN), so that a rule dividing by the realised K divides by the expected qN instead (McMahan
    et al.'s fixed-denominator estimator: the count no longer shows). ``factor`` 1 changes nothing."""
    if factor == 1.0:
        return list(updates)
    return [_scaled(u, s, factor) for u, s in zip(updates, sents, strict=True)]


def product_norm(u: ClientUpdate, scaling: float, pieces: Sequence[tuple[int, int]] | None = None) -> float:
    """‖ΔW_k‖_F over every layer, ΔW_k = scaling·B A, from the factors: Σ tr((BᵀB)(AAᵀ)), never m×n.
    ``pieces``: rank ranges [a, b) whose products scaling·B[:, a:b] A[a:b] are measured separately, the norm
    of their concatenation (raFLoRA's rank partitions); None: ΔW_k whole."""
    total = torch.zeros((), dtype=torch.float64)
    for f in u.factors.values():
        for a, b in pieces if pieces is not None else [(0, f.rank)]:
            B, A = f.B[:, a:b].double(), f.A[a:b].double()
            total += torch.trace((B.T @ B) @ (A @ A.T))
    return float(total.clamp_min(0).sqrt()) * abs(scaling)


def clip_product(
    u: ClientUpdate, scaling: float, clip: float, pieces: Sequence[tuple[int, int]] | None = None
) -> Clipped:
    """``u`` with B scaled so that ‖scaling·B A‖_F <= ``clip`` over all layers (unchanged when it is);
    ``pieces`` as in :func:`product_norm`."""
    norm = product_norm(u, scaling, pieces)
    if norm <= clip:
        return Clipped(u, norm, 1.0)
    gamma = clip / norm
    return Clipped(replace(u, factors={k: LoraFactors(gamma * f.B, f.A) for k, f in u.factors.items()}), norm, gamma)


def _changes(u: ClientUpdate, sent: ClientAssignment) -> dict[str, tuple[Tensor, Tensor]]:
    """(ΔB_k, ΔA_k) per layer, in float64."""
    return {
        name: (f.B.double() - sent.factors[name].B.double(), f.A.double() - sent.factors[name].A.double())
        for name, f in u.factors.items()
    }


def joint_norms(u: ClientUpdate, sent: ClientAssignment) -> tuple[float, float]:
    """(‖(ΔB_k, ΔA_k)‖, ‖s·ΔB_k ΔA_k‖_F) over every layer, s = ``sent.scaling``; the product's norm from
    the factors (tr((ΔBᵀΔB)(ΔAΔAᵀ))), never m×n."""
    factors = torch.zeros((), dtype=torch.float64)
    product = torch.zeros((), dtype=torch.float64)
    for dB, dA in _changes(u, sent).values():
        factors += dB.square().sum() + dA.square().sum()
        product += torch.trace((dB.T @ dB) @ (dA @ dA.T))
    return float(factors.sqrt()), float(product.clamp_min(0).sqrt()) * abs(sent.scaling)


def clip_joint(u: ClientUpdate, sent: ClientAssignment, clip: float) -> Clipped:
    """``u`` with both factor changes scaled by γ so that ‖(γΔB, γΔA, γ²·s·ΔB ΔA)‖ <= ``clip`` (unchanged,
    bit for bit, when it already is). With F, P the two norms of :func:`joint_norms`, x = γ² solves
    P²x² + F²x = C²: x = 2C² / (F² + √(F⁴ + 4P²C²))."""
    fn, pn = joint_norms(u, sent)
    norm = math.hypot(fn, pn)
    if norm <= clip:
        return Clipped(u, norm, 1.0)
    gamma = math.sqrt(2 * clip**2 / (fn**2 + math.sqrt(fn**4 + 4 * pn**2 * clip**2)))
    return Clipped(_scaled(u, sent, gamma), norm, gamma)


def product_sum(updates: Sequence[ClientUpdate], sents: Sequence[ClientAssignment]) -> dict[str, Tensor]:
    """Σ_k s_k·ΔB_k ΔA_k per layer (dense m×n, float64): the products :data:`JOINT` methods need."""
    out: dict[str, Tensor] = {}
    for u, sent in zip(updates, sents, strict=True):
        for name, (dB, dA) in _changes(u, sent).items():
            term = sent.scaling * (dB @ dA)
            out[name] = out[name] + term if name in out else term
    return out


def dense_noise(shapes: dict[str, tuple[int, int]], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """N(0, std²) for every entry of each layer's m×n ΔW (layers in name order: a seeded generator gives the
    same noise)."""
    return {
        name: torch.randn(shapes[name], generator=generator, dtype=torch.float64).mul_(std).float()
        for name in sorted(shapes)
    }


def index_noise(factors: dict[str, LoraFactors], std: float, generator: torch.Generator) -> dict[str, LoraFactors]:
    """N(0, std²) shaped like every layer's global factors (B: m×R, A: R×n), layers in name order, B before A:
    the noise of :data:`EVERY_INDEX` methods, on every index whether a client held it or not."""
    return {
        name: LoraFactors(
            torch.randn(factors[name].B.shape, generator=generator, dtype=torch.float64).mul_(std).float(),
            torch.randn(factors[name].A.shape, generator=generator, dtype=torch.float64).mul_(std).float(),
        )
        for name in sorted(factors)
    }


def scaled_noise(noise: dict[str, LoraFactors], factor: float) -> dict[str, LoraFactors]:
    """:func:`index_noise` times ``factor`` (Poisson sampling's K/(qN); 1 changes nothing)."""
    if factor == 1.0:
        return noise
    return {name: LoraFactors(factor * f.B, factor * f.A) for name, f in noise.items()}


def _global_indices(u: ClientUpdate) -> Tensor:
    """The global rank index of each of the client's columns of B / rows of A (its sketch indices, or its
    first r_k)."""
    return u.indices if u.indices is not None else torch.arange(u.rank)


def add_noise_to_sum(updates: Sequence[ClientUpdate], std: float, generator: torch.Generator) -> list[ClientUpdate]:
    """Gaussian noise N(0, std²) on every coordinate of the per-index sum of ``updates``' factors: for each
    layer and each global rank index some client holds, one noise column of B (and row of A, where trained)
    is added to the first client holding that index, so that the method's per-index sum carries it once.
    Draws are in a fixed order (layer name, factor, index), so a seeded generator gives the same noise."""
    if std == 0 or not updates:
        return list(updates)
    carriers: dict[int, tuple[int, int]] = {}  # global index -> (update, its column)
    for k, u in enumerate(updates):
        for j, i in enumerate(_global_indices(u).tolist()):
            carriers.setdefault(int(i), (k, j))
    new = [{name: [f.B.clone(), f.A.clone()] for name, f in u.factors.items()} for u in updates]
    for name in sorted(updates[0].factors):
        for which in (0, 1):  # B's columns, then A's rows
            for i in sorted(carriers):
                k, j = carriers[i]
                u = updates[k]
                if not (u.train_B if which == 0 else u.train_A):
                    continue
                t = new[k][name][which]
                size = t.shape[0] if which == 0 else t.shape[1]
                noise = torch.randn(size, generator=generator, dtype=torch.float64).mul_(std).to(t.dtype)
                if which == 0:
                    t[:, j] += noise
                else:
                    t[j, :] += noise
    return [replace(u, factors={name: LoraFactors(*new[k][name]) for name in u.factors}) for k, u in enumerate(updates)]


def privatize(
    updates: Sequence[ClientUpdate],
    sents: Sequence[ClientAssignment],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[list[ClientUpdate], list[Clipped]]:
    """The round's updates clipped to ``clip`` and carrying N(0, (σ·C)²) on their per-index sum; with the
    clipping record of each. C = ∞ adds no noise (σ·∞ has no meaning: the mechanism is off)."""
    clipped = [clip_update(u, s, clip) for u, s in zip(updates, sents, strict=True)]
    std = noise_multiplier * clip if math.isfinite(clip) else 0.0
    return add_noise_to_sum([c.update for c in clipped], std, generator), clipped


def sensitivity(
    method: Any, specs: Sequence[ClientSpec], indices: Sequence[Tensor | None], which: int, clip: float
) -> float:
    """How far client ``which``'s clipped update, replaced by any other, can move the method's pre-noise
    aggregate (the Frobenius norm over the state's factors): each method states its bound
    (``dp_sensitivity``, in its own file)."""
    bound: float = method.dp_sensitivity(specs, indices, which, clip)
    return bound
