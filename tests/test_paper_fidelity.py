"""The fixes an independent review of the methods against their papers and official code asked for (issue 25,
"fix first"): each test here failed on the code before its fix."""

from __future__ import annotations

import pytest
import torch

from fedrank.aggregation import FlexLoRA, FlexLoRAState, RaFLoRA
from fedrank.aggregation.base import AggregationError
from fedrank.lowrank import pad_orthonormal
from fedrank.types import ClientAssignment, ClientSpec, ClientUpdate, LoraFactors

SHAPES = {"layers.0.q_proj": (12, 10), "layers.0.down_proj": (10, 16)}


def rand_factors(g: torch.Generator, rank: int) -> dict[str, LoraFactors]:
    return {
        k: LoraFactors(
            torch.randn(m, rank, generator=g, dtype=torch.float64),
            torch.randn(rank, n, generator=g, dtype=torch.float64),
        )
        for k, (m, n) in SHAPES.items()
    }


# --- item 2: no dead indices after an SVD dispatch with fewer components than the client's rank -------------


@pytest.mark.parametrize("cls", [FlexLoRA, RaFLoRA])
def test_svd_dispatch_above_the_rounds_rank_leaves_no_dead_index(cls: type) -> None:
    """One rank-2 client in a round: ΔW has 2 components, a rank-6 client gets 4 more indices. B's extra
    columns are zero (the model is ΔW exactly) and A's extra rows complete A to an orthonormal set, so the
    gradient of any loss reaches every column of B (∂L/∂B = s·G·Aᵀ, zero where a row of A is zero)."""
    method = cls(alpha=8.0)
    init = method.init_state(SHAPES, 8)
    state = FlexLoRAState({k: LoraFactors(f.B.double(), f.A.double()) for k, f in init.init.items()})
    g = torch.Generator().manual_seed(3)
    up = ClientUpdate(0, 2, 10, rand_factors(g, 2))
    new = method.aggregate(state, [up])
    a = method.dispatch(new, ClientSpec(1, 6, 10), 1)
    for name, f in a.factors.items():
        u = up.factors[name]
        torch.testing.assert_close(a.scaling * f.B @ f.A, method.scaling(2) * u.B @ u.A, atol=1e-9, rtol=1e-9)
        assert torch.equal(f.B[:, 2:], torch.zeros_like(f.B[:, 2:]))
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(6, dtype=f.A.dtype), atol=1e-9, rtol=1e-9)
        grad_B = a.scaling * torch.randn(f.B.shape[0], f.A.shape[1], generator=g, dtype=f.A.dtype) @ f.A.T
        assert bool((grad_B.abs().sum(0) > 1e-6).all()), "a column of B would get no gradient"


def test_pad_orthonormal_beyond_the_width_keeps_the_rest_zero() -> None:
    A = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0].T  # 2 orthonormal rows of width 5
    B = torch.randn(4, 2, dtype=torch.float64)
    Bp, Ap = pad_orthonormal(B, A, 7)
    torch.testing.assert_close(Ap[:5] @ Ap[:5].T, torch.eye(5, dtype=torch.float64))
    assert torch.equal(Ap[5:], torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(Bp @ Ap, B @ A)


# --- item 1: FSLoRA's official server optimiser (AdamW on the mean masked pseudo-gradient) ------------------


def _official_server(
    B: torch.Tensor, A: torch.Tensor, rounds: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's server, verbatim in spirit: grad = Σ_i (server − client_i)·mask_i / K, then
    ``torch.optim.AdamW(lr)``.step() (each round's clients as (indices, B_i, A_i) of the held columns/rows)."""
    pB, pA = torch.nn.Parameter(B.clone()), torch.nn.Parameter(A.clone())
    opt = torch.optim.AdamW([pB, pA], lr=lr)
    for clients in rounds:
        gB, gA = torch.zeros_like(B), torch.zeros_like(A)
        for idx, Bi, Ai in clients:
            gB[:, idx] += pB.data[:, idx] - Bi
            gA[idx] += pA.data[idx] - Ai
        pB.grad, pA.grad = gB / len(clients), gA / len(clients)
        opt.step()
        opt.zero_grad()
    return pB.data, pA.data


def test_fslora_adamw_server_is_torch_adamw_on_the_mean_masked_delta() -> None:
    from fedrank.aggregation import FSLoRA
    from fedrank.aggregation.fslora import FSLoRAServerState
    from fedrank.checkpoint import from_bytes, to_bytes

    shapes = {"q": (6, 5)}
    fs = FSLoRA(alpha=1.0, rank=4, server_optimizer="adamw", server_lr=0.05)
    state = fs.init_state(shapes, 4)
    assert isinstance(state, FSLoRAServerState)
    B0, A0 = state.factors["q"].B.clone(), state.factors["q"].A.clone()
    g = torch.Generator().manual_seed(0)
    history = []
    for t in range(3):
        ups, clients = [], []
        for c, r in enumerate((1, 2, 4)):
            a = fs.dispatch(state, ClientSpec(c, r, 10 + c), t)
            f = a.factors["q"]
            Bi, Ai = f.B + torch.randn(f.B.shape, generator=g), f.A + torch.randn(f.A.shape, generator=g)
            ups.append(ClientUpdate(c, a.rank, 10 + c, {"q": LoraFactors(Bi, Ai)}, a.indices))
            clients.append((a.indices, Bi, Ai))
        history.append(clients)
        state = fs.aggregate(state, ups, weights=[1 / 3] * 3)  # federation.weighting = "uniform"
        state = from_bytes(to_bytes(state, "checkpoint"), kind="checkpoint")  # a resume keeps the moments
    B, A = _official_server(B0, A0, history, 0.05)
    assert state.step == 3
    torch.testing.assert_close(state.factors["q"].B, B, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state.factors["q"].A, A, atol=1e-6, rtol=1e-5)


def test_fslora_server_step_defaults() -> None:
    from fedrank.aggregation import FSLoRA

    assert FSLoRA().step_size == 1.0
    assert FSLoRA(server_optimizer="adamw").step_size == 3e-4
    with pytest.raises(ValueError, match="server_optimizer"):
        FSLoRA(server_optimizer="adam")


# --- item 3: the weights the papers use -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "weighting"),
    [
        *[(m, "uniform") for m in ("fedex", "rolora", "fedplora", "fslora")],
        *[(m, "examples") for m in ("flexlora", "fedit", "hetlora")],
    ],
)
def test_presets_weigh_clients_as_the_papers_do(name: str, weighting: str) -> None:
    from fedrank.config import RunConfig
    from fedrank.simulation import with_method

    assert with_method(RunConfig(), name, 0).federation.weighting == weighting
    assert with_method(RunConfig(), name, 0, presets=False).federation.weighting == "examples"


# --- item 5: the scale conventions, and the fold ablation of the index-sharing methods --------------------------


@pytest.mark.parametrize("name", ["hetlora", "replication", "ffa", "fedsa", "rolora"])
def test_fold_scale_trains_at_the_clients_own_scale_on_the_same_model(name: str) -> None:
    from fedrank.aggregation import make_method
    from fedrank.aggregation.scale import FoldedScale

    shapes = {"q": (6, 5), "v": (4, 7)}
    inner = make_method(name, alpha=8.0)
    folded = FoldedScale(inner)
    g = torch.Generator().manual_seed(1)
    state = inner.init_state(shapes, 8)
    B = {k: torch.randn(f.B.shape, generator=g) for k, f in state.factors.items()}  # B = 0 would hide a scale
    state = type(state)({k: LoraFactors(B[k], f.A) for k, f in state.factors.items()})
    twin = type(state)(dict(state.factors))
    spec = ClientSpec(3, 3, 10)  # c_k = √(s(8)/s(3)) = √(3/8): (c·x)/c is not x in floating point
    a, b = inner.dispatch(state, spec, 0), folded.dispatch(twin, spec, 0)
    assert a.scaling == inner.scaling(8) and b.scaling == inner.scaling(3)
    for k in shapes:
        torch.testing.assert_close(
            b.scaling * b.factors[k].B @ b.factors[k].A, a.scaling * a.factors[k].B @ a.factors[k].A
        )

    def update(x: ClientAssignment, factors: dict[str, LoraFactors] | None = None) -> ClientUpdate:
        return ClientUpdate(3, 3, 10, factors or x.factors, x.indices, x.train_A, x.train_B)

    # a client that returns what it got leaves the state as it was (its factors unfolded; a frozen factor
    # exactly, bit for bit, as FFA-LoRA's and RoLoRA's checks need)
    back = folded.aggregate(twin, [update(b)])
    same = inner.aggregate(state, [update(a)])
    for k in shapes:
        torch.testing.assert_close(back.factors[k].B, same.factors[k].B)
        torch.testing.assert_close(back.factors[k].A, same.factors[k].A)
    if not b.train_A or not b.train_B:  # a client that changed its frozen factor is still refused
        frozen = "A" if not b.train_A else "B"
        moved = {
            k: LoraFactors(f.B * 1.001, f.A) if frozen == "B" else LoraFactors(f.B, f.A * 1.001)
            for k, f in b.factors.items()
        }
        with pytest.raises(AggregationError, match=f"changed (the frozen )?{frozen}"):
            folded.aggregate(twin, [update(b, moved)])
    if name == "fedsa":  # the client's persisted B comes back in its own convention
        local = folded.local_state(update(b))
        again = folded.dispatch(back, spec, 1, local)
        torch.testing.assert_close(again.factors["q"].B, b.factors["q"].B)


def test_fold_scale_is_refused_where_it_does_not_apply() -> None:
    from fedrank.config import ConfigError, MethodConfig, RunConfig
    from fedrank.simulation import build_method, with_method

    with pytest.raises(ConfigError, match="own scale convention"):
        MethodConfig(name="flexlora", scale="fold")
    with pytest.raises(ConfigError, match="unknown"):
        MethodConfig(name="hetlora", scale="sqrt")
    cfg = RunConfig(method=MethodConfig(name="hetlora", scale="fold"))
    assert type(build_method(cfg)).__name__ == "FoldedScale"
    assert with_method(cfg, "flexlora", 0).method.scale == "global"  # compare: others keep their own
    assert with_method(cfg, "replication", 0).method.scale == "fold"
