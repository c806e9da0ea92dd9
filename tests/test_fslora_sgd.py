"""FSLoRA as its authors run it: with SGD the sketch's r/k reaches the update through the gradient, so the
server's expected update over the sketch draws equals the full-rank client's update (E[S] = I)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedrank.aggregation import FSLoRA
from fedrank.aggregation.base import LoraState
from fedrank.train import TrainConfig, make_optimizer
from fedrank.types import ClientSpec, ClientUpdate, LoraFactors

M, N, R = 6, 5, 4


def one_step(W0, B, A, X, Y, scaling: float, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One local optimizer step of LoRA factors (B, A) on a linear model y = Wx; returns the trained
    factors. ``Y`` None: a loss linear in W (<X, W>), whose gradient does not depend on where it is taken."""
    B, A = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    opt = make_optimizer([B, A], cfg)
    W = W0 + scaling * B @ A
    loss = (X * W).sum() if Y is None else ((X @ W.T - Y) ** 2).mean()
    loss.backward()
    opt.step()
    return B.detach(), A.detach()


@pytest.mark.parametrize("loss", ["squared_from_lora_init", "linear_in_w"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sgd_expected_server_update_equals_the_full_rank_update(k: int, rslora: bool, loss: str) -> None:
    """One SGD step. The sketched model W0 + s·B S A equals W0 + s·B A in expectation only, so the gradient
    is taken at another point unless B = 0 (LoRA's init: the squared loss case) or the loss is linear in W
    (then B != 0 and both factors move): in those cases E_I[update] is exactly the full-rank update."""
    g = torch.Generator().manual_seed(k)
    W0 = torch.randn(M, N, generator=g, dtype=torch.float64)
    B, A = torch.randn(M, R, generator=g, dtype=torch.float64), torch.randn(R, N, generator=g, dtype=torch.float64)
    if loss == "squared_from_lora_init":
        B = torch.zeros_like(B)
        X, Y = torch.randn(8, N, generator=g, dtype=torch.float64), torch.randn(8, M, generator=g, dtype=torch.float64)
    else:
        X, Y = torch.randn(M, N, generator=g, dtype=torch.float64), None
    method = FSLoRA(rank=R, rslora=rslora)
    state = LoraState({"w": LoraFactors(B, A)})
    sgd = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9)
    full_B, full_A = one_step(W0, B, A, X, Y, method.scaling(R), sgd)
    # every sketch I of k indices once, equally weighted: the exact expectation over the uniform draw
    updates = []
    for cid, idx in enumerate(itertools.combinations(range(R), k)):
        I = torch.tensor(idx)
        scaling = method.scaling(R) * method.sketch_scale(k)  # what dispatch gives a client of rank k
        b, a = one_step(W0, B[:, I], A[I], X, Y, scaling, sgd)
        updates.append(ClientUpdate(cid, k, 1, {"w": LoraFactors(b, a)}, I))
    new = method.aggregate(state, updates).factors["w"]
    torch.testing.assert_close(new.B, full_B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new.A, full_A, rtol=1e-10, atol=1e-12)
    assert not torch.equal(new.B, B)
    if loss == "linear_in_w":
        assert not torch.equal(new.A, A)
        return
    # AdamW normalises the r/k away: its first step is lr·sign(g), so the expected step is k/r of the full one
    adam = TrainConfig(optimizer="adamw", lr=0.05)
    aB, _ = one_step(W0, B, A, X, Y, method.scaling(R), adam)
    adam_updates = []
    for cid, idx in enumerate(itertools.combinations(range(R), k)):
        I = torch.tensor(idx)
        b, a = one_step(W0, B[:, I], A[I], X, Y, method.scaling(R) * method.sketch_scale(k), adam)
        adam_updates.append(ClientUpdate(cid, k, 1, {"w": LoraFactors(b, a)}, I))
    got = method.aggregate(state, adam_updates).factors["w"].B - B
    ratio = float(got.norm() / (aB - B).norm())
    assert ratio == pytest.approx(k / R, rel=1e-6)


def test_dispatch_scaling_is_what_the_test_assumes() -> None:
    m = FSLoRA(rank=R)
    state = m.init_state({"w": (M, N)}, R)
    a = m.dispatch(state, ClientSpec(0, 2, 1), 0)
    assert a.scaling == pytest.approx(m.scaling(R) * R / 2)


def test_optimizer_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(optimizer="sgd", momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    assert isinstance(
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig(optimizer="sgd")), torch.optim.SGD
    )
